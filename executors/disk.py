"""Disk tier: values in files under a private directory of the offload dir.

Fast and honest:
- large requests (CHUNK bytes) spread over an I/O thread pool, read straight into
  4096-aligned tensor memory;
- O_DIRECT where the filesystem allows it, so the page cache never makes a "disk" run fast
  (elsewhere: buffered I/O, then posix_fadvise(DONTNEED) on what was read or written);
- weights already in a safetensors checkpoint are read in place (put_external), not copied;
- the free space is checked before anything is written (check_space), and the private
  directory is removed on close, after an error, and at interpreter exit.
File layout: a value's tensors back to back at 4096-aligned offsets; a KV cache
[2, S_max, ...] as two halves, each at an aligned offset, so a prefix is two reads.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import weakref
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .tiers import Tier, Value, nbytes

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and memory (>= any logical block size)
CHUNK = 8 << 20  # bytes per request: large and sequential, several in flight
MERGE_GAP = 1 << 20  # in-place reads: tensors closer than this in a file are read in one request


class DiskFull(OSError):
    """The offload directory cannot hold what the plan writes there."""


@dataclass(frozen=True)
class Extent:
    """One tensor of a value: where it lies in which file, stored as which dtype and shape."""

    name: str
    path: str
    offset: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _prod(self.shape) * _itemsize(self.dtype)


class FileIO:
    """Chunked, parallel, aligned positioned reads and writes (O_DIRECT when `direct`)."""

    def __init__(self, threads: int, direct: bool):
        self.direct = direct
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="graphgen-io")
        self._stage = threading.local()  # one aligned CHUNK buffer per I/O thread, made on first use

    def read(self, path: str, ranges: Sequence[Tuple[int, int]],
             alloc: Optional[Callable[[int], torch.Tensor]] = None) -> List[torch.Tensor]:
        """Bytes [off, off + n) of `path` for each (off, n), as uint8 tensors in aligned memory
        (from `alloc(nbytes)`, default: fresh)."""
        jobs, outs = [], []
        for off, n in ranges:
            a0 = off // ALIGN * ALIGN
            buf = (alloc or aligned_empty)(_align(off + n) - a0)
            jobs.append((a0, buf, off + n - a0))
            outs.append(buf[off - a0:off - a0 + n])
        self.read_into(path, jobs)
        return outs

    def read_into(self, path: str, jobs: Sequence[Tuple[int, torch.Tensor, int]]) -> None:
        """For each (aligned file offset, aligned uint8 buffer, bytes needed): fill the buffer."""
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if self.direct else 0))
        try:
            parts = [(fd, buf, c, off + c, min(CHUNK, need - c)) for off, buf, need in jobs for c in range(0, need, CHUNK)]
            _run(self.pool, _pread, parts)
            if not self.direct:
                for off, _, need in jobs:
                    os.posix_fadvise(fd, off, need, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def write(self, path: str, off: int, data: torch.Tensor) -> None:
        """data (uint8, contiguous) at aligned offset `off`; the file is already sized to hold it."""
        fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if self.direct else 0))
        try:
            chunks = [(fd, data[c:c + CHUNK], off + c) for c in range(0, data.numel(), CHUNK)]
            _run(self.pool, self._write_chunk, chunks)
            if not self.direct:
                os.fdatasync(fd)
                os.posix_fadvise(fd, off, data.numel(), os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def _write_chunk(self, fd: int, chunk: torch.Tensor, off: int) -> None:
        n = chunk.numel()
        if self.direct and (chunk.data_ptr() % ALIGN or n % ALIGN):  # O_DIRECT: via an aligned buffer
            stage = getattr(self._stage, "buf", None)
            if stage is None:
                stage = self._stage.buf = aligned_empty(CHUNK).numpy()
            np.copyto(stage[:n], chunk.numpy())
            stage[n:_align(n)] = 0
            _pwrite(fd, memoryview(stage)[:_align(n)], off)
        else:
            _pwrite(fd, memoryview(chunk.numpy()), off)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class ReadBuffers:
    """Aligned buffers for weights read from disk, reused by the next read of the same size.

    Weights offloaded to disk are read layer after layer into fresh memory and freed after
    their squares: measured on this 2-core VM (opt-1.3b, weights on disk), the kernel spent
    ~20 ms of the compute thread per freed 200 MB buffer unmapping it, and the I/O threads
    faulted and zeroed every page of every new one, which made each decode square 3-4x slower
    than in memory. A layer's buffer handed back here (give) serves the next read of that size
    instead. The pool keeps at most `keep` free buffers of each size (layers of one shape share
    them; with one, 10 of a small test model's 48 reads still missed, with two 3, the first of
    each size) and never more than `room()` bytes (the device tier's unused budget, set by the
    executor; 0 by default: nothing is kept); `clear()` returns it all.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.free: Dict[int, List] = defaultdict(list)  # storage bytes -> untyped storages (none empty)
        self.pooled = 0
        self.room: Callable[[], int] = lambda: 0
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> torch.Tensor:
        """n aligned uint8 bytes: a pooled buffer of this size, else a new one."""
        size = n + ALIGN  # what aligned_empty allocates
        with self._lock:
            if size in self.free:
                st = self._pop(size)
                self.hits += 1
                shift = -st.data_ptr() % ALIGN
                return torch.empty(0, dtype=torch.uint8).set_(st, shift, (n,), (1,))
            self.misses += 1
        return aligned_empty(n)

    def _pop(self, size: int):
        st = self.free[size].pop()
        if not self.free[size]:
            del self.free[size]
        self.pooled -= size
        return st

    def give(self, value: Value) -> None:
        """The buffers of a value read from disk (weights nobody else holds) serve again."""
        tensors = value.values() if isinstance(value, dict) else [value]
        seen = set()
        for t in tensors:
            if t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            if st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            with self._lock:
                if len(self.free.get(st.nbytes(), ())) < self.keep and self.pooled + st.nbytes() <= self.room():
                    self.free[st.nbytes()].append(st)
                    self.pooled += st.nbytes()

    def clear(self) -> None:
        with self._lock:
            self.free.clear()
            self.pooled = 0


class DiskTier(Tier):
    """A tier of files in a private directory of the offload dir, removed on close."""

    def __init__(self, budget: int, offload_dir: str, io_threads: int = 4, direct_io: bool = True):
        super().__init__("disk", budget, torch.device("cpu"))
        self.offload_dir = os.path.abspath(offload_dir)
        made = _missing_parents(self.offload_dir)
        try:
            os.makedirs(self.offload_dir, exist_ok=True)
            self.root = tempfile.mkdtemp(prefix="graphgen-", dir=self.offload_dir)
            direct = direct_io and _direct_io_works(self.root)
        except OSError as e:
            _remove_dirs(made)
            raise OSError(e.errno, f"hardware.offload_dir={offload_dir!r} is not writable ({e.strerror}): "
                                   f"set hardware.offload_dir to a writable directory") from None
        self.io = FileIO(io_threads, direct)
        self.buffers = ReadBuffers()  # weight reads reuse freed buffers (the executor sets its room)
        self.layout: Dict[Hashable, Tuple[bool, List[Extent]]] = {}  # key -> (is a dict, extents)
        self.external: Dict[Hashable, int] = {}  # keys read in place from a checkpoint -> bytes
        self._finalizer = weakref.finalize(self, _cleanup, self.root, made, self.io)

    @property
    def direct(self) -> bool:
        return self.io.direct

    # --- space --------------------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self, nbytes: int) -> None:
        """Refuse, before anything is written, a plan that needs more than the free space."""
        free = self.free_bytes()
        if nbytes > free:
            raise DiskFull(errno.ENOSPC, f"the plan writes {nbytes / 1e9:.2f} GB to hardware.offload_dir="
                                         f"{self.offload_dir!r}, which has {free / 1e9:.2f} GB free: free space there, "
                                         f"set hardware.offload_dir to a larger disk, or keep more on the host "
                                         f"(policy.percent)")

    # --- values ---------------------------------------------------------------------------
    def put(self, key, value: Value) -> None:
        tensors = value if isinstance(value, dict) else {"": value}
        path, extents, off = self._path(key), [], 0
        for name, t in tensors.items():
            extents.append(Extent(name, path, off, t.dtype, tuple(t.shape)))
            off += _align(nbytes(t))
        if key in self.values:
            self.pop(key)
        self._account(key, sum(e.nbytes for e in extents))  # the plan's bytes (files add alignment)
        try:
            _create(path, off)
            for e, t in zip(extents, tensors.values()):
                self.io.write(path, e.offset, _as_bytes(t))
        except OSError as err:
            self._forget(key, path)
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
            self.io.read_into(e.path, [(a0, buf[:_align(off + n - a0)], off + n - a0)])
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
            spans = _merge_spans([(e.offset, e.nbytes) for e in es])
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
            os.unlink(extents[0].path)

    # --- KV cache: [2, S_max, B, nkv, d], each half at an aligned offset ---------------------
    def alloc(self, key, shape, dtype) -> None:
        half = _align(_prod(shape[1:]) * _itemsize(dtype))
        self._account(key, _prod(shape) * _itemsize(dtype))
        path = self._path(key)
        try:
            _create(path, 2 * half)
        except OSError as err:
            self._forget(key, path)
            raise _disk_error(err, self.offload_dir) from None
        with self._lock:
            self.values[key] = False
            self.layout[key] = (False, [Extent("", path, 0, dtype, tuple(shape))])

    def _halves(self, key):
        _, [e] = self.layout[key]
        row = _prod(e.shape[2:]) * _itemsize(e.dtype)
        return e, row, _align(e.shape[1] * row)

    def read_prefix(self, key, n: int) -> torch.Tensor:
        """cache[:, :n] as a [2, n, ...] host tensor: one aligned read per half, into one buffer."""
        e, row, half = self._halves(key)
        span = _align(n * row)
        buf = aligned_empty(2 * span)
        self.io.read_into(e.path, [(0, buf[:span], n * row), (half, buf[span:], n * row)])
        return buf.view(2, span)[:, :n * row].view(e.dtype).view((2, n) + e.shape[2:])

    def write_slice(self, key, start: int, value: torch.Tensor) -> None:
        """cache[:, start:start+s] = value ([2, s, ...]): small, so buffered (reads are O_DIRECT)."""
        e, row, half = self._halves(key)
        fd = os.open(e.path, os.O_WRONLY)
        try:
            for h in range(2):
                _pwrite(fd, memoryview(_as_bytes(value[h]).numpy()), h * half + start * row)
        except OSError as err:
            raise _disk_error(err, self.offload_dir) from None
        finally:
            os.close(fd)

    # --- files -------------------------------------------------------------------------------
    def _path(self, key) -> str:
        return os.path.join(self.root, "_".join(map(str, key)) + ".bin")

    def _forget(self, key, path: str) -> None:
        with self._lock:
            self.used -= self.sizes.pop(key, 0)
        if os.path.exists(path):
            os.unlink(path)

    def close(self) -> None:
        super().close()
        self.buffers.clear()
        self.layout.clear()
        self.external.clear()
        self._finalizer()


# --- helpers ---------------------------------------------------------------------------------

def aligned_empty(n: int) -> torch.Tensor:
    """n uint8 bytes starting at an ALIGN-aligned address (O_DIRECT's requirement)."""
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    shift = -raw.data_ptr() % ALIGN
    return raw[shift:shift + n]


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


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


def _merge_spans(spans: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Sorted (offset, n) -> fewer, larger spans (gaps under MERGE_GAP are read and dropped)."""
    out: List[List[int]] = []
    for off, n in spans:
        if out and off - (out[-1][0] + out[-1][1]) <= MERGE_GAP:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]


def _run(pool: ThreadPoolExecutor, fn, calls: List[tuple]) -> None:
    """fn(*args) for each; several in flight on the pool, a lone (small) one inline."""
    if len(calls) == 1:
        fn(*calls[0])
        return
    futs = [pool.submit(fn, *args) for args in calls]
    wait(futs)  # all of them, even after a failure: the fd is closed next
    for f in futs:
        f.result()


def _pread(fd: int, buf: torch.Tensor, start: int, file_off: int, need: int) -> None:
    """Fill buf[start : start + CHUNK] (aligned length) from file_off; `need` bytes must exist."""
    view = memoryview(buf.numpy())[start:start + min(CHUNK, _align(need))]
    got = 0
    while got < need:
        n = os.preadv(fd, [view[got:]], file_off + got)
        if n <= 0:
            raise OSError(errno.EIO, f"short read at offset {file_off + got} of an offload file")
        got += n


def _pwrite(fd: int, view: memoryview, off: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], off + done)


def _create(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _disk_error(err: OSError, offload_dir: str) -> OSError:
    if err.errno == errno.ENOSPC:
        return DiskFull(errno.ENOSPC, f"disk full while writing to hardware.offload_dir={offload_dir!r}: "
                                      f"free space there or set hardware.offload_dir to a larger disk")
    return err


def _direct_io_works(root: str) -> bool:
    """Does this filesystem take O_DIRECT (tmpfs and some overlay filesystems do not)?"""
    path = os.path.join(root, ".probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    try:
        os.pwrite(fd, memoryview(aligned_empty(ALIGN).numpy()), 0)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
        os.unlink(path)


def _missing_parents(path: str) -> List[str]:
    """The directories makedirs(path) would create, deepest first."""
    made = []
    while path and not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def _remove_dirs(dirs: List[str]) -> None:
    for d in dirs:  # deepest first; only if still empty (someone else may have put files there)
        try:
            os.rmdir(d)
        except OSError:
            break


def _cleanup(root: str, made: List[str], io: Optional[FileIO]) -> None:
    if io is not None:
        io.close()
    shutil.rmtree(root, ignore_errors=True)
    _remove_dirs(made)
