"""Bytes and FLOPs of every square, from the model spec alone (nothing is loaded or run)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import base
from .models.base import GROUPED_BLOCK_BYTES, LayerSpec, ModelSpec


def dtype_of(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"model.dtype={name!r} is not supported: use float32, bfloat16 or float16") from None


@dataclass(frozen=True)
class Shape:
    """The block being generated: gpu batch B, prompt S, gen_len tokens, item bytes; a chat
    session's turn also has past_len tokens already in the cache, which holds cache_len."""

    batch: int
    prompt_len: int
    gen_len: int
    itemsize: int
    past_len: int = 0
    cache_len: int = 0  # 0: just this block (past + prompt + gen)
    score: bool = False  # prefill also scores every prompt position (log p of the next token)

    @property
    def max_len(self) -> int:
        return self.cache_len or self.past_len + self.prompt_len + self.gen_len

    def new_tokens(self, i: int) -> int:  # s: tokens computed at step i
        return self.prompt_len if i == 0 else 1

    def context(self, i: int) -> int:  # L: context length after step i
        return self.past_len + self.prompt_len + i


def weight_bytes(layer: LayerSpec, itemsize: int) -> int:
    return layer.numel * itemsize


def is_compressed(w) -> bool:
    """Weight compression quantises matrices the spec marks compressible; biases and norms stay dense."""
    return w.compressible and len(w.shape) >= 2


def act_bytes(spec: ModelSpec, layer: LayerSpec, sh: Shape, i: int) -> int:
    """Output of square (i, layer): hidden [B, s, act_dim]; the head outputs token ids."""
    if layer.kind == "head":
        return sh.batch * 8
    return sh.batch * sh.new_tokens(i) * act_dim(spec, layer.kind) * sh.itemsize


def act_dim(spec: ModelSpec, kind: str) -> int:
    return spec.act_dim(kind)


def kv_cache_bytes(spec: ModelSpec, sh: Shape) -> int:
    """Whole cache of one attention layer for one gpu batch: [2, S_max, B, nkv, d]."""
    return 2 * sh.max_len * sh.batch * spec.kv_dim * sh.itemsize


def kv_slice_bytes(spec: ModelSpec, sh: Shape, n_pos: int) -> int:
    return 2 * n_pos * sh.batch * spec.kv_dim * sh.itemsize


def flops(spec: ModelSpec, layer: LayerSpec, sh: Shape, i: int) -> float:
    """Matmul + attention FLOPs of square (i, layer)."""
    B, s, L = sh.batch, sh.new_tokens(i), sh.context(i)
    if layer.kind == "embed":
        return 0.0
    if layer.kind == "head":  # only the last position goes through the head (all of them when scoring)
        n = s + 1 if sh.score and i == 0 else 1
        return 2.0 * B * n * sum(w.numel for w in layer.weights if len(w.shape) == 2)
    matmul = 2.0 * B * s * sum(w.numel for w in layer.weights if len(w.shape) == 2)
    if layer.kind == "attn":
        matmul += 4.0 * B * spec.num_heads * s * L * spec.head_dim  # q.k and p.v
    return matmul


def workspace_bytes(spec: ModelSpec, layer: LayerSpec, sh: Shape, i: int) -> int:
    """Transient memory of computing the square, in the compute dtype: attention's q/k/v, the
    padding/causal bias, the context and its [B, s, H] copy, the joined KV prefix in decode, KV
    heads repeated for grouped-query attention; the MLP's two intermediates (three for gated
    MLPs); the head's float32 logits. SDPA's fused kernels (CPU flash, CUDA memory-efficient)
    never hold the [B, nh, s, L] scores (measured: opt-1.3b prefill B=8 s=512 peaks at 95 MB
    of workspace, where scores + softmax would be 268 MB more); a bf16 prefill on a CPU holds
    one block of them and its softmax, and q regrouped (models.base.grouped_attention)."""
    B, s, L, it = sh.batch, sh.new_tokens(i), sh.context(i), sh.itemsize
    if layer.kind == "attn":
        qkv_ctx = B * s * (3 * spec.hidden_size + 2 * spec.kv_dim) * it
        bias = B * s * L * it
        cat = 2 * B * L * spec.kv_dim * it if L > s else 0  # cached prefix + new slice joined
        gqa = 2 * B * L * spec.num_heads * spec.head_dim * it if spec.num_kv_heads != spec.num_heads else 0
        blocks, row = 0, B * spec.num_heads * L * it
        if base.takes_grouped(B, spec.num_heads, s, L):  # a block: up to GROUPED_BLOCK_BYTES of scores, >= 1 row
            blocks = 2 * min(row * s, max(GROUPED_BLOCK_BYTES, row)) + B * s * spec.hidden_size * it
        return qkv_ctx + bias + cat + gqa + blocks
    if layer.kind == "mlp":
        return spec.mlp_buffers * B * s * spec.ffn_dim * it
    if layer.kind == "head" and sh.score and i == 0:  # a chunk's logits + log-softmax, per-position results
        return 2 * B * score_chunk(B, spec.vocab_size, s) * spec.vocab_size * 4 + B * s * (4 + 1)
    if layer.kind == "head":
        return B * spec.vocab_size * 4 * 2
    return B * s * spec.hidden_size * it


SCORE_CHUNK_BYTES = 1 << 25  # float32 logits of one scoring chunk: 32 MiB, whatever the vocabulary


def score_chunk(batch: int, vocab: int, positions: int) -> int:
    """Positions whose logits are held at once when scoring: memory stays flat in vocab x length."""
    return max(1, min(positions, SCORE_CHUNK_BYTES // (4 * batch * vocab)))
