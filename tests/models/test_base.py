"""graphgen.models.base: the attention every family's prefill runs (attend, grouped_attention)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphgen.models import base
from graphgen.models.base import attend, causal_padding_bias, grouped_attention


def _eager(q, k, v, bias, scale):
    """transformers' eager attention in q's dtype: K/V repeated per group, scores rounded, scaled,
    masked, softmax in float32 rounded back, then p.v."""
    b, nh, s, d = q.shape
    g = nh // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is None:
        bias = torch.full((s, k.shape[2]), float("-inf")).triu(1).to(q.dtype)
    p = (scores + bias).softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v).transpose(1, 2).reshape(b, s, nh * d)


def _qkv(b, nh, nkv, s, L, d, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(b * 1000 + s * 10 + L)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((b, nh, s, d), (b, nkv, L, d), (b, nkv, L, d))]


@pytest.mark.parametrize("block_bytes", [1 << 20, 600, 100])  # one block, a few, one query per block
@pytest.mark.parametrize("case", ["causal", "padding", "past", "per-head bias", "mha"])
def test_grouped_attention_is_eager_attention(case, block_bytes):
    """Bit for bit in one block; in several, a block's p.v sums over only the keys it sees, which
    can move a float32 sum by an ulp before rounding."""
    b, nh, nkv, s, L, d = {"causal": (3, 6, 2, 40, 40, 16), "padding": (3, 6, 2, 40, 40, 16),
                           "past": (2, 6, 3, 30, 50, 8), "per-head bias": (2, 4, 2, 33, 33, 8),
                           "mha": (2, 4, 4, 25, 25, 8)}[case]
    q, k, v = _qkv(b, nh, nkv, s, L, d)
    mask = torch.ones(b, L, dtype=torch.long)
    bias = None
    if case != "causal" and case != "mha":
        mask[0, :3] = 0  # left padding in the first sequence
        bias = causal_padding_bias(mask, s, torch.bfloat16)
        if case == "per-head bias":  # ALiBi-like, one row of offsets per head
            bias = bias + torch.randn(b, nh, 1, L).to(torch.bfloat16)
    out = grouped_attention(q, k, v, bias, 0.25, block_bytes=block_bytes)
    ref = _eager(q, k, v, bias, 0.25)
    real = mask[:, L - s:].bool()  # the outputs of padding queries are never read
    assert out.shape == (b, s, nh * d) and out.dtype == torch.bfloat16
    if block_bytes == 1 << 20:
        assert torch.equal(out[real], ref[real])
    else:
        torch.testing.assert_close(out[real], ref[real], rtol=2 ** -8, atol=1e-5)


def test_attend_runs_sdpa_in_float32_and_on_small_inputs(monkeypatch):
    calls = []
    monkeypatch.setattr(base, "grouped_attention", lambda *a, **kw: calls.append(a) or grouped_attention(*a, **kw))
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = _qkv(1, 6, 2, 16, 16, 8, dtype)  # 1 x 6 x 16 x 16 scores: under GROUPED_MIN_SCORES
        sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert torch.equal(attend(q, k, v, None), sdpa.transpose(1, 2).reshape(1, 16, 48))
    assert calls == []
    monkeypatch.setattr(base, "GROUPED_MIN_SCORES", 16 * 16)
    q, k, v = _qkv(1, 6, 2, 16, 16, 8)
    assert torch.equal(attend(q, k, v, None, 0.5), grouped_attention(q, k, v, None, 0.5))
    assert len(calls) == 1
    q1 = q[:, :, -1:]  # one query: SDPA (decode has its own path in executors/attention.py)
    attend(q1, k, v, None)
    assert len(calls) == 1


def test_in_row_chunks_joins_chunks_of_sequences():
    h, pos = torch.randn(5, 3, 4), torch.arange(15).view(5, 3)
    seen = []

    def fn(x, p):
        seen.append(x.shape[0])
        return x * 2 + p[..., None], (p * 3).T.contiguous().T  # a tensor and a non-contiguous one
    whole = fn(h, pos)
    seen.clear()
    chunked = base.in_row_chunks(fn, h, pos, rows=6)  # 6 tokens: 2 sequences of 3 at a time
    assert seen == [2, 2, 1]
    assert all(torch.equal(a, b) for a, b in zip(chunked, whole))
    seen.clear()
    assert torch.equal(base.in_row_chunks(lambda x: x + 1, h, rows=6), h + 1)
    base.in_row_chunks(fn, h, pos, rows=15)  # fits: one call
    base.in_row_chunks(fn, h[:1], pos[:1], rows=1)  # one sequence: one call
    assert seen == [5, 1]
