"""graphgen.models.rope: the cos/sin tables kept per positions tensor."""
from __future__ import annotations

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
