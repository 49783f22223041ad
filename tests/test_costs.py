"""graphgen.costs: what the memory plan counts for a square."""
from __future__ import annotations

from graphgen.costs import Shape, workspace_bytes
from graphgen.models import base, build_spec
from graphgen.models.base import GROUPED_BLOCK_BYTES

from .models.test_model_families import _llama


def test_prefill_attention_workspace_counts_one_block_of_scores(monkeypatch):
    spec = build_spec(_llama(num_attention_heads=8, num_key_value_heads=2, hidden_size=512,
                             max_position_embeddings=4096))
    attn = spec.layers[1]
    big = Shape(16, 1024, 8, 2)  # 16 x 8 heads x 1024^2 bf16 scores: the grouped blocks
    with_blocks = workspace_bytes(spec, attn, big, 0)
    decode = workspace_bytes(spec, attn, big, 1)
    monkeypatch.setattr(base, "GROUPED_MIN_SCORES", 1 << 62)  # as if SDPA ran it: no scores held
    row = 16 * 8 * 1024 * 2  # one query position's scores
    assert with_blocks - workspace_bytes(spec, attn, big, 0) == 2 * max(GROUPED_BLOCK_BYTES, row) + 16 * 1024 * 512 * 2
    assert workspace_bytes(spec, attn, big, 1) == decode  # one query: SDPA / decode attention, no block
