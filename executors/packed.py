"""Compressed weights computed on as they are (CPU): no dense copy of a layer per run.

On a CPU device a compressed layer's matrices are kept in the format of torch's packed kernels,
and the model's F.linear / F.embedding calls run on them (PackedWeight.__torch_function__):
- 4-bit: graphgen's group-wise scheme (FlexGen's: per group of the input dim a min and a scale,
  codes 0..15; executors/quant.py), its codes repacked by _convert_weight_to_int4pack_for_cpu and
  its (scale, min + 8 * scale) pairs as the kernel's scales_and_zeros [K / G, N, 2]: computed by
  _weight_int4pack_mm_for_cpu. The zero point min + 8 * scale is rounded to bfloat16 once.
- 8-bit: per-output-channel symmetric int8 (the kernel's scheme, not group-wise), computed by
  _weight_int8pack_mm.
- the embedding layer keeps graphgen's group-wise format and dequantises only the rows looked up.
- a checkpoint's exact compression (a GGUF's layers, layer.stored), in bfloat16 only: Q4_0 / Q4_1
  (value = min + d * code, groups of 32) on the int4 kernel with scale d, zero min + 8d; Q8_0
  (codes 0..255 as stored, value = min + d * code) as two int4 halves side by side ([N, 2K]: high
  nibble with scale 16d and zero min + 128d, low nibble with d and 8d; the input twice, [M, 2K]),
  for at most quant_format.STORED8_KERNEL_ROWS rows; its embedding as stored (row lookups, exact).
  d and the zeros are rounded to bfloat16 once (the dense bf16 path rounds every weight the same
  way); float32 keeps the exact dequantising path (quant_format.kernel_packable).
Dense bf16 layers that live on the (CPU) device are reordered once into oneDNN's blocked layout
(prepack) and computed by mkldnn._linear_pointwise: F.linear would reorder them on every call.
Its results are bit-identical to F.linear's (float32 layers are never prepacked: exactness).
Stored bytes: 4-bit exactly graphgen's; 8-bit N*K + 2N (under the group-wise size the plan counts);
Q8_0 as two halves 1.25 N*K (quant_format.packed_nbytes). dense() (prefill above INT4_KERNEL_ROWS)
unpacks the int4 kernel's layout, bit-identical to what the kernel computes with.
A layer is packed when all its compressed matrices fit the kernels (4-bit: groups of 32..256 along
the input dim that divide it, N a multiple of 16); otherwise it takes the dequantising path
(executors/compressed.py), as does every layer with executor.packed_weights=false or on a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from graphgen.costs import is_compressed
from graphgen.models.base import fused_name
from graphgen.quant_format import kernel_packable

from .quant import QTensor, _unpack, dequantize, quantize

# Above these rows a dense copy + one bf16 GEMM is faster than the kernel, whose time grows with the
# rows (benchmarks/bench_packed_kernels.py, 2 threads, SmolLM2's matrices, docs/compression.md):
INT4_KERNEL_ROWS = 192  # 1536x576: kernel 1.33 / 2.60 ms, unpack + GEMM 1.68 / 2.08 ms at 128 / 256 rows
INT8_KERNEL_ROWS = 32  # 1536x576: kernel 0.22 / 0.77 ms, dequantise + GEMM 0.36 / 0.52 ms at 16 / 64 rows
packable = kernel_packable  # the compress pass decides with the same rule (w_packed)
_scope = threading.local()  # .dense: {id: (PackedWeight, dense matrix)} inside reuse_dense(), else absent


@contextlib.contextmanager
def reuse_dense():
    """Within: a matrix's dense copy (a GEMM above the kernels' rows, i.e. prefill) is made once and
    reused by the square's later calls, then dropped. A square computed in chunks of sequences
    (models.base.in_row_chunks) would otherwise unpack each matrix once per chunk: SmolLM2 4-bit,
    batch 64 x 128, prefill 1604 tok/s against 2514 for 8-bit. Holds at most the square's own
    matrices, dense, until it ends."""
    outer = getattr(_scope, "dense", None)
    _scope.dense = {} if outer is None else outer
    try:
        yield
    finally:
        _scope.dense = outer


def pack(layer, w, x: Optional[torch.Tensor], comp, stored: Optional[Dict[str, torch.Tensor]] = None
         ) -> Dict[str, torch.Tensor]:
    """A float32 matrix [N, K], or the parts {data, mins, scales} a checkpoint stores it in exactly
    (`stored`, graphgen's group-wise layout: a GGUF's Q4_0 / Q4_1 / Q8_0), -> its stored parts {name@part: tensor}."""
    bits, gs, gd = comp
    if bits == 8 and stored is None and layer.kind != "embed":  # per-channel symmetric int8
        scale = (x.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        scale = _round_up(scale, torch.bfloat16)
        codes = (x / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return {f"{w.name}@int8": codes, f"{w.name}@scale": scale}
    if stored is not None:
        q = QTensor(stored["data"], stored["mins"], stored["scales"], tuple(w.shape), torch.float32, bits, gs, 1)
    else:
        q = quantize(x, bits, gs, gd)  # data [N, K/G, G*bits/8], mins / scales [N, K/G, 1]
    if layer.kind == "embed":  # graphgen's format; rows are dequantised where looked up
        return {f"{w.name}@data": q.data, f"{w.name}@mins": q.mins, f"{w.name}@scales": q.scales}
    d, mn = q.scales.float()[..., 0], q.mins.float()[..., 0]  # [N, K/G]: value = mn + d * code
    if bits == 8:  # a checkpoint's codes c = 16 hi + lo: two int4 halves side by side, [N, 2K]
        return {f"{w.name}@int4x2": _int4pack(torch.cat([q.data >> 4, q.data & 15], 1)),
                f"{w.name}@sz": torch.cat([_scales_zeros(16 * d, mn + 128 * d), _scales_zeros(d, 8 * d)], 0)}
    return {f"{w.name}@int4": _int4pack(_unpack(q.data, 1, 4)), f"{w.name}@sz": _scales_zeros(d, mn + 8 * d)}


def _int4pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, ng, G] (groups along the input dim) -> the int4 kernel's packed weight."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(codes.shape[0], -1).to(torch.int32), 1)


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, K/G] float32 -> the kernel's scales_and_zeros [K/G, N, 2] in bf16 (rounded once); the
    kernel computes value = (code - 8) * scale + zero, so graphgen's min + scale * code has
    zero = min + 8 * scale, and an 8-bit code's high nibble (x16) carries the min, its low one none."""
    return torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def prepack(layer, value: Dict[str, torch.Tensor], batch: int, groups=()) -> Dict[str, torch.Tensor]:
    """A dense bf16 layer's matrices reordered once into oneDNN's blocked layout (no per-call
    reorder). Each group of linears on one input (ModelSpec.fused_linears) present in the layer
    becomes one matrix (and one bias), under fused_name: one GEMM instead of several."""
    value = dict(value)
    for names in groups:
        ws = [value.get(f"{n}.weight") for n in names]
        if any(t is None or t.dim() != 2 for t in ws):
            continue
        bs = [value.pop(f"{n}.bias", None) for n in names]
        for n in names:
            del value[f"{n}.weight"]
        value[fused_name(names)] = torch.cat(ws)
        if any(b is not None for b in bs):
            value[fused_name(names, "bias")] = torch.cat([torch.zeros(t.shape[0], dtype=t.dtype) if b is None else b
                                                          for t, b in zip(ws, bs)])
    return {n: torch.ops.mkldnn._reorder_linear_weight(t, batch) if t.dim() == 2 else t for n, t in value.items()}


def can_prepack(layer, dtype: torch.dtype) -> bool:
    """bf16 layers used through F.linear (not the embedding's lookups), where torch has oneDNN."""
    return dtype == torch.bfloat16 and layer.kind != "embed" and torch.backends.mkldnn.is_available()


def wrap(layer, value: Dict[str, torch.Tensor], comp, dtype: torch.dtype) -> Dict[str, object]:
    """The stored parts of a packed layer -> {name: tensor or PackedWeight}, for the model's compute."""
    out: Dict[str, object] = {}
    rows = {w.name: w.shape[0] for w in layer.weights}
    for name, v in value.items():
        if v.layout == torch._mkldnn:  # prepacked bf16; a fused group knows its members' rows
            parts = [rows[f"{n}.weight"] for n in name[:-len(".weight")].split("+")]
            out[name] = PackedWeight("onednn", tuple(v.shape), dtype, v, parts=parts)
        elif "+" in name:  # a fused group's bias
            out[name] = v
    for w in layer.weights:
        dense = not is_compressed(w) or comp is None
        if w.name in out or (dense and w.name not in value):
            continue  # prepacked above, or fused into a group
        if dense:
            out[w.name] = value[w.name]
        elif f"{w.name}@int4" in value:
            out[w.name] = PackedWeight("int4", w.shape, dtype, value[f"{w.name}@int4"], value[f"{w.name}@sz"], comp[1])
        elif f"{w.name}@int4x2" in value:
            out[w.name] = PackedWeight("int4x2", w.shape, dtype, value[f"{w.name}@int4x2"], value[f"{w.name}@sz"],
                                       comp[1])
        elif f"{w.name}@int8" in value:
            out[w.name] = PackedWeight("int8", w.shape, dtype, value[f"{w.name}@int8"], value[f"{w.name}@scale"])
        else:
            q = QTensor(value[f"{w.name}@data"], value[f"{w.name}@mins"], value[f"{w.name}@scales"],
                        tuple(w.shape), dtype, comp[0], comp[1], comp[2] % 2)
            out[w.name] = PackedWeight("group", w.shape, dtype, q)
    return out


class PackedWeight:
    """A compressed matrix [N, K] that F.linear and F.embedding compute on without a dense copy."""

    def __init__(self, kind: str, shape, dtype: torch.dtype, a, b=None, group: int = 0, parts=None):
        self.kind, self.shape, self.dtype, self.a, self.b, self.group = kind, tuple(shape), dtype, a, b, group
        self.parts = parts or [self.shape[0]]  # rows of each linear fused into this matrix

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            return args[1].linear(args[0], args[2] if len(args) > 2 else kwargs.get("bias"))
        if func is F.embedding and kwargs.get("max_norm") is None:  # (F.embedding passes its defaults)
            return args[1].rows(args[0])
        args = [a.dense() if isinstance(a, PackedWeight) else a for a in args]  # anything else: dense
        return func(*args, **kwargs)

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        if self.kind == "group":
            return F.linear(x, self.dense(), bias)
        if self.kind == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.a, bias, "none", [], "")
        x2 = x.reshape(-1, self.shape[1])
        if self.kind in ("int4", "int4x2") and x2.shape[0] > INT4_KERNEL_ROWS:  # prefill: dense copy + one GEMM
            y = F.linear(x2, self.dense_for_gemm(x.dtype))
        elif self.kind in ("int4", "int4x2"):
            y = self._int4(x2)
        elif x2.shape[0] <= INT8_KERNEL_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.a, self.b.to(x.dtype))
        else:  # the int8 kernel is a loop of GEMVs (time grows with the rows): dequantise, one GEMM
            y = F.linear(x2, self.dense_for_gemm(x.dtype))
        y = y.view(*x.shape[:-1], self.shape[0])
        return y if bias is None else y + bias

    def dense_for_gemm(self, dtype: torch.dtype) -> torch.Tensor:
        """dense() in dtype, made once per reuse_dense() scope."""
        cache = getattr(_scope, "dense", None)
        if cache is None:
            return self.dense().to(dtype)
        hit = cache.get(id(self))
        if hit is None or hit[1].dtype != dtype:
            hit = cache[id(self)] = (self, self.dense().to(dtype))  # the object itself keeps its id unique
        return hit[1]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """F.embedding: ids [...] -> [..., K], dequantising the rows looked up only."""
        if self.kind != "group":
            return F.embedding(ids, self.dense())
        flat = ids.reshape(-1)
        q = self.a
        sub = QTensor(q.data[flat], q.mins[flat], q.scales[flat], (flat.numel(), self.shape[1]), self.dtype,
                      q.bits, q.group_size, q.group_dim)
        return dequantize(sub, self.dtype).view(*ids.shape, self.shape[1])

    def dense(self) -> torch.Tensor:
        """The whole matrix in the compute dtype (a fallback: ops other than linear / embedding)."""
        if self.kind == "group":
            return dequantize(self.a, self.dtype)
        if self.kind == "int8":
            return self.a.to(self.dtype) * self.b.to(self.dtype)[:, None]
        if self.kind.startswith("int4") and _layout_known(*self.a.shape):
            return self._unpacked()
        eye = torch.eye(self.shape[1], dtype=self.dtype)  # [K, K] through the kernel: the matrix, transposed
        return (self._int4(eye) if self.kind.startswith("int4") else self.linear(eye, None)).t().contiguous()

    def _unpacked(self) -> torch.Tensor:
        """int4 / int4x2 -> [N, K] in the compute dtype from the packed codes, as the kernel computes
        them ((code - 8) * scale + zero, float32), rows in cache-sized chunks."""
        N, K = self.shape
        out = torch.empty(N, K, dtype=self.dtype)
        ng = self.b.shape[0]  # groups along the packed input dim (2K for int4x2)
        for r in range(0, N, UNPACK_ROWS):  # UNPACK_ROWS: a multiple of the layout's 64-row blocks
            n = min(UNPACK_ROWS, N - r)
            codes = _unpack_int4pack(self.a[r:r + n], n)  # packed rows r.. (64-row blocks)
            sz = self.b[:, r:r + n].float().permute(1, 0, 2)  # [n, ng, 2]
            v = (codes.view(n, ng, -1).float() - 8).mul_(sz[..., :1]).add_(sz[..., 1:]).view(n, -1)
            out[r:r + n] = v[:, :K] + v[:, K:] if self.kind == "int4x2" else v
        return out

    def _int4(self, x2: torch.Tensor) -> torch.Tensor:
        """[M, K] -> [M, N] on the packed codes (the kernel wants its scales in the input's dtype);
        int4x2: the input twice, [M, 2K], against the high and low halves of the 8-bit codes."""
        if self.kind == "int4x2":
            x2 = torch.cat([x2, x2], -1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.a, self.group, self.b.to(x2.dtype))


UNPACK_ROWS = 1024


def _unpack_int4pack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The CPU int4 kernel's packed weight (rows a multiple of 64: [N/64, K, 32] bytes, byte j of a
    block row holding row j's code low and row j + 32's high) -> uint8 codes [N, K]."""
    q = packed.view(n // 64, -1, 32)
    return torch.cat([q & 15, q >> 4], 2).transpose(1, 2).reshape(n, -1)


@functools.lru_cache(maxsize=None)
def _layout_known(rows: int, half_k: int) -> bool:
    """Whether this torch packs an [rows, 2 * half_k] int4 matrix as _unpack_int4pack reads it
    (checked once per shape on known codes; otherwise dense() goes through the kernel itself)."""
    if rows % 64:
        return False
    n = min(rows, 128)
    codes = torch.randint(0, 16, (n, 2 * half_k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return tuple(p.shape) == (n, half_k) and torch.equal(_unpack_int4pack(p, n).int(), codes)


def _round_up(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r = v.to(dtype)
    return torch.where(r.float() < v, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
