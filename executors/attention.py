"""Attention glue of an attention square: projections, the KV cache read in place, the core.

The dense KV cache of an in-memory tier is allocated head-major, [2, B, nkv, S_max, d], and seen
through the sequence-major view [2, S_max, B, nkv, d] every tier shares (executors/tiers.py):
a square whose cache lives where its attention runs writes its new K/V into the cache and
attends over the prefix view [2, B, nkv, L, d] in place: no per-step copy of the prefix.
(The square's store op then finds that slice already in place and copies nothing: the graph's
store keeps its meaning for the tiers, the planner and the async executor's ordering.) A prefix
loaded from another tier, or stored compressed, is joined with the new slice into a reused
scratch buffer as before.

Decode (one new token) on the CPU runs matmul attention over the cache read in place, the
grouped-query heads of a KV head as one [group, d] matrix (K/V never expanded), softmax in
float32. SDPA's CPU kernel at q length 1 costs ~10x more (docs/performance.md). Two forms,
measured on decode_attention alone (SmolLM2 shapes, 1 thread, per layer): a float32 cache, or a
batch of fewer than KMAJOR_ROWS sequence x KV-head pairs, gets float32 scores from float32 copies
of K/V taken in cache-sized chunks (batch 1: 0.031 ms against 0.047); a larger bf16 batch
multiplies the cache as it is, K as the left operand and the whole buffer when the context fills
half of it or more (the bf16 batched GEMM copies an operand sliced out of a longer buffer), so
its scores are rounded to bf16 as in transformers' eager attention (batch 16, context 272 of 288:
0.21 ms against 0.42; batch 64, 160 of 192: 0.45 against 0.99).
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional

import torch

from graphgen.models.base import in_row_chunks

from . import compressed as cq


class AttentionGlue:
    """Per-block state of the attention squares: the shared bias per GPU batch, the scratch."""

    def __init__(self, spec, max_len: int):
        self.spec, self.max_len = spec, max_len
        self._bias: Dict = {}  # GPU batch -> (key, attention bias of its current step)
        self._scratch: Dict = {}

    def square(self, tiers, n, a, w, h: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor,
               device: torch.device) -> torch.Tensor:
        """One attention square: hidden [B, s, H] -> hidden [B, s, H]; its new K/V put in the
        attention tier as ("kvnew", j, k, i) for the store op. mask: the batch's [B, L] mask."""
        i, j, k = n
        L, s = a["ctx"], a["s"]
        where = tiers[a["attn_device"]]
        comp = a.get("kv_compressed")
        # q [B,nh,s,d], k/v [B,nkv,s,d]
        q, k_new, v_new = in_row_chunks(partial(self.spec.attn_qkv, w), h, pos, whole=self.spec.batch_wide)
        kv = self.cache_view(where, a, (j, k), L, s, k_new, v_new) if comp is None and L > s else None
        if kv is None:
            new = torch.stack([k_new, v_new]).permute(0, 3, 1, 2, 4).to(where.device)  # [2, s, B, nkv, d]
            kv = self.joined(where, a, (j, k), L, s, new, comp)  # [2, B, nkv, L, d]
        else:  # written in place: the store op finds its slice already there (Tier.write_slice)
            new = where.get(("kv", j, k))[:, L - s:L]
        mask = mask.to(where.device)
        bias = self.attn_bias(k, mask, s, q.dtype)
        q = q.to(where.device)
        if s == 1 and where.device.type == "cpu":
            ctx = decode_attention(q, kv[0], kv[1], bias, self.spec.attn_scale, L)
        else:
            ctx = self.spec.attn_core(q, kv[0][:, :, :L], kv[1][:, :, :L], mask, bias)
        where.put(("kvnew", j, k, i), cq.compress_slice(new, comp))  # stored (and moved) compressed
        return in_row_chunks(lambda h_, ctx_: self.spec.attn_out(w, ctx_, h_), h, ctx.to(device))

    def cache_view(self, where, a, jk, L: int, s: int, k_new: torch.Tensor, v_new: torch.Tensor
                   ) -> Optional[torch.Tensor]:
        """The cache at home, with the new K/V [B, nkv, s, d] written in, as [2, B, nkv, S_max, d]
        (a view: the first L positions are the context); None when the prefix is not read in place
        or the layout is not head-major."""
        if a["kv_buf"] is not None:
            return None
        kv = where.get(("kv",) + jk).permute(0, 2, 3, 1, 4)  # of the [2, S_max, B, nkv, d] view
        if kv.stride(-1) != 1 or kv.stride(-2) != kv.shape[-1]:  # sequence-major: join instead
            return None
        kv[0, :, :, L - s:L].copy_(k_new)
        kv[1, :, :, L - s:L].copy_(v_new)
        return kv

    def joined(self, where, a, jk, L: int, s: int, new: torch.Tensor, comp) -> torch.Tensor:
        """The stored prefix (dequantised when compressed) and the new slice in one head-major
        buffer [2, B, nkv, L, d]."""
        if L == s:  # nothing cached before this step
            return new.permute(0, 2, 3, 1, 4)
        prefix = where.get(a["kv_buf"]) if a["kv_buf"] else cq.read_prefix(where, ("kv",) + jk, L - s, comp)
        b_, nkv, d = new.shape[2:]
        kv = self.scratch((2, b_, nkv, L, d), new.dtype, new.device)
        cq.dense_into(kv[:, :, :, :L - s].permute(0, 3, 1, 2, 4), prefix, comp)
        kv[:, :, :, L - s:] = new.permute(0, 2, 3, 1, 4)
        return kv

    def attn_bias(self, k: int, mask: torch.Tensor, s: int, dtype: torch.dtype):
        """The attention bias of GPU batch k at this step, built once and shared by every layer."""
        key = (mask.shape[1], s, mask.device, dtype)
        if self._bias.get(k, (None,))[0] != key:
            self._bias[k] = (key, self.spec.attn_bias(mask, s, dtype))
        return self._bias[k][1]

    def scratch(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A reused buffer (a fresh large CPU allocation page-faults on every touch): the joined
        K/V of one attention square, [2, B, nkv, L, d]; sized for the longest context once."""
        n = 1
        for x in shape:
            n *= x
        buf = self._scratch.get(device)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            full = n // shape[3] * self.max_len  # the same square at the block's last step
            buf = self._scratch[device] = torch.empty(max(n, full), dtype=dtype, device=device)
        return buf[:n].view(shape)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                     scale: Optional[float], L: Optional[int] = None) -> torch.Tensor:
    """q [B, nh, 1, d], k/v [B, nkv, S, d] (each head's [S, d] contiguous) of which the first L
    (default S) positions are the context, bias None or [B, 1 | nh, 1, L] -> ctx [B, 1, nh*d] in
    q's dtype. Positions past L are never attended; V's must hold finite values (the cache is
    zero-filled when allocated). Softmax in float32; the query heads of a KV head as one
    [group, d] matrix (no K/V expansion)."""
    B, nh, _, d = q.shape
    nkv, S = k.shape[1], k.shape[2]
    L = S if L is None else L
    g = nh // nkv
    scale = d ** -0.5 if scale is None else scale
    if bias is not None:  # [B, 1, 1, L] (padding, causal) or [B, nh, 1, L] (ALiBi) -> [B*nkv, g | 1, L]
        bias = bias.reshape(B * nkv, g, L) if bias.shape[1] > 1 else bias.view(B, 1, L).repeat_interleave(nkv, 0)
    if k.dtype != torch.float32 and B * nkv >= KMAJOR_ROWS:
        if 2 * L < S:  # mostly unused rows: multiply the prefix (which the batched GEMM copies)
            k, v, S = k[:, :, :L], v[:, :, :L], L
        qs = (q * scale).reshape(B * nkv, g, d)  # (scaled first: the product is contiguous, no clone)
        return _kmajor(qs, k.reshape(B * nkv, S, d), v.reshape(B * nkv, S, d), bias, L).view(B, 1, nh * d)
    qf = (q.float() * scale).reshape(B * nkv, g, d)  # a new tensor (q may be float32 already), contiguous
    ks, vs = k[:, :, :L].reshape(B * nkv, L, d), v[:, :, :L].reshape(B * nkv, L, d)  # views of the cache
    out = torch.empty(B * nkv, g, d, dtype=q.dtype, device=q.device)
    step = max(1, TEMP_BYTES // (2 * L * d * 4))
    for c in range(0, B * nkv, step):
        sl = slice(c, c + step)
        scores = torch.bmm(qf[sl], ks[sl].float().transpose(1, 2))  # [n, g, L]
        if bias is not None:
            scores.add_(bias[sl])
        out[sl] = torch.bmm(torch.softmax(scores, -1), vs[sl].float())
    return out.view(B, 1, nh * d)


def _kmajor(q: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, bias: Optional[torch.Tensor], L: int) -> torch.Tensor:
    """q [n, g, d] scaled, ks / vs [n, S, d] contiguous in the cache's dtype, the first L rows the
    context -> [n, g, d]: scores K @ q^T (rounded to the cache's dtype) over all S rows (rows past
    L are dropped: a row of the product depends on its own row of K only), softmax in float32,
    probabilities (zero past L) @ V."""
    n, g, _ = q.shape
    S = ks.shape[1]
    scores = torch.empty(n, g, L, dtype=torch.float32, device=q.device)
    scores.copy_(torch.bmm(ks, q.transpose(1, 2))[:, :L].transpose(1, 2))  # [n, S, g] -> [n, g, L]
    if bias is not None:
        scores.add_(bias)
    probs = torch.softmax(scores, -1)
    if S == L:
        return torch.bmm(probs.to(vs.dtype), vs)
    full = torch.zeros(n, g, S, dtype=vs.dtype, device=q.device)
    full[:, :, :L] = probs
    return torch.bmm(full, vs)


KMAJOR_ROWS = 8  # sequence x KV-head pairs from which a bf16 cache is multiplied as it is (measured above)
TEMP_BYTES = 32 << 20  # float32 K/V of the decode attention's chunk: cache-sized, outside the plan
