"""Storage tiers: device (where compute runs), host (RAM), disk (files in an offload dir).

Each tier holds values by key and counts their bytes against its budget; going over is
an error naming the config key. A value is a tensor or a dict of tensors (a layer's weights).
The accounting is thread-safe (the async executor's load / compute / store threads share it).
The disk tier is in disk.py.
"""
from __future__ import annotations

import threading
from typing import Dict, Hashable, Union

import torch

from graphgen.config import format_bytes

Value = Union[torch.Tensor, Dict[str, torch.Tensor]]
_BUDGET_KEY = {"device": "hardware.device_mem", "host": "hardware.host_mem", "disk": "hardware.disk_mem"}


def nbytes(v: Value) -> int:
    if isinstance(v, dict):
        return sum(nbytes(t) for t in v.values())
    return v.numel() * v.element_size()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do a and b view the same elements, laid out the same way?"""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


class TierFull(MemoryError):
    pass


class Tier:
    """In-memory tier (device or host): a dict of values with byte accounting."""

    def __init__(self, name: str, budget: int, device: torch.device):
        self.name, self.budget, self.device = name, budget, device
        self.values: Dict[Hashable, Value] = {}
        self.sizes: Dict[Hashable, int] = {}
        self.used = self.peak = 0
        self._lock = threading.RLock()

    def _account(self, key, size: int) -> None:
        with self._lock:
            if self.used + size > self.budget:
                raise TierFull(f"{self.name} tier over budget: {format_bytes(self.used + size)} needed for "
                               f"{key}, {_BUDGET_KEY[self.name]} is {format_bytes(self.budget)}")
            self.sizes[key] = size
            self.used += size
            self.peak = max(self.peak, self.used)

    def put(self, key, value: Value) -> None:
        with self._lock:
            if key in self.values:
                self.pop(key)
            self._account(key, nbytes(value))
            self.values[key] = value

    def get(self, key) -> Value:
        return self.values[key]

    def get_to(self, key, device: torch.device) -> Value:
        """The value on `device` (the same tensors when it is already there: no copy)."""
        v = self.get(key)
        if isinstance(v, dict):
            return {n: t.to(device, non_blocking=True) for n, t in v.items()}
        return v.to(device, non_blocking=True)

    def pop(self, key) -> Value:
        with self._lock:
            self.used -= self.sizes.pop(key)
            return self.values.pop(key)

    def __contains__(self, key) -> bool:
        return key in self.values

    # --- KV cache: a preallocated [2, S_max, B, nkv, d] tensor, read by prefix, written by slice ---
    def alloc(self, key, shape, dtype, head_major: bool = False) -> None:
        """head_major: stored [2, B, nkv, S_max, d] (each head's prefix contiguous: attention reads
        it in place, executors/attention.py), seen as the [2, S_max, B, nkv, d] every tier shares."""
        if head_major:
            t = torch.zeros((shape[0],) + tuple(shape[2:-1]) + (shape[1], shape[-1]), dtype=dtype, device=self.device)
            self.put(key, t.permute(0, len(shape) - 2, *range(1, len(shape) - 2), len(shape) - 1))
        else:
            self.put(key, torch.zeros(shape, dtype=dtype, device=self.device))

    def read_prefix(self, key, n: int) -> torch.Tensor:
        return self.values[key][:, :n]

    def write_slice(self, key, start: int, value: torch.Tensor) -> None:
        """(Nothing to copy when value is that very slice: attention wrote it in place.)"""
        dst = self.values[key][:, start:start + value.shape[1]]
        if not _same_view(dst, value):
            dst.copy_(value)

    def close(self) -> None:
        self.values.clear()
        self.sizes.clear()
        self.used = 0
