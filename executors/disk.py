"""Disk tier: values in files of a private run directory inside the offload dir.

Placement: a value's tensors back to back at 4096-aligned offsets in one file; a KV cache
[2, S_max, ...] as two halves, each at an aligned offset, so a prefix is two reads; weights
already in a safetensors checkpoint are read in place (put_external), not copied. The free
space is checked before anything is written (check_space). The reads and writes themselves
(O_DIRECT, thread pool, read buffers) are executors/disk_io.py.

The offload dir may be shared (e.g. /tmp), so:
- the default is private to the user: $GRAPHGEN_OFFLOAD_DIR, else $XDG_CACHE_HOME/graphgen/offload
  (~/.cache/graphgen/offload), made with mode 0700. Not $XDG_RUNTIME_DIR: a RAM-backed tmpfs
  would turn the "disk" tier into memory;
- an offload dir owned by another user (root's excepted), or writable by group or others
  without the sticky bit, is refused before anything is written;
- the run's directory is made like mkdtemp (a random name, mode 0700) relative to the offload
  dir's descriptor, and every file is opened relative to the run directory's descriptor with
  O_NOFOLLOW (new files with O_EXCL): renaming either path or swapping in a symlink cannot
  redirect a read or a write;
- nothing is created before the first write (an all-device run never touches the offload dir);
- the run directory holds a lock file, flocked while the run lives; it is removed on close,
  after an error, at interpreter exit and on SIGTERM (which unwinds like Ctrl-C); a directory
  whose lock nobody holds (its run was SIGKILLed) is reclaimed by the next run that opens the
  offload dir.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import signal
import stat
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Hashable, Iterator, List, Optional, Tuple

import torch

from graphgen.config import format_bytes

from .disk_io import ALIGN, FileIO, ReadBuffers, align, aligned_empty, direct_io_works, merge_spans
from .tiers import Tier, Value, nbytes

RUN_PREFIX = "graphgen-"  # run directories in the offload dir
LOCK = ".lock"  # in a run directory: flocked by its run while it lives
ORPHAN_AGE_S = 600  # a run directory without a lock this old was left by a run killed while making it


class DiskFull(OSError):
    """The offload directory cannot hold what the plan writes there."""


class UnsafeOffloadDir(PermissionError):
    """The offload directory could let another user read or redirect graphgen's files."""


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


def default_offload_dir() -> str:
    """$GRAPHGEN_OFFLOAD_DIR, else a per-user directory under $XDG_CACHE_HOME (~/.cache)."""
    env = os.environ.get("GRAPHGEN_OFFLOAD_DIR")
    if env:
        return env
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "graphgen", "offload")


# --- the offload dir and the run's directory ----------------------------------------------------

class RunDir:
    """This run's private directory in the offload dir: made on first use, locked while the run
    lives, removed by cleanup() (close, error, interpreter exit, SIGTERM)."""

    def __init__(self, offload_dir: str):
        self.offload_dir = offload_dir
        self.parent_fd: Optional[int] = None  # the checked offload dir
        self.fd: Optional[int] = None  # the run directory
        self.lock_fd: Optional[int] = None
        self.name: Optional[str] = None
        self.made: List[str] = []  # directories created for the offload dir, deepest first
        self.reclaimed = (0, 0)  # (stale run directories removed, their bytes)

    @property
    def path(self) -> Optional[str]:
        return os.path.join(self.offload_dir, self.name) if self.name else None

    def open_parent(self) -> int:
        """The offload dir, checked, after reclaiming what killed runs left there."""
        if self.parent_fd is None:
            self.parent_fd, self.made = open_offload_dir(self.offload_dir)
            self.reclaimed = reclaim_stale(self.parent_fd, self.offload_dir)
        return self.parent_fd

    def create(self) -> int:
        parent = self.open_parent()
        try:
            self.name, self.fd, self.lock_fd = make_run_dir(parent)
        except OSError as e:
            raise OSError(e.errno, f"hardware.offload_dir={self.offload_dir!r} is not writable ({e.strerror}): "
                                   "set hardware.offload_dir to a writable directory") from None
        return self.fd

    def cleanup(self, io: Optional[FileIO] = None) -> None:
        if io is not None:
            io.close()
        if self.name is not None:
            shutil.rmtree(self.name, dir_fd=self.parent_fd, ignore_errors=True)
        for fd in (self.lock_fd, self.fd, self.parent_fd):
            if fd is not None:
                os.close(fd)
        self.name = self.fd = self.lock_fd = self.parent_fd = None
        _remove_dirs(self.made)
        self.made = []


@contextmanager
def private_run_dir(offload_dir: Optional[str] = None) -> Iterator[str]:
    """The path of a fresh private run directory in the (checked) offload dir, removed after:
    for tools that open files by path (the disk probes of graphgen.perf)."""
    run = RunDir(os.path.abspath(os.path.expanduser(offload_dir or default_offload_dir())))
    try:
        run.create()
        yield run.path
    finally:
        run.cleanup()


def open_offload_dir(path: str) -> Tuple[int, List[str]]:
    """(descriptor of the offload dir, the directories made for it): made 0700 where missing,
    refused when another user could write into it or owns it."""
    made = _missing_parents(path)
    try:
        for d in reversed(made):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                made.remove(d)
        fd = _open_dir(path)
    except OSError as e:
        _remove_dirs(made)
        if isinstance(e, UnsafeOffloadDir):
            raise
        raise OSError(e.errno, f"hardware.offload_dir={path!r} is not writable ({e.strerror}): "
                               "set hardware.offload_dir to a writable directory") from None
    try:
        check_private(os.fstat(fd), path)
    except UnsafeOffloadDir:
        os.close(fd)
        _remove_dirs(made)
        raise
    return fd, made


def _open_dir(path: str) -> int:
    """The directory at path; through a final symlink only if this user (or root) owns the link."""
    flags = os.O_RDONLY | os.O_DIRECTORY
    try:
        return os.open(path, flags | os.O_NOFOLLOW)
    except OSError as e:  # a symlink as the last component: ELOOP, or ENOTDIR with O_DIRECTORY
        if e.errno not in (errno.ELOOP, errno.ENOTDIR) or not os.path.islink(path):
            raise
    owner = os.lstat(path).st_uid
    if owner not in (os.geteuid(), 0):
        raise UnsafeOffloadDir(errno.EPERM, f"hardware.offload_dir={path!r} is a symlink owned by "
                                            f"{_user(owner)}, not by this user: another user could point it "
                                            f"anywhere; use a directory of your own (default: {default_offload_dir()})")
    return os.open(path, flags)


def check_private(st: os.stat_result, path: str) -> None:
    """Refuse a directory another user owns, or that group or others may write without the sticky bit."""
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        raise UnsafeOffloadDir(errno.EPERM, f"hardware.offload_dir={path!r} belongs to {_user(st.st_uid)}, "
                                            f"not to this user ({_user(me)}): its owner could read or redirect "
                                            f"the offload files; use a directory of your own "
                                            f"(default: {default_offload_dir()})")
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not st.st_mode & stat.S_ISVTX:
        who = "group and others" if writable == stat.S_IWGRP | stat.S_IWOTH else \
            "its group" if writable == stat.S_IWGRP else "others"
        raise UnsafeOffloadDir(errno.EPERM, f"hardware.offload_dir={path!r} is writable by {who} "
                                            f"(mode {stat.S_IMODE(st.st_mode):o}) without the sticky bit: they "
                                            f"could swap graphgen's files; `chmod go-w` it, or use a directory "
                                            f"of your own (default: {default_offload_dir()})")


def make_run_dir(parent_fd: int) -> Tuple[str, int, int]:
    """(name, descriptor, lock descriptor) of a new 0700 directory with a random name (as mkdtemp,
    but relative to the offload dir's descriptor), its lock file flocked."""
    for _ in range(100):
        name = RUN_PREFIX + secrets.token_hex(6)
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(errno.EEXIST, "no unused run directory name in 100 tries")
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    try:
        return name, fd, _take_lock(fd)
    except BaseException:
        os.close(fd)
        shutil.rmtree(name, dir_fd=parent_fd, ignore_errors=True)
        raise


def _take_lock(run_fd: int) -> int:
    """Lock file LOCK, flocked before it gets its name: a LOCK nobody holds is a dead run's."""
    tmp = f"{LOCK}-{os.getpid()}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=run_fd)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp, LOCK, src_dir_fd=run_fd, dst_dir_fd=run_fd)
    return fd


def reclaim_stale(parent_fd: int, where: str = "") -> Tuple[int, int]:
    """Remove this user's run directories whose lock no process holds; (count, bytes) removed."""
    count = size = 0
    with os.scandir(parent_fd) as entries:
        stale = [e.name for e in entries if e.name.startswith(RUN_PREFIX) and e.is_dir(follow_symlinks=False)]
    for name in stale:
        freed = _reclaim(parent_fd, name)
        if freed is not None:
            count, size = count + 1, size + freed
    if count:
        print(f"graphgen: removed {count} offload run director{'y' if count == 1 else 'ies'} left by killed "
              f"runs ({size / 1e6:.1f} MB) in {where}", file=sys.stderr)
    return count, size


def _reclaim(parent_fd: int, name: str) -> Optional[int]:
    """Bytes freed if directory `name` was a dead run's and is now removed, else None."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError:
        return None
    lock = None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            return None
        try:
            lock = os.open(LOCK, os.O_RDWR | os.O_NOFOLLOW, dir_fd=fd)
        except FileNotFoundError:  # killed before locking, or being made right now
            if time.time() - st.st_mtime < ORPHAN_AGE_S:
                return None
        if lock is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its run is alive
                return None
        freed = _tree_bytes(fd)
        shutil.rmtree(name, dir_fd=parent_fd, ignore_errors=True)
        return freed
    except OSError:
        return None
    finally:
        if lock is not None:
            os.close(lock)
        os.close(fd)


def _tree_bytes(dir_fd: int) -> int:
    with os.scandir(dir_fd) as entries:
        return sum(e.stat(follow_symlinks=False).st_blocks * 512 for e in entries if e.is_file(follow_symlinks=False))


_SIGTERM_LOCK = threading.Lock()


def sigterm_unwinds() -> None:
    """SIGTERM raises SystemExit(143) in the main thread, as Ctrl-C raises KeyboardInterrupt: the
    run unwinds (close, finally blocks, exit handlers) and its offload files are removed. Only where
    SIGTERM still has its default action (an application's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread():
        return
    with _SIGTERM_LOCK:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


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
    def alloc(self, key, shape, dtype) -> None:
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


def _user(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _disk_error(err: OSError, offload_dir: str) -> OSError:
    if err.errno == errno.ENOSPC:
        return DiskFull(errno.ENOSPC, f"disk full while writing to hardware.offload_dir={offload_dir!r}: "
                                      f"free space there or set hardware.offload_dir to a larger disk")
    return err


def _missing_parents(path: str) -> List[str]:
    """The directories makedirs(path) would create, deepest first."""
    made = []
    while path and not os.path.lexists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def _remove_dirs(dirs: List[str]) -> None:
    for d in dirs:  # deepest first; only if still empty (someone else may have put files there)
        try:
            os.rmdir(d)
        except OSError:
            break
