"""Decode attention and the head-major cache (executors/attention.py, executors/tiers.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from executors.attention import decode_attention
from executors.tiers import Tier
from graphgen import LLM
from graphgen.models.base import causal_padding_bias

from ..conftest import left_padded_batch

GB = 10**9


def sdpa(q, k, v, bias, scale=None):
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                         attn_mask=bias, scale=scale)
    return out.transpose(1, 2).reshape(q.shape[0], 1, -1)


def qkv(B=3, nh=6, nkv=2, L=9, d=8, S_max=12, dtype=torch.float32, seed=0):
    """q [B, nh, 1, d] and K/V prefix views [B, nkv, L, d] of a head-major cache."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, B, nkv, S_max, d, generator=g).to(dtype)
    return torch.randn(B, nh, 1, d, generator=g).to(dtype), cache[0, :, :, :L], cache[1, :, :, :L]


@pytest.mark.parametrize("nkv", [1, 2, 6])
def test_decode_attention_matches_sdpa(nkv):
    q, k, v = qkv(nkv=nkv)
    torch.testing.assert_close(decode_attention(q, k, v, None, None), sdpa(q, k, v, None))


def test_decode_attention_applies_padding_and_per_head_biases():
    q, k, v = qkv()
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    bias = causal_padding_bias(mask, 1, torch.float32)  # [B, 1, 1, L]
    torch.testing.assert_close(decode_attention(q, k, v, bias, 0.5), sdpa(q, k, v, bias, 0.5))
    per_head = torch.randn(3, 6, 1, 9)  # ALiBi-like [B, nh, 1, L]
    torch.testing.assert_close(decode_attention(q, k, v, per_head, None), sdpa(q, k, v, per_head))


def test_decode_attention_in_bf16_is_as_close_as_sdpa():
    q, k, v = qkv(dtype=torch.bfloat16, L=11)
    want = sdpa(q.float(), k.float(), v.float(), None)
    err = (decode_attention(q, k, v, None, None).float() - want).norm() / want.norm()
    err_sdpa = (sdpa(q, k, v, None).float() - want).norm() / want.norm()
    assert err <= 1.5 * err_sdpa + 1e-3


def test_head_major_cache_is_read_and_written_like_a_sequence_major_one():
    shape = (2, 7, 3, 2, 4)  # [2, S_max, B, nkv, d]
    flat, hm = Tier("host", GB, torch.device("cpu")), Tier("device", GB, torch.device("cpu"))
    flat.alloc("kv", shape, torch.bfloat16)
    hm.alloc("kv", shape, torch.bfloat16, head_major=True)
    assert hm.used == flat.used == 2 * 7 * 3 * 2 * 4 * 2
    x = torch.randn(2, 3, 3, 2, 4).bfloat16()
    for t in (flat, hm):
        t.write_slice("kv", 2, x)
    assert torch.equal(hm.read_prefix("kv", 5), flat.read_prefix("kv", 5))
    prefix = hm.get("kv")[:, :5].permute(0, 2, 3, 1, 4)  # [2, B, nkv, L, d], as attention reads it
    assert prefix.stride(-1) == 1 and prefix.stride(-2) == 4  # each head's prefix contiguous: no copy


def test_decode_reads_the_cache_in_place(opt_ckpt):
    """All on the device, dense cache: decode attends over the cache itself (no scratch join)."""
    path, _ = opt_ckpt
    ids, mask = left_padded_batch(4)
    base = ["model.dtype=float32", "policy.gpu_batch_size=4", "policy.num_gpu_batches=1", "executor.name=reference"]
    with LLM(str(path), base) as llm:
        llm.generate(ids, attention_mask=mask, max_new_tokens=4)
        assert llm.executor.attn._scratch == {}
    with LLM(str(path), base + ["policy.compress_cache.bits=4"]) as llm:  # compressed: dequantised into scratch
        llm.generate(ids, attention_mask=mask, max_new_tokens=4)
        assert llm.executor.attn._scratch != {}


def test_store_after_an_in_place_cache_write_copies_nothing(opt_ckpt, monkeypatch):
    """A decode square writes its K/V into the cache it reads in place; its store op then finds
    that very slice there and copies nothing (it used to write the same slice twice). The prefill's
    stores still copy: nothing was cached before them."""
    import executors.tiers as tiers

    path, _ = opt_ckpt
    ids, mask = left_padded_batch(4)
    base = ["model.dtype=float32", "policy.gpu_batch_size=4", "policy.num_gpu_batches=1", "executor.name=reference"]
    same, real = [], tiers._same_view
    monkeypatch.setattr(tiers, "_same_view", lambda a, b: same.append(real(a, b)) or same[-1])
    with LLM(str(path), base) as llm:
        llm.generate(ids, attention_mask=mask, max_new_tokens=4)
        n_attn = sum(layer.kind == "attn" for layer in llm.executor.spec.layers)
    assert same.count(True) == 3 * n_attn and same.count(False) == n_attn


def test_decode_attention_in_chunks_matches_one_pass(monkeypatch):
    """Long contexts run over chunks of (sequence, KV head) pairs: the same result."""
    import executors.attention as attention

    q, k, v = qkv(B=4, L=9)
    bias = torch.randn(4, 6, 1, 9)
    whole = decode_attention(q, k, v, bias, None)
    monkeypatch.setattr(attention, "TEMP_BYTES", 2 * 9 * 8 * 4 * 3)  # 3 pairs per chunk
    torch.testing.assert_close(decode_attention(q, k, v, bias, None), whole)


@pytest.mark.parametrize("per_head", [False, True])
def test_large_bf16_batches_multiply_the_cache_as_is_as_close_as_eager(monkeypatch, per_head):
    """bf16, B * nkv >= KMAJOR_ROWS: K @ q^T on the cache itself (bf16 scores, as transformers'
    eager attention); padding and per-head biases still apply."""
    import executors.attention as attention

    calls = []
    real = attention._kmajor
    monkeypatch.setattr(attention, "_kmajor", lambda *a: calls.append(1) or real(*a))
    B, nh, nkv = 16, 6, 2
    assert B * nkv >= attention.KMAJOR_ROWS
    q, k, v = qkv(B=B, nh=nh, nkv=nkv, L=11, dtype=torch.bfloat16)
    mask = torch.ones(B, 11, dtype=torch.long)
    mask[3, :5] = 0
    bias = torch.randn(B, nh, 1, 11) if per_head else causal_padding_bias(mask, 1, torch.float32)
    want = sdpa(q.float(), k.float(), v.float(), bias)
    got = decode_attention(q, k, v, bias.bfloat16(), None)
    assert calls and got.dtype == torch.bfloat16
    g = nh // nkv
    scores = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * q.shape[-1] ** -0.5  # eager: bf16 scores
    probs = torch.softmax(scores.float() + bias, -1).bfloat16()
    eager = (probs @ v.repeat_interleave(g, 1)).transpose(1, 2).reshape(B, 1, -1)
    err = (got.float() - want).norm() / want.norm()
    assert err <= 1.5 * (eager.float() - want).norm() / want.norm() + 1e-3


@pytest.mark.parametrize("L", [9, 5])  # most of the buffer in use (full-buffer product) / under half (prefix)
def test_kmajor_ignores_positions_past_the_context(monkeypatch, L):
    """The K-major form may multiply the whole cache buffer: rows past L (NaN in K, other finite
    values in V) change nothing."""
    import executors.attention as attention

    monkeypatch.setattr(attention, "KMAJOR_ROWS", 1)
    q, k, v = qkv(B=2, L=12, S_max=12, dtype=torch.bfloat16)
    k, v = k.clone(), v.clone()
    bias = torch.zeros(2, 1, 1, L)
    bias[1, ..., :2] = torch.finfo(torch.float32).min
    want = decode_attention(q, k[:, :, :L].contiguous(), v[:, :, :L].contiguous(), bias, None)
    k[:, :, L:] = float("nan")
    v[:, :, L:] = 1e4
    torch.testing.assert_close(decode_attention(q, k, v, bias, None, L), want)
