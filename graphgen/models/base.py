"""Architecture spec: the layers of a model, their weights, and their compute.

A model is a list of *layers*, the units of placement in the graph:
    embed, (attn, mlp) x num_hidden_layers, head
Each layer lists its weights (checkpoint name, shape) so passes can reason about
bytes without loading anything, and the family's compute functions run one layer
for one GPU batch. Families subclass ModelSpec and override the compute hooks.

Tensor conventions (B = gpu batch, s = new tokens this step, L = context length):
    hidden     [B, s, H]
    q          [B, nh, s, d]      k, v  [B, nkv, s, d]
    kv cache   [2, S_max, B, nkv, d]  (sequence-major, so a prefix is contiguous on disk)
    mask       [B, L] long, 1 = real token, 0 = left padding
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class WeightSpec:
    name: str  # local name inside the layer, e.g. "q_proj.weight"
    source: str  # checkpoint tensor name, e.g. "model.decoder.layers.3.self_attn.q_proj.weight"
    shape: Tuple[int, ...]
    init: str = "normal"  # dummy weights: normal | ones | zeros
    compressible: bool = True  # matrices yes; biases and norms stay uncompressed

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class LayerSpec:
    kind: str  # embed | attn | mlp | head
    index: int  # j: position in the model's layer list (graph layer coordinate)
    block: int  # decoder block number (-1 for embed/head)
    weights: List[WeightSpec] = field(default_factory=list)
    # compression the checkpoint already stores every matrix of the layer in, exactly
    # ((bits, group_size, group_dim), e.g. a GGUF's Q4_1); the compress pass keeps it
    stored: Optional[Tuple[int, int, int]] = None

    @property
    def numel(self) -> int:
        return sum(w.numel for w in self.weights)


ARCH_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "ffn_dim", "max_position_embeddings")


def check_arch(c: Any) -> None:
    """Architecture numbers that would build a broken model (no layers, no heads) are refused,
    naming where they came from (a checkpoint's config.json, else model.arch)."""
    src = getattr(c, "_name_or_path", "")
    where = f"{src}/config.json" if src else "model.arch"
    for key in ARCH_POSITIVE:
        v = getattr(c, key, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{where}: {key}={v!r} must be a positive integer")
    heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if not getattr(c, "head_dim", None) and c.hidden_size % heads:
        raise ValueError(f"{where}: hidden_size={c.hidden_size} is not a multiple of num_attention_heads={heads}")
    if heads % kv:
        raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")


class ModelSpec:
    """Base spec: shapes from an HF config; families override the compute hooks."""

    family = "base"

    def __init__(self, hf_config: Any, name: str = ""):
        self.hf_config = hf_config
        self.name = name or getattr(hf_config, "_name_or_path", "") or self.family
        c = hf_config
        check_arch(c)
        self.vocab_size = c.vocab_size
        self.hidden_size = c.hidden_size
        self.num_blocks = c.num_hidden_layers
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = getattr(c, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(c, "head_dim", None) or self.hidden_size // self.num_heads
        self.ffn_dim = getattr(c, "ffn_dim", None) or getattr(c, "intermediate_size", None) or 4 * c.hidden_size
        self.max_positions = getattr(c, "max_position_embeddings", None) or 2048
        self.eos_token_id = _first_id(getattr(c, "eos_token_id", None))
        self.pad_token_id = _first_id(getattr(c, "pad_token_id", None))
        self.layers: List[LayerSpec] = self.build_layers()

    # --- structure -------------------------------------------------------
    def build_layers(self) -> List[LayerSpec]:
        layers = [LayerSpec("embed", 0, -1, self.embed_weights())]
        for b in range(self.num_blocks):
            layers.append(LayerSpec("attn", len(layers), b, self.attn_weights(b)))
            layers.append(LayerSpec("mlp", len(layers), b, self.mlp_weights(b)))
        layers.append(LayerSpec("head", len(layers), -1, self.head_weights()))
        return layers

    def embed_weights(self) -> List[WeightSpec]:
        raise NotImplementedError(f"{type(self).__name__} must list its embedding weights")

    def attn_weights(self, block: int) -> List[WeightSpec]:
        raise NotImplementedError(f"{type(self).__name__} must list its attention weights")

    def mlp_weights(self, block: int) -> List[WeightSpec]:
        raise NotImplementedError(f"{type(self).__name__} must list its MLP weights")

    def head_weights(self) -> List[WeightSpec]:
        raise NotImplementedError(f"{type(self).__name__} must list its output-head weights")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def act_dim(self, kind: str) -> int:
        """Width of the hidden tensor a layer of this kind outputs (GPT-NeoX's parallel attn: 2H)."""
        return self.hidden_size

    # --- compute hooks (w: local name -> tensor on the compute device) ---------
    def embed(self, w: Dict[str, torch.Tensor], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B, s] -> hidden [B, s, H]."""
        raise NotImplementedError

    def attn_qkv(self, w, h: torch.Tensor, positions: torch.Tensor):
        """hidden [B, s, H] -> q [B, nh, s, d], k/v [B, nkv, s, d] (norm, projections, rotary)."""
        raise NotImplementedError

    def attn_out(self, w, ctx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """ctx [B, s, nh*d], residual [B, s, H] -> hidden [B, s, H]."""
        raise NotImplementedError

    def mlp(self, w, h: torch.Tensor) -> torch.Tensor:
        """hidden [B, s, H] -> hidden [B, s, H] (norm, MLP, residual)."""
        raise NotImplementedError

    def head(self, w, h: torch.Tensor) -> torch.Tensor:
        """hidden of the last position [B, H] -> logits [B, V] in the compute dtype (graphgen.sampling
        converts to float32 where it needs to; greedy takes the argmax as it is, the same token:
        batch 64, SmolLM2's 49152 logits, bf16, 2.4 ms per step saved)."""
        raise NotImplementedError

    def attn_bias(self, mask: torch.Tensor, s: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """mask [B, L] -> additive bias [B, 1, s, L]: causal over the last s positions + padding.
        None without padding when the queries are the whole sequence (plain causal) or one token
        (attends to all): SDPA's causal kernel then skips the masked half, and nothing is built."""
        if (s == 1 or s == mask.shape[1]) and bool(mask.all()):
            return None
        return causal_padding_bias(mask, s, dtype)

    def attn_core(self, q, k, v, mask: torch.Tensor, bias=NotImplemented) -> torch.Tensor:
        """q [B, nh, s, d], k/v [B, nkv, L, d], mask [B, L] -> ctx [B, s, nh*d].
        bias: attn_bias(mask, s, q.dtype) when the caller has it (every layer shares it)."""
        if bias is NotImplemented:
            bias = self.attn_bias(mask, q.shape[2], q.dtype)
        return attend(q, k, v, bias, self.attn_scale)

    def linears(self, w, x: torch.Tensor, *names: str) -> List[torch.Tensor]:
        """F.linear of x by each named weight (and its bias). Where the executor fused the group
        into one matrix (FUSED, executors/packed.py), one GEMM whose output is split."""
        fused = w.get(fused_name(names))
        if fused is None:
            return [F.linear(x, w[f"{n}.weight"], w.get(f"{n}.bias")) for n in names]
        return list(F.linear(x, fused, w.get(fused_name(names, "bias"))).split(fused.parts, -1))

    fused_linears: Tuple[Tuple[str, ...], ...] = ()  # groups of linears on one input (see linears)
    # True where attn_qkv reads the whole batch (rotary tables scaled by the batch's longest
    # sequence, as HF's dynamic and longrope types): its squares are not split (in_row_chunks)
    batch_wide = False
    attn_scale = None  # None: 1/sqrt(head_dim) as SDPA does
    mlp_buffers = 2  # [B, s, ffn] intermediates alive at once in mlp() (gated MLPs: 3)


def fused_name(names: Sequence[str], part: str = "weight") -> str:
    """The key of a fused group's matrix (or bias): "q_proj+k_proj+v_proj.weight"."""
    return "+".join(names) + "." + part


# Prefill attention on a CPU in bfloat16 runs as blocks of scores (grouped_attention) from this many
# score elements (B * heads * s * L) on; below it SDPA's flash kernel, which is faster on tiny inputs
# (batch 1 x 64 tokens, 9 heads: 0.10 against 0.12 ms).
GROUPED_MIN_SCORES = 1 << 20
GROUPED_BLOCK_BYTES = 4 << 20  # scores per block: 2 and 8 MiB measured slower at (16, 256) and (4, 1024)


def takes_grouped(b: int, nh: int, s: int, L: int) -> bool:
    """Is a bf16 CPU attention of b x nh heads, s queries over L keys run by grouped_attention?
    (the memory plan counts its block of scores where it is: graphgen/costs.py)"""
    return s > 1 and b * nh * s * L >= GROUPED_MIN_SCORES


def attend(q, k, v, bias: Optional[torch.Tensor], scale: Optional[float] = None) -> torch.Tensor:
    """Attention of q [B, nh, s, d] over k/v [B, nkv, L, d] (nh a multiple of nkv, grouped heads as
    they are) -> ctx [B, s, nh*d]. bias: None for plain causal (s == L) or a single query,
    else additive [B, 1, s, L] (attn_bias). scale: None for 1/sqrt(d)."""
    b, nh, s, d = q.shape
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and takes_grouped(b, nh, s, k.shape[2]):
        return grouped_attention(q, k, v, bias, d ** -0.5 if scale is None else scale)
    # grouped K/V heads as they are (no repeat): the CPU flash kernel, batch 16 x 256 tokens, 9:3
    # heads: 28.8 ms against 32.9 with K/V repeated, the same output
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None and s > 1,
                                         scale=scale, enable_gqa=k.shape[1] != nh)
    return out.transpose(1, 2).reshape(b, s, nh * d)


def grouped_attention(q, k, v, bias: Optional[torch.Tensor], scale: float,
                      block_bytes: int = GROUPED_BLOCK_BYTES) -> torch.Tensor:
    """attend() as transformers' eager attention computes it, for a CPU in bfloat16: the scores
    q.k^T in bfloat16, scaled, masked, softmax accumulated in float32 and rounded, then p.v.

    The q heads that share a K/V head are stacked into one matrix, [B*nkv, s*group, d], so each
    block is two large batched GEMMs (oneDNN), where SDPA's CPU flash kernel multiplies 64-query
    tiles. A block is the queries whose scores fit block_bytes, against only the keys they can see:
    batch 16 x 256 tokens, 9:3 heads, 2 threads, 6.5 ms against SDPA's 15.6; (64, 128) 10.6 vs 19.9
    (benchmarks/bench_prefill_attention.py)."""
    B, nh, s, d = q.shape
    nkv, L = k.shape[1], k.shape[2]
    g = nh // nkv
    qg = q.reshape(B, nkv, g, s, d).transpose(2, 3).reshape(B * nkv, s * g, d)  # row = position * g + head
    kk, vv = k.reshape(B * nkv, L, d), v.reshape(B * nkv, L, d)
    out = torch.empty(B * nkv, s * g, d, dtype=q.dtype, device=q.device)
    past = L - s  # keys before the first query
    step = max(1, min(s, block_bytes // (B * nkv * g * L * q.element_size())))
    tri = None
    if bias is None:  # plain causal: mask only the block's diagonal square
        tri = torch.ones(step, step, dtype=torch.bool, device=q.device).triu_(1).repeat_interleave(g, 0)
    for p0 in range(0, s, step):
        p1 = min(s, p0 + step)
        n, end = p1 - p0, past + p1  # rows see keys [0, end)
        sc = torch.bmm(qg[:, p0 * g:p1 * g], kk[:, :end].transpose(1, 2))
        if scale != 1.0:
            sc.mul_(scale)
        if tri is not None:
            sc[:, :, past + p0:end].masked_fill_(tri[:n * g, :n], float("-inf"))
        else:  # keys from `end` on are masked for these rows (their weights would round to 0)
            sc.view(B, nkv, n, g, end).add_(bias[:, :, p0:p1, None, :end] if bias.shape[1] == 1 else
                                            bias.view(B, nkv, g, s, L)[:, :, :, p0:p1, :end].transpose(2, 3))
        torch.bmm(sc.softmax(-1), vv[:, :end], out=out[:, p0 * g:p1 * g])
    return out.view(B, nkv, s, g, d).permute(0, 2, 1, 3, 4).reshape(B, s, nh * d)


# The row-wise parts of a layer (norms, linears, rotary, activations, residual adds) run a few
# sequences at a time once a square holds more tokens than this on a CPU, so that each op's
# intermediates stay in cache between ops: the MLP of batch 64 x 128 tokens (SmolLM2, bf16,
# 2 threads) 48 ms in chunks of 512 tokens against 75 ms in one piece; 256 rows 58, 1024 48, 2048 49.
ROW_CHUNK_TOKENS = 512


def in_row_chunks(fn, h: torch.Tensor, *rest: torch.Tensor, rows: Optional[int] = None, whole: bool = False):
    """fn(h, *rest) for hidden h [B, s, H] whose every output (a tensor or a tuple of them) is
    indexed by sequence first and depends on its own sequence's rows only, computed for
    max(1, rows // s) sequences at a time on a CPU and joined; in one call elsewhere, or when h
    holds at most `rows` (default ROW_CHUNK_TOKENS) tokens or one sequence, or when `whole`
    (ModelSpec.batch_wide: the output depends on the whole batch). rest: tensors indexed by
    sequence first too."""
    rows = ROW_CHUNK_TOKENS if rows is None else rows
    b, s = h.shape[0], h.shape[1]
    if whole or h.device.type != "cpu" or b * s <= rows or b == 1:
        return fn(h, *rest)
    n = max(1, rows // s)
    outs = [fn(h[i:i + n], *(r[i:i + n] for r in rest)) for i in range(0, b, n)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def causal_padding_bias(mask: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    """mask [B, L] -> [B, 1, s, L] with 0 where attended, dtype-min where not."""
    b, L = mask.shape
    q_pos = torch.arange(L - s, L, device=mask.device)[:, None]  # (s, 1)
    k_pos = torch.arange(L, device=mask.device)[None, :]  # (1, L)
    allowed = (k_pos <= q_pos)[None, None] & mask[:, None, None, :].bool()  # (B, 1, s, L)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """HF generate's position ids: cumsum of the mask - 1, padding at 1."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill_(mask == 0, 1)


def _first_id(x):
    if isinstance(x, (list, tuple)):
        return x[0] if x else None
    return x
