"""Disk tier: values in files of a private run directory inside the offload dir.

Placement: a value's tensors back to back at 4096-aligned offsets in one file; a KV cache
[2, S_max, ...] as two halves, each at an aligned offset, so a prefix is two reads; weights
already in a safetensors checkpoint are read in place (put_external), not copied. The free
space is checked before anything is written (check_space). The reads and writes themselves
(O_DIRECT, thread pool, read buffers) are executors/disk_io.py.

The offload directory's safety (a private default, refusing unsafe directories, a locked run
directory opened by descriptor, cleanup and reclaiming) is executors/offload_dir.py.
"""
from __future__ import annotations

import errno
import os
import weakref
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Tuple

import torch

from graphgen.config import format_bytes

from .disk_io import ALIGN, FileIO, ReadBuffers, align, aligned_empty, direct_io_works, merge_spans
from .offload_dir import LOCK, RunDir, default_offload_dir, sigterm_unwinds
from .tiers import Tier, Value, nbytes



class DiskFull(OSError):
    """The offload directory cannot hold what the plan writes there."""


@dataclass(frozen=True)
class Extent:
    """One tensor of a value: where it lies in which file, stored as which dtype and shape.
    `path`: a name in the run directory, or the absolute path of a checkpoint read in place."""

    name: str
    path: str
    offset: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _prod(self.shape) * _itemsize(self.dtype)


# --- the tier ---------------------------------------------------------------------------------

class DiskTier(Tier):
    """A tier of files in a private directory of the offload dir, removed on close."""

    def __init__(self, budget: int, offload_dir: Optional[str] = None, io_threads: int = 4,
                 direct_io: bool = True):
        super().__init__("disk", budget, torch.device("cpu"))
        self.offload_dir = os.path.abspath(os.path.expanduser(offload_dir or default_offload_dir()))
        self.run = RunDir(self.offload_dir)
        self.io = FileIO(io_threads, direct_io)  # direct: a wish until the run directory is probed
        self.want_direct = direct_io
        self.buffers = ReadBuffers()  # weight reads reuse freed buffers (the executor sets its room)
        self.layout: Dict[Hashable, Tuple[bool, List[Extent]]] = {}  # key -> (is a dict, extents)
        self.external: Dict[Hashable, int] = {}  # keys read in place from a checkpoint -> bytes
        self._finalizer = weakref.finalize(self, self.run.cleanup, self.io)
        sigterm_unwinds()

    @property
    def root(self) -> Optional[str]:
        """The run directory's path (None until the first write)."""
        return self.run.path

    @property
    def direct(self) -> bool:
        return self.io.direct

    def files(self) -> List[str]:
        """The data files in the run directory (not its lock)."""
        if self.run.fd is None:
            return []
        return sorted(n for n in os.listdir(self.run.fd) if not n.startswith(LOCK))

    def _ensure_run(self) -> None:
        """Make the run directory on first write."""
        with self._lock:
            if self.run.fd is None:
                fd = self.run.create()
                self.io.dir_fd = fd
                self.io.direct = self.want_direct and direct_io_works(fd)

    # --- space --------------------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.fstatvfs(self.run.open_parent())
        return st.f_bavail * st.f_frsize

    def check_space(self, nbytes: int) -> None:
        """Refuse, before anything is written, a plan that needs more than the free space."""
        free = self.free_bytes()
        if nbytes > free:
            raise DiskFull(errno.ENOSPC, f"the plan writes {format_bytes(nbytes)} to hardware.offload_dir="
                                         f"{self.offload_dir!r}, which has {format_bytes(free)} free: free space there, "
                                         f"set hardware.offload_dir to a larger disk, or keep more on the host "
                                         f"(policy.percent)")

    # --- values ---------------------------------------------------------------------------
    def put(self, key, value: Value) -> None:
        tensors = value if isinstance(value, dict) else {"": value}
        name, extents, off = self._name(key), [], 0
        for tname, t in tensors.items():
            extents.append(Extent(tname, name, off, t.dtype, tuple(t.shape)))
            off += align(nbytes(t))
        if key in self.values:
            self.pop(key)
        self._account(key, sum(e.nbytes for e in extents))  # the plan's bytes (files add alignment)
        try:
            self._ensure_run()
            self.io.create(name, off)
            for e, t in zip(extents, tensors.values()):
                self.io.write(name, e.offset, _as_bytes(t))
        except OSError as err:
            self._forget(key, name)
            raise _disk_error(err, self.offload_dir) from None
        with self._lock:
            self.values[key] = isinstance(value, dict)
            self.layout[key] = (isinstance(value, dict), extents)

    def put_external(self, key, extents: List[Extent], dtype: torch.dtype) -> None:
        """A dict value whose tensors stay where they are (a safetensors checkpoint); read in `dtype`."""
        size = sum(e.nbytes for e in extents)
        self._account(key, size)
        with self._lock:
            self.values[key] = dtype
            self.layout[key] = (True, list(extents))
            self.external[key] = size

    staging = None  # CUDA: PinnedStaging for disk -> GPU copies (executors/cuda.py)

    def get_to(self, key, device: torch.device) -> Value:
        """The value on `device`; to a GPU chunk by chunk through the pinned staging buffers."""
        if device.type == "cpu" or self.staging is None:
            return super().get_to(key, device)
        is_dict, extents = self.layout[key]
        out = {e.name: self._staged(e, device) for e in extents}
        want = self.values[key]
        if isinstance(want, torch.dtype):
            out = {n: t.to(want) for n, t in out.items()}
        return out if is_dict else out[""]

    def _staged(self, e: Extent, device: torch.device) -> torch.Tensor:
        dst, st = torch.empty(e.nbytes, dtype=torch.uint8, device=device), self.staging
        for c in range(0, e.nbytes, st.nbytes):
            off = e.offset + c
            n, a0 = min(st.nbytes, e.nbytes - c), off // ALIGN * ALIGN
            i, buf = st.acquire()
            self.io.read_into(e.path, [(a0, buf[:align(off + n - a0)], off + n - a0)])
            dst[c:c + n].copy_(buf[off - a0:off - a0 + n], non_blocking=True)
            st.release(i)
        return _typed(dst, e.dtype, e.shape)

    def get(self, key) -> Value:
        is_dict, extents = self.layout[key]
        by_file: Dict[str, List[Extent]] = {}
        for e in extents:
            by_file.setdefault(e.path, []).append(e)
        out: Dict[str, torch.Tensor] = {}
        for path, es in by_file.items():
            es.sort(key=lambda e: e.offset)
            spans = merge_spans([(e.offset, e.nbytes) for e in es])
            bufs = self.io.read(path, spans, self.buffers.take)
            for e in es:
                s = next(i for i, (o, n) in enumerate(spans) if o <= e.offset < o + n)
                raw = bufs[s][e.offset - spans[s][0]:e.offset - spans[s][0] + e.nbytes]
                out[e.name] = _typed(raw, e.dtype, e.shape)
        want = self.values[key]
        if isinstance(want, torch.dtype):  # read in place: stored dtype -> run dtype (same itemsize)
            out = {n: t.to(want) for n, t in out.items()}
        return out if is_dict else out[""]

    def pop(self, key) -> Value:
        value = self.get(key)
        self.drop(key)
        return value

    def drop(self, key) -> None:
        with self._lock:
            self.used -= self.sizes.pop(key)
            self.values.pop(key)
            _, extents = self.layout.pop(key)
            external = self.external.pop(key, None) is not None
        if not external:
            self.io.unlink(extents[0].path)

    # --- KV cache: [2, S_max, B, nkv, d], each half at an aligned offset ---------------------
    def alloc(self, key, shape, dtype, head_major: bool = False) -> None:
        """A cache file, sequence-major (a prefix is one contiguous read); head_major is for RAM tiers."""
        half = align(_prod(shape[1:]) * _itemsize(dtype))
        self._account(key, _prod(shape) * _itemsize(dtype))
        name = self._name(key)
        try:
            self._ensure_run()
            self.io.create(name, 2 * half)
        except OSError as err:
            self._forget(key, name)
            raise _disk_error(err, self.offload_dir) from None
        with self._lock:
            self.values[key] = False
            self.layout[key] = (False, [Extent("", name, 0, dtype, tuple(shape))])

    def _halves(self, key):
        _, [e] = self.layout[key]
        row = _prod(e.shape[2:]) * _itemsize(e.dtype)
        return e, row, align(e.shape[1] * row)

    def read_prefix(self, key, n: int) -> torch.Tensor:
        """cache[:, :n] as a [2, n, ...] host tensor: one aligned read per half, into one buffer."""
        e, row, half = self._halves(key)
        span = align(n * row)
        buf = aligned_empty(2 * span)
        self.io.read_into(e.path, [(0, buf[:span], n * row), (half, buf[span:], n * row)])
        return buf.view(2, span)[:, :n * row].view(e.dtype).view((2, n) + e.shape[2:])

    def write_slice(self, key, start: int, value: torch.Tensor) -> None:
        """cache[:, start:start+s] = value ([2, s, ...]): small, so buffered (reads are O_DIRECT)."""
        e, row, half = self._halves(key)
        try:
            self.io.write_small(e.path, [(h * half + start * row, _as_bytes(value[h])) for h in range(2)])
        except OSError as err:
            raise _disk_error(err, self.offload_dir) from None

    # --- files -------------------------------------------------------------------------------
    @staticmethod
    def _name(key) -> str:
        return "_".join(map(str, key)) + ".bin"

    def _forget(self, key, name: str) -> None:
        with self._lock:
            self.used -= self.sizes.pop(key, 0)
        if self.run.fd is not None:
            try:
                self.io.unlink(name)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        super().close()
        self.buffers.clear()
        self.layout.clear()
        self.external.clear()
        self._finalizer()


# --- helpers ---------------------------------------------------------------------------------

def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _typed(raw: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
    """uint8 bytes -> a tensor of dtype/shape sharing them (copied if misaligned for the dtype)."""
    if raw.data_ptr() % _itemsize(dtype):
        raw = raw.clone()
    return raw.view(dtype).view(shape)


def _disk_error(err: OSError, offload_dir: str) -> OSError:
    if err.errno == errno.ENOSPC:
        return DiskFull(errno.ENOSPC, f"disk full while writing to hardware.offload_dir={offload_dir!r}: "
                                      f"free space there or set hardware.offload_dir to a larger disk")
    return err
