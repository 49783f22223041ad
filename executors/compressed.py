"""Compressed values in the tiers (the decisions of passes/compress.py, run by executors/base.py).

A QTensor (executors/quant.py) lives in a tier as its three plain tensors, so every tier
(device, host, disk) stores, counts and moves the compressed bytes with no special case:
- a layer's weights: {name: tensor}, each quantised matrix as name@data, name@mins, name@scales;
- a KV cache [2, S_max, B, nkv, d]: three caches under key + (part,), each [2, S_max, ...]
  (grouped along a non-sequence dim), read by prefix and written by slice like a dense one.
Dequantisation runs on the compute device, on the compute stream: a layer's weights once per run
of squares (its first square turns the compressed parts its load put in w_buf into the dense
working copy the run shares, while the load stream reads the next layer), the cache prefix inside
attention.
`comp` is a square's w_compressed / kv_compressed: (bits, group_size, group_dim) or None.
"""
from __future__ import annotations

import threading
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from graphgen.costs import is_compressed

from . import packed
from .quant import META_DTYPE, QTensor, dequantize, grouped_shapes, quantize

PARTS = ("data", "mins", "scales")
Comp = Optional[Tuple[int, int, int]]
Value = Union[torch.Tensor, Dict[str, torch.Tensor]]


def parts(q: QTensor) -> Dict[str, torch.Tensor]:
    return {p: getattr(q, p) for p in PARTS}


def join(d: Dict[str, torch.Tensor], shape, dtype: torch.dtype, comp: Comp) -> QTensor:
    """The three parts back into a QTensor of `shape` (the original, unpadded shape)."""
    bits, gs, gd = comp
    return QTensor(d["data"], d["mins"], d["scales"], tuple(shape), dtype, bits, gs, gd % len(shape))


def move(value: Value, device: torch.device, non_blocking: bool = False) -> Value:
    """A tensor or a dict of tensors (a layer, a compressed slice) to `device`."""
    if isinstance(value, dict):
        return {n: t.to(device, non_blocking=non_blocking) for n, t in value.items()}
    return value.to(device, non_blocking=non_blocking)


# --- weights ---------------------------------------------------------------------------------

def quantize_layer(layer, source, comp: Comp, dtype: torch.dtype, device: torch.device,
                   kernel: bool = False) -> Dict[str, torch.Tensor]:
    """A layer's weights, on the CPU, for its home tier: matrices as the checkpoint stores them when
    it holds them in exactly this compression (a GGUF's Q4_1), else quantised (from float32, on
    the compute `device`, fast on a GPU); the rest dense in `dtype`. kernel: in the format of the
    packed CPU kernels (executors/packed.py) instead of graphgen's group-wise one (from the
    checkpoint's stored parts where it holds them)."""
    bits, gs, gd = comp
    out: Dict[str, torch.Tensor] = {}
    for w in layer.weights:
        if is_compressed(w) and kernel:
            stored = source.stored(w, comp) if comp == layer.stored else None
            out.update(packed.pack(layer, w, None if stored else source.get(w, torch.float32), comp, stored))
        elif is_compressed(w):
            stored = source.stored(w, comp)
            if stored is None:
                stored = parts(quantize(source.get(w, torch.float32).to(device), bits, gs, gd).to("cpu"))
            out.update({f"{w.name}@{p}": t for p, t in stored.items()})
        else:
            out[w.name] = source.get(w, dtype)
    return out


def dequantize_layer(layer, value: Dict[str, torch.Tensor], comp: Comp, dtype: torch.dtype,
                     buffers: Optional["WorkBuffers"] = None) -> Dict[str, torch.Tensor]:
    """The compressed layer on the compute device -> its dense weights in the compute dtype."""
    out = {}
    for w in layer.weights:
        if is_compressed(w):
            q = join({p: value[f"{w.name}@{p}"] for p in PARTS}, w.shape, dtype, comp)
            buf = buffers.take(q.shape, dtype) if buffers is not None else None
            out[w.name] = dequantize(q, dtype, out=buf)
        else:
            out[w.name] = value[w.name]
    return out


def dequantized(layer, dense: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    """The tensors of a working copy that dequantisation made (not the dense biases it shares)."""
    return [dense[w.name] for w in layer.weights if is_compressed(w)]


class WorkBuffers:
    """Dense buffers of dequantised weights, reused across runs on a CPU device: a fresh large
    allocation page-faults on first touch, which costs more than the dequantisation itself.
    Keeps at most `cap` bytes of free buffers (memory beyond the plan: the stated overhead),
    oldest dropped first. Thread-safe (the async executor loads and frees on two threads)."""

    def __init__(self, cap: int, device: torch.device):
        self.cap, self.device, self.held = cap, device, 0
        self.free: List[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            for idx, t in enumerate(self.free):
                if tuple(t.shape) == tuple(shape) and t.dtype == dtype:
                    self.held -= t.nbytes
                    return self.free.pop(idx)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def give(self, tensors: Iterable[torch.Tensor]) -> None:
        with self._lock:
            for t in tensors:
                if t.nbytes > self.cap:
                    continue
                while self.free and self.held + t.nbytes > self.cap:
                    self.held -= self.free.pop(0).nbytes
                self.free.append(t)
                self.held += t.nbytes


# --- KV cache -----------------------------------------------------------------------------------

def alloc_cache(tier, key, shape, dtype: torch.dtype, comp: Comp) -> None:
    """A whole cache [2, S_max, B, nkv, d] at its home: dense, or its three compressed parts."""
    if comp is None:
        tier.alloc(key, shape, dtype, head_major=True)
        return
    dshape, mshape = grouped_shapes(shape, *comp)
    for p, s, dt in zip(PARTS, (dshape, mshape, mshape), (torch.uint8, META_DTYPE, META_DTYPE)):
        tier.alloc(key + (p,), s, dt)


def cache_key(key, comp: Comp):
    """The tier key that tells whether the cache `key` is allocated."""
    return key if comp is None else key + (PARTS[0],)


def read_prefix(tier, key, n: int, comp: Comp) -> Value:
    """Positions [0, n) as stored: a [2, n, ...] tensor, or the dict of its compressed parts."""
    if comp is None:
        return tier.read_prefix(key, n)
    return {p: tier.read_prefix(key + (p,), n) for p in PARTS}


def write_slice(tier, key, start: int, value: Value) -> None:
    """Positions [start, start + s) from a [2, s, ...] tensor or its compressed parts."""
    if isinstance(value, dict):
        for p in PARTS:
            tier.write_slice(key + (p,), start, value[p])
    else:
        tier.write_slice(key, start, value)


def compress_slice(x: torch.Tensor, comp: Comp) -> Value:
    """New K/V [2, s, B, nkv, d] as it will be stored: dense, or quantised parts."""
    return x if comp is None else parts(quantize(x, *comp))


def dense_into(out: torch.Tensor, value: Value, comp: Comp) -> torch.Tensor:
    """Fill `out` ([2, n, B, nkv, d], e.g. a view of the joined cache) from a stored prefix."""
    if comp is None:
        return out.copy_(value)
    return dequantize(join(value, out.shape, out.dtype, comp), out=out)
