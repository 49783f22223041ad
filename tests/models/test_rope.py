"""graphgen.models.rope: the cos/sin tables kept per positions tensor, and the rotation itself."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from graphgen.models.rope import Rotary


def test_cos_sin_tables_are_kept_per_slice_and_redone_after_a_write():
    rot = Rotary(LlamaConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=64), 16)
    pos = torch.arange(12).view(3, 4)
    first = rot.cos_sin(pos[1:], torch.float32)
    assert rot.cos_sin(pos[1:], torch.float32) is first  # a new view of the same rows: kept
    assert rot.cos_sin(pos[:1], torch.float32) is not first  # other rows
    assert rot.cos_sin(pos[1:], torch.bfloat16)[0].dtype == torch.bfloat16
    pos.add_(1)  # the executor writes the next step's positions in place: not served stale
    again = rot.cos_sin(pos[1:], torch.float32)
    assert again is not first and torch.equal(again[0], rot._cos_sin(pos[1:], torch.float32)[0])


def test_cos_sin_keeps_only_the_current_positions_tables():
    rot = Rotary(LlamaConfig(hidden_size=32, num_attention_heads=2, max_position_embeddings=64), 16)
    a, b = torch.arange(12).view(3, 4), torch.arange(12).view(3, 4)
    for rows in (slice(0, 1), slice(1, 3), slice(None)):
        rot.cos_sin(a[rows], torch.float32)
    assert len(rot._last) == 3
    rot.cos_sin(b, torch.float32)  # the next step's tensor: a's tables are dropped
    assert len(rot._last) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_apply_is_hf_rotation_bit_for_bit(dtype, partial):
    """apply() swaps the halves against a sign-folded sin; HF negates one half and joins them."""
    from transformers.models.llama.modeling_llama import rotate_half

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, partial_rotary_factor=partial)
    rot = Rotary(cfg, 32)
    pos = torch.arange(5)[None].expand(3, 5)
    x = torch.randn(3, 2, 5, 32).to(dtype)
    cos, sin = rot.cos_sin(pos, dtype)
    d = rot.dim
    freqs = pos[..., None].float() * rot.inv_freq
    emb = torch.cat((freqs, freqs), -1)
    hf_cos, hf_sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    hf = torch.cat((x[..., :d] * hf_cos + rotate_half(x[..., :d]) * hf_sin, x[..., d:]), -1)
    assert torch.equal(rot.apply(x, cos, sin), hf)
