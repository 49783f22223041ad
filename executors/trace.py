"""Run trace: per-op start/end per stream, bytes moved, memory per tier over time."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List

STREAM = {"load": "load", "compute": "compute", "store": "store"}


@dataclass
class Event:
    stream: str  # load | compute | store (or a disk I/O thread name)
    name: str
    start: float  # seconds since the trace began
    end: float
    bytes: int
    tier_bytes: Dict[str, int]  # bytes in use per tier when the op ended
    link: str = ""  # src->dst tier of a load / store ("" for compute)


@dataclass
class Trace:
    t0: float = field(default_factory=time.perf_counter)
    t0_wall: float = field(default_factory=time.time)  # t0 on the wall clock: aligns the ranks of a pipeline
    events: List[Event] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, op: str, node, start: float, end: float, nbytes: int, tier_bytes: Dict[str, int],
            link: str = "") -> None:
        ev = Event(STREAM.get(op, op), str(node), start - self.t0, end - self.t0, nbytes, tier_bytes, link)
        with self._lock:
            self.events.append(ev)
