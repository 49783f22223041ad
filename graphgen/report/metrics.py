"""A run's trace (executors/trace.py) as numbers: busy time per stream, overlap of I/O with
compute, bytes and GB/s per link, from the events alone (so it works for any executor's trace)."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

Interval = Tuple[float, float]
NOT_IO = ("compute", "send", "recv")  # a pipeline stage's messages (a receive mostly waits) are not tier I/O


# --- interval arithmetic ----------------------------------------------------------------------

def merge(iv: List[Interval]) -> List[Interval]:
    """Union of intervals as a sorted list of disjoint intervals."""
    out: List[List[float]] = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def length(merged: List[Interval]) -> float:
    return sum(e - s for s, e in merged)


def overlap(a: List[Interval], b: List[Interval]) -> float:
    """Length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# --- metrics ------------------------------------------------------------------------------------

def _link(ev, nodes: Optional[Dict[str, dict]]) -> str:
    """The event's src->dst, from the event or (older traces) from the graph node it names."""
    if getattr(ev, "link", ""):
        return ev.link
    a = (nodes or {}).get(ev.name)
    return f"{a['src']}->{a['dst']}" if a and "src" in a else ""


def node_index(graph) -> Optional[Dict[str, dict]]:
    """str(node) -> attributes, to look up the op an event names."""
    return None if graph is None else {str(n): a for n, a in graph.nodes(data=True)}


def trace_metrics(events: Sequence, graph=None) -> Dict:
    """Busy seconds per stream, I/O-compute overlap, bytes / busy seconds / GB/s per link.

    overlap_fraction = time I/O runs while compute runs / time I/O runs (0: nothing hidden,
    1: every transfer hidden under compute); I/O is loads and stores between tiers, not a
    pipeline stage's sends and receives. Link bytes count the load and store streams
    (transfers), so per-thread disk I/O events do not count twice.
    """
    if not events:
        return {}
    nodes = node_index(graph)
    by_stream: Dict[str, List[Interval]] = defaultdict(list)
    link_iv: Dict[str, List[Interval]] = defaultdict(list)
    link_bytes: Dict[str, int] = defaultdict(int)
    for ev in events:
        by_stream[ev.stream].append((ev.start, ev.end))
        if ev.stream in ("load", "store"):
            link = _link(ev, nodes)
            if link and link.split("->")[0] != link.split("->")[-1]:
                link_iv[link].append((ev.start, ev.end))
                link_bytes[link] += ev.bytes
    compute = merge(by_stream.get("compute", []))
    io = merge([iv for s, ivs in by_stream.items() if s not in NOT_IO for iv in ivs])
    busy = {link: length(merge(iv)) for link, iv in link_iv.items()}
    io_s = length(io)
    return {
        "trace_span_s": max(e.end for e in events) - min(e.start for e in events),
        "stream_busy_s": {s: length(merge(iv)) for s, iv in by_stream.items()},
        "compute_busy_s": length(compute), "io_busy_s": io_s,
        "overlap_fraction": overlap(compute, io) / io_s if io_s else 0.0,
        "link_bytes": dict(link_bytes), "link_busy_s": busy,
        "link_gbps": {k: link_bytes[k] / busy[k] / 1e9 for k in busy if busy[k] > 0},
    }
