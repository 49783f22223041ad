"""Sizes of graphgen's compressed format (group-wise asymmetric quantisation, executors/quant.py),
computed from shapes alone: what the compress pass, the cost model and the optimiser need,
without the runtime."""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

BITS = (4, 8)
META_DTYPE = torch.bfloat16  # per-group min and scale (see executors/quant.py)
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's _weight_int4pack_mm_for_cpu takes


STORED8_KERNEL_ROWS = 32  # a checkpoint's 8-bit (Q8_0) matrix on the int4 kernel up to this many rows (the
# head's rows = the GPU batch); above, dequantise + GEMM is faster (benchmarks/bench_packed_kernels.py)


def kernel_packable(layer, comp, dtype: torch.dtype = torch.float32, rows: int = 1) -> bool:
    """Whether every compressed matrix of `layer` has a packed CPU kernel format (executors/packed.py):
    groups along the input (last) dim; 4-bit also groups the kernel takes that divide it, and an
    output dim that is a multiple of 16. The embedding (row lookups) keeps graphgen's format.
    A layer kept in a checkpoint's exact compression (a GGUF's Q4_0 / Q4_1 / Q8_0: layer.stored)
    goes on the int4 kernel only in bfloat16 (its scales rounded to bfloat16, a rounding like the
    dense bf16 path's own; float32 stays exact: dequantised), 8-bit as two int4 halves
    (stored_split) and only for at most STORED8_KERNEL_ROWS rows."""
    if comp is None:
        return False
    bits, gs, gd = comp
    embed, stored = layer.kind == "embed", comp == getattr(layer, "stored", None)
    if stored and not embed and (dtype != torch.bfloat16 or (bits == 8 and rows > STORED8_KERNEL_ROWS)):
        return False
    int4 = bits == 4 or stored
    for w in layer.weights:
        if not (w.compressible and len(w.shape) >= 2):
            continue
        if len(w.shape) != 2 or gd % 2 != 1:
            return False
        if not embed and int4 and (gs not in INT4_KERNEL_GROUPS or w.shape[1] % gs or w.shape[0] % 16):
            return False
    return True


def stored_split(layer, comp) -> bool:
    """A checkpoint's 8-bit matrices on the int4 kernel: each code c = 16 hi + lo, two int4 halves."""
    return comp is not None and comp[0] == 8 and layer.kind != "embed" and comp == getattr(layer, "stored", None)


def packed_nbytes(shape: Sequence[int], comp, split: bool) -> int:
    """Bytes of one matrix on the packed kernels: graphgen's size, or two 4-bit halves (stored_split)."""
    bits, gs, gd = comp
    return 2 * quantized_nbytes(shape, 4, gs, gd) if split else quantized_nbytes(shape, bits, gs, gd)


def grouped_shapes(shape: Sequence[int], bits: int, group_size: int,
                   group_dim: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Stored shapes (data, mins/scales) of a tensor of `shape`, group_dim normalised."""
    shape = tuple(shape)
    gd = _check_args(shape, bits, group_size, group_dim)
    ng = -(-shape[gd] // group_size)
    pre, post = shape[:gd], shape[gd + 1:]
    return pre + (ng, group_size * bits // 8) + post, pre + (ng, 1) + post


def quantized_nbytes(shape: Sequence[int], bits: int, group_size: int = 64, group_dim: int = -1,
                     meta_dtype: torch.dtype = META_DTYPE) -> int:
    """Bytes a QTensor of `shape` occupies, computed from sizes alone."""
    dshape, mshape = grouped_shapes(shape, bits, group_size, group_dim)
    return math.prod(dshape) + 2 * math.prod(mshape) * _itemsize(meta_dtype)


def _check_args(shape: Tuple[int, ...], bits: int, group_size: int, group_dim: int) -> int:
    """Validate a quantisation request; returns group_dim normalised to >= 0."""
    if bits not in BITS:
        raise ValueError(f"compression bits={bits} is not supported: use 4 or 8 "
                         "(policy.compress_weight.bits / policy.compress_cache.bits)")
    if group_size < 1 or (bits == 4 and group_size % 2):
        raise ValueError(f"group_size={group_size} must be a positive{' even' if bits == 4 else ''} "
                         "integer (4-bit packs two codes per byte); 64 is the usual choice")
    if not -len(shape) <= group_dim < len(shape):
        raise ValueError(f"group_dim={group_dim} is out of range for a tensor of shape {list(shape)}")
    return group_dim % len(shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
