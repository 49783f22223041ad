"""File I/O engine of the disk tier: aligned, chunked, parallel positioned reads and writes.

- large requests (CHUNK bytes) spread over an I/O thread pool, read straight into
  4096-aligned tensor memory;
- O_DIRECT where the filesystem allows it, so the page cache never makes a "disk" run fast
  (elsewhere: buffered I/O, then posix_fadvise(DONTNEED) on what was read or written);
- relative names are opened inside one directory descriptor (`dir_fd`) with O_NOFOLLOW, so
  renaming or symlinking the directory's path cannot redirect them (executors/disk.py);
- read buffers of freed weights serve the next read of their size (ReadBuffers).
"""
from __future__ import annotations

import errno
import os
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .tiers import Value

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and memory (>= any logical block size)
CHUNK = 8 << 20  # bytes per request: large and sequential, several in flight
MERGE_GAP = 1 << 20  # in-place reads: tensors closer than this in a file are read in one request


class FileIO:
    """Chunked, parallel, aligned positioned reads and writes (O_DIRECT when `direct`).

    A relative path names a file in the directory `dir_fd` (opened without following
    symlinks); an absolute path (a checkpoint read in place) is opened as given."""

    def __init__(self, threads: int, direct: bool, dir_fd: Optional[int] = None):
        self.direct, self.dir_fd = direct, dir_fd
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="graphgen-io")
        self._stage = threading.local()  # one aligned CHUNK buffer per I/O thread, made on first use

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        if os.path.isabs(path):
            return os.open(path, flags, mode)
        if self.dir_fd is None:
            raise ValueError(f"{path!r}: a relative offload file needs the run directory's descriptor")
        return os.open(path, flags | os.O_NOFOLLOW, mode, dir_fd=self.dir_fd)

    def _open_read(self, path: str) -> Tuple[int, bool]:
        """(fd, direct): O_DIRECT when wanted and the file's filesystem takes it."""
        if self.direct:
            try:
                return self.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here (tmpfs): read buffered
                    raise
        return self.open(path, os.O_RDONLY), False

    def read(self, path: str, ranges: Sequence[Tuple[int, int]],
             alloc: Optional[Callable[[int], torch.Tensor]] = None) -> List[torch.Tensor]:
        """Bytes [off, off + n) of `path` for each (off, n), as uint8 tensors in aligned memory
        (from `alloc(nbytes)`, default: fresh)."""
        jobs, outs = [], []
        for off, n in ranges:
            a0 = off // ALIGN * ALIGN
            buf = (alloc or aligned_empty)(align(off + n) - a0)
            jobs.append((a0, buf, off + n - a0))
            outs.append(buf[off - a0:off - a0 + n])
        self.read_into(path, jobs)
        return outs

    def read_into(self, path: str, jobs: Sequence[Tuple[int, torch.Tensor, int]]) -> None:
        """For each (aligned file offset, aligned uint8 buffer, bytes needed): fill the buffer."""
        fd, direct = self._open_read(path)
        try:
            parts = [(fd, buf, c, off + c, min(CHUNK, need - c)) for off, buf, need in jobs for c in range(0, need, CHUNK)]
            run_all(self.pool, _pread, parts)
            if not direct:
                for off, _, need in jobs:
                    os.posix_fadvise(fd, off, need, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def create(self, name: str, size: int) -> None:
        """A new file of `size` bytes (never an existing file, never through a symlink)."""
        fd = self.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def write(self, path: str, off: int, data: torch.Tensor) -> None:
        """data (uint8, contiguous) at aligned offset `off`; the file is already sized to hold it."""
        fd = self.open(path, os.O_WRONLY | (os.O_DIRECT if self.direct else 0))
        try:
            chunks = [(fd, data[c:c + CHUNK], off + c) for c in range(0, data.numel(), CHUNK)]
            run_all(self.pool, self._write_chunk, chunks)
            if not self.direct:
                os.fdatasync(fd)
                os.posix_fadvise(fd, off, data.numel(), os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def write_small(self, path: str, parts: Sequence[Tuple[int, torch.Tensor]]) -> None:
        """Small unaligned writes (a KV cache slice), buffered: [(offset, uint8 tensor)]."""
        fd = self.open(path, os.O_WRONLY)
        try:
            for off, data in parts:
                pwrite_all(fd, memoryview(data.numpy()), off)
        finally:
            os.close(fd)

    def unlink(self, name: str) -> None:
        if os.path.isabs(name):
            raise ValueError(f"{name!r}: only files of the run directory are removed")
        os.unlink(name, dir_fd=self.dir_fd)

    def _write_chunk(self, fd: int, chunk: torch.Tensor, off: int) -> None:
        n = chunk.numel()
        if self.direct and (chunk.data_ptr() % ALIGN or n % ALIGN):  # O_DIRECT: via an aligned buffer
            stage = getattr(self._stage, "buf", None)
            if stage is None:
                stage = self._stage.buf = aligned_empty(CHUNK).numpy()
            np.copyto(stage[:n], chunk.numpy())
            stage[n:align(n)] = 0
            pwrite_all(fd, memoryview(stage)[:align(n)], off)
        else:
            pwrite_all(fd, memoryview(chunk.numpy()), off)

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


# --- helpers ---------------------------------------------------------------------------------

def aligned_empty(n: int) -> torch.Tensor:
    """n uint8 bytes starting at an ALIGN-aligned address (O_DIRECT's requirement)."""
    raw = torch.empty(n + ALIGN, dtype=torch.uint8)
    shift = -raw.data_ptr() % ALIGN
    return raw[shift:shift + n]


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def merge_spans(spans: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Sorted (offset, n) -> fewer, larger spans (gaps under MERGE_GAP are read and dropped)."""
    out: List[List[int]] = []
    for off, n in spans:
        if out and off - (out[-1][0] + out[-1][1]) <= MERGE_GAP:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(o, n) for o, n in out]


def run_all(pool: ThreadPoolExecutor, fn, calls: List[tuple]) -> None:
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
    view = memoryview(buf.numpy())[start:start + min(CHUNK, align(need))]
    got = 0
    while got < need:
        n = os.preadv(fd, [view[got:]], file_off + got)
        if n <= 0:
            raise OSError(errno.EIO, f"short read at offset {file_off + got} of an offload file")
        got += n


def pwrite_all(fd: int, view: memoryview, off: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], off + done)


def direct_io_works(dir_fd: int) -> bool:
    """Does the filesystem of directory `dir_fd` take O_DIRECT (tmpfs and some overlays do not)?"""
    name = f".probe-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_DIRECT, 0o600,
                     dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.EINVAL:  # some kernels create the file before refusing O_DIRECT
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
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
        os.unlink(name, dir_fd=dir_fd)
