"""The async executor's stream plan, shared with the cost model: which stream (load / compute /
store, and comm for a pipeline stage's sends and receives) runs each op of the flat schedule, and
how many ops of each stream must be done before it may start (the rules are in
executors/async_streams.py)."""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Tuple

STREAMS = ("load", "compute", "store", "comm")
STREAM_OF = {"send": "comm", "recv": "comm"}  # op -> stream, where they differ
STORE_LAG = 2  # compute t waits for the stores of slot t - 2: one slot of stores overlaps compute


@dataclass
class StreamPlan:
    ops: Dict[str, List]  # stream -> its nodes, in schedule order
    waits: Dict[object, Tuple[int, ...]]  # node -> ops done needed on each of STREAMS
    stores_of: Dict[object, List]  # square -> its store nodes


def plan_streams(graph, ops, store_lag: int = STORE_LAG) -> StreamPlan:
    """Split the flat schedule into streams and turn dependencies into progress counts."""
    A = graph.nodes
    lists: Dict[str, List] = {s: [] for s in STREAMS}
    pos = {}
    for n in ops:
        s = stream_of(A[n])
        pos[n] = (s, len(lists[s]))
        lists[s].append(n)
    load_slots = [A[n]["slot"] for n in lists["load"]]
    compute_slots = [A[n]["slot"] for n in lists["compute"]]
    store_slots = [A[n]["slot"] for n in lists["store"]]
    waits = {}
    for n in ops:
        a, (s, idx) = A[n], pos[n]
        need = dict.fromkeys(STREAMS, 0)
        for p in _producers(graph, n, a):
            if p in pos:
                ps, pidx = pos[p]
                assert ps != s or pidx < idx, f"{p} runs after its consumer {n} on stream {s}"
                need[ps] = max(need[ps], pidx + 1)
        if s == "load" or a.get("op") == "recv":  # not before the compute of the previous slot (memory plan)
            need["compute"] = max(need["compute"], bisect_left(compute_slots, a["slot"]))
        elif s == "compute":
            need["store"] = max(need["store"], bisect_right(store_slots, a["slot"] - store_lag))
        elif s == "store":
            need["load"] = max(need["load"], bisect_right(load_slots, a["slot"]))
        need[s] = 0  # same stream: order already guarantees it
        waits[n] = tuple(need[x] for x in STREAMS)
    stores_of: Dict[object, List] = defaultdict(list)
    for n in lists["store"]:
        stores_of[A[n]["square"]].append(n)
    return StreamPlan(lists, waits, dict(stores_of))


def stream_of(a) -> str:
    """The stream that runs a node: its own `stream` (passes/insert_io.py: CPU copies within RAM
    run on compute), or by its op."""
    op = a.get("op", "compute")
    return a.get("stream") or STREAM_OF.get(op, op)


def _producers(graph, n, a):
    yield from graph.predecessors(n)
    if a.get("kind") == "attn" and n[0] > 0 and a.get("kv_buf") is None:
        i, j, k = n  # the cache is read in place: the previous step's slice must be stored
        yield ("store", "kv", j, k, i - 1)
