"""Group-wise asymmetric quantisation (FlexGen's scheme), 4 or 8 bits per value.

A tensor is cut into groups of `group_size` consecutive values along `group_dim`
(padded up to a multiple of group_size). Each group stores its min and its
scale = (max - min) / (2^bits - 1); a value becomes round((x - min) / scale),
clamped to [0, 2^bits - 1]. 4-bit codes are packed two per byte, 8-bit one per byte.

Stored layout ("grouped"): for x of shape pre + (n,) + post with n along group_dim,
    data   pre + (ng, group_size * bits / 8) + post   uint8
    mins   pre + (ng, 1) + post                       meta_dtype
    scales pre + (ng, 1) + post                       meta_dtype
with ng = ceil(n / group_size). Every dim other than group_dim keeps its index
range, so a slice along any other dim (the KV cache's sequence dim) is a plain view.
4-bit: byte j of a group holds code j in its low nibble and code j + G/2 in its high
nibble, so unpacking is one concat of two contiguous halves, not an interleave.

Min and scale are stored in bfloat16 by default: 2 bytes each keeps 4-bit weights at
28% of bf16 bytes (float32 metadata would be 31%), and bfloat16 has float32's range, so
large activations / KV values cannot overflow and tiny-range groups cannot underflow as
they would in float16. Its coarser mantissa costs no accuracy bound: the stored min is
rounded down and the stored scale up, and codes are computed against the stored values,
so |x - dequantize(quantize(x))| <= scale / 2 holds for the scale actually stored.
All math runs in float32 (never float16 on CPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from graphgen.quant_format import META_DTYPE, _check_args, _itemsize, grouped_shapes

FORMAT = "graphgen.qtensor.v1"
CHUNK_NUMEL = 1 << 20  # CPU: quantise / dequantise in blocks of ~1M values (cache-sized temporaries)
GPU_CHUNK_NUMEL = 1 << 24  # GPU: few kernel launches, float32 temporaries bounded to ~100 MB


def temp_nbytes(device_type: str = "cpu") -> int:
    """About the most scratch memory one quantize / dequantize call holds (beyond its output)."""
    # per value of a block, quantize: float32 copy (4) + padded copy (4) + float32 codes (4)
    # + uint8 codes (1) + packed (0.5); dequantize needs less (uint8 + float32 codes)
    return 16 * (CHUNK_NUMEL if device_type == "cpu" else GPU_CHUNK_NUMEL)


@dataclass
class QTensor:
    """A quantised tensor: packed codes + per-group min and scale, in the grouped layout."""

    data: torch.Tensor  # uint8, pre + (ng, G*bits/8) + post
    mins: torch.Tensor  # meta_dtype, pre + (ng, 1) + post
    scales: torch.Tensor  # meta_dtype, pre + (ng, 1) + post
    shape: Tuple[int, ...]  # original (unpadded) shape
    dtype: torch.dtype  # original dtype: what dequantize returns by default
    bits: int
    group_size: int
    group_dim: int  # normalised, >= 0

    @property
    def nbytes(self) -> int:
        """Exact bytes held: codes + mins + scales (what memory planning counts)."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.mins, self.scales))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def meta_dtype(self) -> torch.dtype:
        return self.mins.dtype

    def _map(self, fn) -> "QTensor":
        return replace(self, data=fn(self.data), mins=fn(self.mins), scales=fn(self.scales))

    def to(self, device, non_blocking: bool = False) -> "QTensor":
        """Move codes and metadata to `device` (the compressed bytes travel, not the values)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "QTensor":
        """Page-locked host copy, for async host -> GPU loads."""
        return self._map(lambda t: t.pin_memory())

    def narrow(self, dim: int, start: int, length: int) -> "QTensor":
        """View of positions [start, start+length) along `dim`; along group_dim only whole groups."""
        dim = _check_narrow(self, dim, start, length)
        shape = self.shape[:dim] + (length,) + self.shape[dim + 1:]
        if dim == self.group_dim:  # cut the group-count dim
            G = self.group_size
            view = self._map(lambda t: t.narrow(dim, start // G, -(-length // G)))
        else:  # stored dim: the group dim became two, (ng, G')
            sdim = dim if dim < self.group_dim else dim + 1
            view = self._map(lambda t: t.narrow(sdim, start, length))
        return replace(view, shape=shape)

    def copy_(self, src: "QTensor", non_blocking: bool = False) -> "QTensor":
        """Copy `src`'s codes and metadata into self in place (same layout required)."""
        _check_same_layout(self, src)
        for dst, s in ((self.data, src.data), (self.mins, src.mins), (self.scales, src.scales)):
            dst.copy_(s, non_blocking=non_blocking)
        return self

    def header(self) -> Dict[str, Any]:
        """JSON-able description; with the flat byte buffer it rebuilds the QTensor."""
        return {"format": FORMAT, "shape": list(self.shape), "dtype": _dtype_name(self.dtype),
                "bits": self.bits, "group_size": self.group_size, "group_dim": self.group_dim,
                "meta_dtype": _dtype_name(self.meta_dtype), "nbytes": self.nbytes}

    def to_bytes(self) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """One flat uint8 buffer (mins | scales | data, on self.device) + its header."""
        parts = [t.contiguous().reshape(-1).view(torch.uint8)
                 for t in (self.mins, self.scales, self.data)]
        return torch.cat(parts), self.header()

    @staticmethod
    def from_bytes(buf: torch.Tensor, header: Dict[str, Any]) -> "QTensor":
        """Rebuild from `to_bytes` output; the pieces are views into `buf` (no copy)."""
        if header.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} buffer (header format {header.get('format')!r})")
        shape, bits, gs, gd = tuple(header["shape"]), header["bits"], header["group_size"], header["group_dim"]
        meta_dtype = _dtype(header["meta_dtype"])
        dshape, mshape = grouped_shapes(shape, bits, gs, gd)
        if buf.dtype != torch.uint8 or buf.numel() != header["nbytes"]:
            raise ValueError(f"buffer holds {buf.numel()} {buf.dtype} values, header expects "
                             f"{header['nbytes']} uint8 bytes: was the file truncated?")
        mbytes = math.prod(mshape) * _itemsize(meta_dtype)
        mins = buf[:mbytes].view(meta_dtype).view(mshape)
        scales = buf[mbytes:2 * mbytes].view(meta_dtype).view(mshape)
        data = buf[2 * mbytes:].view(dshape)
        return QTensor(data, mins, scales, shape, _dtype(header["dtype"]), bits, gs, gd)


# ---------------------------------------------------------------- kernels

def quantize(x: torch.Tensor, bits: int, group_size: int = 64, group_dim: int = -1,
             meta_dtype: torch.dtype = META_DTYPE) -> QTensor:
    """Quantise `x` group-wise; the result lives on x.device."""
    gd = _check_args(tuple(x.shape), bits, group_size, group_dim)
    out = qempty(x.shape, bits, group_size, gd, x.dtype, x.device, meta_dtype)
    return quantize_into(out, x)


def quantize_into(out: QTensor, x: torch.Tensor) -> QTensor:
    """Quantise `x` into the preallocated `out` (a QTensor or a narrowed view of one)."""
    if tuple(x.shape) != out.shape:
        raise ValueError(f"tensor shape {list(x.shape)} does not match QTensor shape {list(out.shape)}")
    for cuts in _cuts(out):  # cache-sized blocks on CPU
        _quantize_into(_narrow(out, cuts), _narrow(x, cuts))
    return out


def dequantize(q: QTensor, dtype: Optional[torch.dtype] = None, device=None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Values of `q` as a dense tensor; with `device`, the packed bytes move first.

    `out`: a preallocated buffer of q.shape to fill (reusing one saves the page faults
    of a fresh large allocation, a large share of the time on CPU).
    """
    if out is not None:
        dtype, device = out.dtype, out.device
    if device is not None and torch.device(device) != q.device:  # async only host -> GPU
        q = q.to(device, non_blocking=torch.device(device).type == "cuda")
    if out is None:
        out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device)
    elif tuple(out.shape) != q.shape:
        raise ValueError(f"out has shape {list(out.shape)}, QTensor has {list(q.shape)}")
    for cuts in _cuts(q):  # cache-sized blocks on CPU: temporaries stay in cache
        _dequantize_into(_narrow(out, cuts), _narrow(q, cuts))
    return out


def qempty(shape: Sequence[int], bits: int, group_size: int = 64, group_dim: int = -1,
           dtype: torch.dtype = torch.bfloat16, device=None,
           meta_dtype: torch.dtype = META_DTYPE, pin_memory: bool = False) -> QTensor:
    """Preallocated (uninitialised) QTensor, e.g. a quantised KV cache [2, S_max, B, nkv, d]."""
    shape = tuple(int(s) for s in shape)
    dshape, mshape = grouped_shapes(shape, bits, group_size, group_dim)
    kw = dict(device=device, pin_memory=pin_memory)
    data = torch.empty(dshape, dtype=torch.uint8, **kw)
    mins, scales = (torch.empty(mshape, dtype=meta_dtype, **kw) for _ in range(2))
    gd = group_dim % len(shape)
    return QTensor(data, mins, scales, shape, dtype, bits, group_size, gd)


def _quantize_into(out: QTensor, x: torch.Tensor) -> QTensor:
    gd, G, qmax = out.group_dim, out.group_size, (1 << out.bits) - 1
    xg = _pad_groups(x.float(), gd, G)  # pre + (ng, G) + post, float32
    lo, hi = xg.amin(gd + 1, keepdim=True), xg.amax(gd + 1, keepdim=True)  # pre + (ng, 1) + post
    # (separate amin/amax: torch.aminmax over a short inner dim is ~10x slower on CPU)
    mn = _round_down(lo, out.meta_dtype)
    scale = _round_up((hi - mn.float()) / qmax, out.meta_dtype)
    inv = torch.where(scale > 0, 1.0 / scale.float(), 0.0)  # constant groups: code 0, x == min
    codes = (xg - mn.float()).mul_(inv).round_().clamp_(0, qmax).to(torch.uint8)
    out.data.copy_(_pack(codes, gd, out.bits))
    out.mins.copy_(mn)
    out.scales.copy_(scale)
    return out


def _dequantize_into(out: torch.Tensor, q: QTensor) -> torch.Tensor:
    gd = q.group_dim
    codes = _unpack(q.data, gd, q.bits)  # pre + (ng, G) + post, uint8
    # float32 math; mul_ then add_ (not addcmul: ~3x slower with the group-broadcast operands)
    vals = codes.float().mul_(q.scales.float()).add_(q.mins.float())
    n_pad = vals.shape[gd] * vals.shape[gd + 1]
    vals = vals.reshape(vals.shape[:gd] + (n_pad,) + vals.shape[gd + 2:])
    out.copy_(vals.narrow(gd, 0, q.shape[gd]))  # drop padding, cast to the output dtype
    return out


def _pad_groups(x: torch.Tensor, gd: int, G: int) -> torch.Tensor:
    """pre + (n,) + post -> pre + (ng, G) + post; pads by repeating the last value."""
    n = x.shape[gd]
    pad = -n % G
    if pad:  # repeating a real value leaves the last group's min and max unchanged
        x = torch.cat([x, x.narrow(gd, n - 1, 1).expand(*x.shape[:gd], pad, *x.shape[gd + 1:])], gd)
    return x.reshape(x.shape[:gd] + ((n + pad) // G, G) + x.shape[gd + 1:])


def _pack(codes: torch.Tensor, gd: int, bits: int) -> torch.Tensor:
    """uint8 codes pre + (ng, G) + post -> packed pre + (ng, G*bits/8) + post."""
    if bits == 8:
        return codes
    half = codes.shape[gd + 1] // 2
    return codes.narrow(gd + 1, 0, half) | (codes.narrow(gd + 1, half, half) << 4)


def _unpack(data: torch.Tensor, gd: int, bits: int) -> torch.Tensor:
    """packed pre + (ng, G*bits/8) + post -> uint8 codes pre + (ng, G) + post."""
    if bits == 8:
        return data
    return torch.cat([data & 0x0F, data >> 4], dim=gd + 1)


def _round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> dtype, rounding toward -inf (so the stored min never exceeds the true min)."""
    r = v.to(dtype)
    return torch.where(r.float() > v, torch.nextafter(r, torch.full_like(r, -math.inf)), r)


def _round_up(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> dtype, rounding toward +inf (so the stored scale covers the group's range)."""
    r = v.to(dtype)
    return torch.where(r.float() < v, torch.nextafter(r, torch.full_like(r, math.inf)), r)


def _cuts(q: QTensor):
    """Blocks to process q in: cache-sized on CPU, large on a GPU (fewer kernel launches)."""
    limit = CHUNK_NUMEL if q.device.type == "cpu" else GPU_CHUNK_NUMEL
    return _blocks(q.shape, q.group_dim, q.group_size, limit)


def _blocks(shape: Sequence[int], gd: int, G: int, limit: int, d: int = 0, whole: int = 1):
    """Yield narrows ((dim, start, n), ...) cutting `shape` into blocks of <= ~limit values.

    The group dim is cut only at group boundaries. `whole`: values per position of dim d
    contributed by the dims above it (cut down to `whole` positions).
    """
    if d == len(shape) or whole * math.prod(shape[d:]) <= limit:
        yield ()
        return
    unit = G if d == gd else 1  # smallest cut
    per = unit * whole * math.prod(shape[d + 1:])  # values per unit of dim d
    step = unit * max(1, limit // per)
    for s in range(0, shape[d], step):
        n = min(step, shape[d] - s)
        subs = _blocks(shape, gd, G, limit, d + 1, whole * n) if per > limit else [()]
        for sub in subs:  # one unit is still too big: cut the dims below too
            yield ((d, s, n),) + sub


def _narrow(t, cuts):
    """Apply (dim, start, n) narrows to a tensor or a QTensor."""
    for dim, start, n in cuts:
        t = t.narrow(dim, start, n)
    return t


# ---------------------------------------------------------------- KV cache slices

def store_slice(cache: QTensor, x: torch.Tensor, start: int, dim: int = 1) -> None:
    """Quantise `x` (e.g. new K/V [2, s, B, nkv, d]) into cache positions [start, start+s) of `dim`."""
    s = x.shape[dim]
    if start + s > cache.shape[dim]:
        raise ValueError(f"cache holds {cache.shape[dim]} positions along dim {dim}; cannot write "
                         f"[{start}, {start + s}): allocate the cache for prompt_len + gen_len")
    quantize_into(cache.narrow(dim, start, s), x.to(cache.device))


def load_prefix(cache: QTensor, length: int, dim: int = 1, dtype: Optional[torch.dtype] = None,
                device=None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dequantised positions [0, length) of `dim`: the K/V history [2, L, B, nkv, d]."""
    return dequantize(cache.narrow(dim, 0, length), dtype=dtype, device=device, out=out)


# ---------------------------------------------------------------- checks and helpers

def _check_narrow(q: QTensor, dim: int, start: int, length: int) -> int:
    """Validate a narrow of `q`; returns dim normalised to >= 0."""
    dim = dim % len(q.shape)
    if start < 0 or length < 0 or start + length > q.shape[dim]:
        raise ValueError(f"positions [{start}, {start + length}) are outside dim {dim} "
                         f"of size {q.shape[dim]}")
    end_ok = length % q.group_size == 0 or start + length == q.shape[dim]
    if dim == q.group_dim and (start % q.group_size or not end_ok):
        raise ValueError(f"cannot cut group dim {dim} at [{start}, {start + length}): groups of "
                         f"{q.group_size} span it; quantise with group_dim on another dim "
                         "(the KV cache uses -1, head_dim, and is sliced along the sequence)")
    return dim


def _check_same_layout(dst: QTensor, src: QTensor) -> None:
    keys = ("shape", "bits", "group_size", "group_dim", "meta_dtype")
    got, want = ({k: getattr(q, k) for k in keys} for q in (src, dst))
    if got != want:
        raise ValueError(f"QTensor layouts differ: source {got}, destination {want}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in QTensor header")
    return dtype
