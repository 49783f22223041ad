"""Measured memory peaks of a run, to set beside the planned ones.

CPU: the process's peak resident set (the kernel's VmHWM, reset at the start of the block
through /proc/self/clear_refs; where that is not allowed, a thread samples VmRSS every 2 ms).
CUDA: torch.cuda.max_memory_allocated, reset at the start.

What the plan does not count, and a run may use beyond it (the stated overhead):
- the process before the block (interpreter, torch, model code, the graph): `base`, measured;
- while weights are placed: one weight tensor twice in float32 (dummy weights are drawn in
  float32 and scaled; checkpoint tensors converted), plus its copy in the run dtype;
- the attention scratch (executor.attn.scratch): the joined K/V of one square at the longest
  context (loaded or compressed caches; a dense cache at home is read in place);
- disk I/O: one aligned staging chunk per I/O thread (disk.CHUNK each);
- weights read from disk (CPU): freed read buffers kept for the next read of their size, two
  per distinct layer size, never past the device budget (disk.ReadBuffers);
- async executor: the stores of one slot in flight while the next square computes;
- allocator slack: 5 % of the plan plus 64 MiB (glibc arenas, torch's CPU allocator).
"""
from __future__ import annotations

import ctypes
import re
import threading
from typing import Dict, Optional

import torch

_STATUS = "/proc/self/status"
SLACK_FRACTION = 0.05
SLACK_BYTES = 64 << 20


def _status(field: str) -> int:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else 0
    except OSError:
        return 0


def rss() -> int:
    """Resident set size of this process, bytes (0 where /proc is missing)."""
    return _status("VmRSS")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS counter (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: process RSS before / at peak, and the CUDA allocator's peak, during a block."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.base = self.peak = self.cuda_peak = 0
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        self.base = self.peak = rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if not _reset_hwm():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="graphgen-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss())
        else:
            self.peak = max(_status("VmHWM"), self.base)
        if self.device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)

    def result(self) -> Dict[str, int]:
        return {"rss_base": self.base, "rss_peak": self.peak, "cuda_peak": self.cuda_peak}


def keep_freed_memory() -> bool:
    """glibc: serve large tensors from the heap and keep freed memory there for reuse, instead of
    one mmap per large allocation (page faults on every touch of every fresh layer, read buffer
    and activation: on a busy 2-core machine that costs ~15% of an offloaded run). The process
    then holds its high-water mark, which is what the plan bounds anyway. No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 40))
    except (OSError, AttributeError):
        return False


def stated_overhead(planned: int, extra: int) -> int:
    """Bytes a run may use beyond `planned` besides the base process: `extra` (see the module
    docstring: weight placement, I/O staging, stores in flight) plus allocator slack."""
    return int(extra + SLACK_FRACTION * planned + SLACK_BYTES)
