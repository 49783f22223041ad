"""CUDA specifics (the only module that knows about them), used by the async executor.

- One CUDA stream per executor stream (load / compute / store). Each op is issued on its
  stream by that stream's thread and synchronised before the op counts as done, so a
  consumer on another stream never reads unfinished data.
- Loaded tensors are handed to the compute stream (Tensor.record_stream): the caching
  allocator then does not reuse their memory for the next load while compute still reads it.
- Disk -> GPU copies go through a few pinned staging buffers, reused round-robin: pinned
  memory stays bounded (FlexGen's fixed 4 x 2 GiB pinned buffers broke small machines).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Dict, Sequence

import torch

from graphgen.config import parse_bytes

from .disk_io import ALIGN


class CudaStreams:
    def __init__(self, device: torch.device, names: Sequence[str]):
        self.device = device
        self.streams: Dict[str, torch.cuda.Stream] = {n: torch.cuda.Stream(device) for n in names}

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    @contextmanager
    def stream(self, name: str):
        with torch.cuda.device(self.device), torch.cuda.stream(self.streams[name]):
            yield
        self.streams[name].synchronize()

    def after(self, ex, stream: str, b) -> None:
        """After an op was issued: a loaded value is handed to the stream that will read it."""
        if stream != "load":
            return
        dst = ex.tiers[b["dst"]]
        if dst.device.type == "cuda" and b["buf"] in dst:
            reader = self.streams["compute"]
            for t in _tensors(dst.get(b["buf"])):
                t.record_stream(reader)

    def attach_staging(self, disk, ex_cfg) -> None:
        disk.staging = PinnedStaging(ex_cfg.staging_buffers, parse_bytes(ex_cfg.staging_bytes,
                                                                         "executor.staging_bytes"))


class PinnedStaging:
    """`count` pinned host buffers of `nbytes` (+ alignment slack), reused round-robin."""

    def __init__(self, count: int, nbytes: int):
        self.nbytes = nbytes
        raw = [torch.empty(nbytes + 3 * ALIGN, dtype=torch.uint8, pin_memory=True) for _ in range(max(1, count))]
        self.bufs = [r[-r.data_ptr() % ALIGN:][:nbytes + 2 * ALIGN] for r in raw]
        self.events = [None] * len(self.bufs)
        self._next = 0
        self._lock = threading.Lock()

    def acquire(self):
        """(index, buffer): the next buffer, once the copy that last read it has finished."""
        with self._lock:
            i = self._next
            self._next = (i + 1) % len(self.bufs)
        if self.events[i] is not None:
            self.events[i].synchronize()
        return i, self.bufs[i]

    def release(self, i: int) -> None:
        """Mark buffer i busy until the copies issued so far on the current stream finish."""
        ev = torch.cuda.Event()
        ev.record()
        self.events[i] = ev


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    else:  # a compressed tensor (codes + metadata)
        for name in ("data", "mins", "scales"):
            t = getattr(value, name, None)
            if isinstance(t, torch.Tensor):
                yield t
