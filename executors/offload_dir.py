"""The offload directory and each run's private directory in it.

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
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

from .disk_io import FileIO

RUN_PREFIX = "graphgen-"  # run directories in the offload dir
LOCK = ".lock"  # in a run directory: flocked by its run while it lives
ORPHAN_AGE_S = 600  # a run directory without a lock this old was left by a run killed while making it


class UnsafeOffloadDir(PermissionError):
    """The offload directory could let another user read or redirect graphgen's files."""


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


def _user(uid: int) -> str:
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


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
