"""Storage tiers: device (where compute runs), host (RAM), disk (files in an offload dir).

Each tier holds values by key and counts their bytes against its budget; going over is
an error naming the config key. A value is a tensor or a dict of tensors (a layer's weights).
Disk values live in one file each (a layer's weights concatenated), read and written with
positioned I/O straight into tensor memory.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Dict, Hashable, Tuple, Union

import torch

Value = Union[torch.Tensor, Dict[str, torch.Tensor]]
_BUDGET_KEY = {"device": "hardware.device_mem", "host": "hardware.host_mem", "disk": "hardware.disk_mem"}


def nbytes(v: Value) -> int:
    if isinstance(v, dict):
        return sum(nbytes(t) for t in v.values())
    return v.numel() * v.element_size()


class TierFull(MemoryError):
    pass


class Tier:
    """In-memory tier (device or host): a dict of values with byte accounting."""

    def __init__(self, name: str, budget: int, device: torch.device):
        self.name, self.budget, self.device = name, budget, device
        self.values: Dict[Hashable, Value] = {}
        self.sizes: Dict[Hashable, int] = {}
        self.used = self.peak = 0

    def _account(self, key, size: int) -> None:
        if self.used + size > self.budget:
            raise TierFull(f"{self.name} tier over budget: {(self.used + size) / 1e9:.2f} GB needed for {key}, "
                           f"{_BUDGET_KEY[self.name]} is {self.budget / 1e9:.2f} GB")
        self.sizes[key] = size
        self.used += size
        self.peak = max(self.peak, self.used)

    def put(self, key, value: Value) -> None:
        if key in self.values:
            self.pop(key)
        self._account(key, nbytes(value))
        self.values[key] = value

    def get(self, key) -> Value:
        return self.values[key]

    def pop(self, key) -> Value:
        self.used -= self.sizes.pop(key)
        return self.values.pop(key)

    def __contains__(self, key) -> bool:
        return key in self.values

    # --- KV cache: a preallocated [2, S_max, B, nkv, d] tensor, read by prefix, written by slice ---
    def alloc(self, key, shape, dtype) -> None:
        self.put(key, torch.zeros(shape, dtype=dtype, device=self.device))

    def read_prefix(self, key, n: int) -> torch.Tensor:
        return self.values[key][:, :n]

    def write_slice(self, key, start: int, value: torch.Tensor) -> None:
        self.values[key][:, start:start + value.shape[1]].copy_(value)

    def close(self) -> None:
        self.values.clear()
        self.sizes.clear()
        self.used = 0


class DiskTier(Tier):
    """Values in files under a private directory of the offload dir, removed on close."""

    def __init__(self, budget: int, offload_dir: str):
        super().__init__("disk", budget, torch.device("cpu"))
        try:
            os.makedirs(offload_dir, exist_ok=True)
            self.root = tempfile.mkdtemp(prefix="graphgen-", dir=offload_dir)
        except OSError as e:
            raise OSError(f"hardware.offload_dir={offload_dir!r} is not writable ({e.strerror}): "
                          f"set hardware.offload_dir to a writable directory") from None
        self.layout: Dict[Hashable, Tuple[str, list]] = {}  # key -> (file, [(name, dtype, shape, offset)])
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, True)

    def _path(self, key) -> str:
        return os.path.join(self.root, "_".join(map(str, key)) + ".bin")

    def put(self, key, value: Value) -> None:
        tensors = value if isinstance(value, dict) else {"": value}
        entries, off = [], 0
        for name, t in tensors.items():
            entries.append((name, t.dtype, tuple(t.shape), off))
            off += _align(nbytes(t))
        if key in self.values:
            self.pop(key)
        self._account(key, off)
        path = self._path(key)
        with open(path, "wb") as f:
            f.truncate(off)
            for (name, _, _, o), t in zip(entries, tensors.values()):
                os.pwrite(f.fileno(), _bytes_view(t), o)
        self.values[key] = isinstance(value, dict)
        self.layout[key] = (path, entries)

    def get(self, key) -> Value:
        path, entries = self.layout[key]
        fd = os.open(path, os.O_RDONLY)
        try:
            out = {name: _read(fd, dtype, shape, off) for name, dtype, shape, off in entries}
        finally:
            os.close(fd)
        return out if self.values[key] else out[""]

    def pop(self, key) -> Value:
        value = self.get(key)
        self.drop(key)
        return value

    def drop(self, key) -> None:
        self.used -= self.sizes.pop(key)
        self.values.pop(key)
        path, _ = self.layout.pop(key)
        os.unlink(path)

    def alloc(self, key, shape, dtype) -> None:
        size = _prod(shape) * _itemsize(dtype)
        self._account(key, size)
        path = self._path(key)
        with open(path, "wb") as f:
            f.truncate(size)
        self.values[key] = False
        self.layout[key] = (path, [("", dtype, tuple(shape), 0)])

    def read_prefix(self, key, n: int) -> torch.Tensor:
        """cache[:, :n] as a [2, n, ...] host tensor: two contiguous reads."""
        path, [(_, dtype, shape, _)] = self.layout[key]
        row = _prod(shape[2:]) * _itemsize(dtype)
        out = torch.empty((2, n) + tuple(shape[2:]), dtype=dtype)
        fd = os.open(path, os.O_RDONLY)
        try:
            for h in range(2):
                _readinto(fd, out[h], h * shape[1] * row)
        finally:
            os.close(fd)
        return out

    def write_slice(self, key, start: int, value: torch.Tensor) -> None:
        """cache[:, start:start+s] = value ([2, s, ...])."""
        path, [(_, dtype, shape, _)] = self.layout[key]
        row = _prod(shape[2:]) * _itemsize(dtype)
        fd = os.open(path, os.O_WRONLY)
        try:
            for h in range(2):
                os.pwrite(fd, _bytes_view(value[h].contiguous()), (h * shape[1] + start) * row)
        finally:
            os.close(fd)

    def close(self) -> None:
        super().close()
        self.layout.clear()
        self._finalizer()


def _align(n: int, a: int = 4096) -> int:
    return (n + a - 1) // a * a


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bytes_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _read(fd: int, dtype, shape, off: int) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    _readinto(fd, t, off)
    return t


def _readinto(fd: int, t: torch.Tensor, off: int) -> None:
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], off + got)
        if n <= 0:
            raise OSError(f"short read from offload file at offset {off + got}")
        got += n
