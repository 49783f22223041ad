"""I/O insertion: load / store nodes and frees around every square, with a prefetch distance.

requires: order, w_home, kv_home, act_home, attn_device
provides: on squares: slot (= order), w_buf, kv_buf, act_in (working-copy keys, None = use home),
          frees: [(buf, tier, kind, bytes)] working copies dropped after the square (last use);
          I/O nodes with op (load | store), tensor, buf, src, dst, bytes (over the link), slot, phase,
          square; weight loads also held (bytes kept at dst: the dequantised copy when compressed);
          w_dequant on the square that dequantises a compressed load (dense bytes it makes);
          stream: the async stream that runs the I/O node (load | store, or compute: below);
          graph.graph["ops"]: every node in execution order (the flat schedule executors run).
Within a slot t: loads issued at t (for squares t..t+prefetch), compute t, stores of t, then t's frees.
A load never goes earlier than the slot after its producer stored the data.
On a CPU machine (hardware.device=cpu) a load or store between the device and host tiers is a copy
within RAM: it runs on the compute stream, in schedule order, as the reference executor runs it.
A third thread would hide nothing there (compute already uses every core) and would only preempt
the compute threads: measured, in-memory decode ran 1.85x slower with the copies on their own
streams. Disk I/O keeps its streams.
"""
from __future__ import annotations

from . import PassError, register

LOAD, COMPUTE, STORE = 0, 1, 2


class _Batch:
    """Nodes and edges collected during the walk, added to the graph at once (fast)."""

    def __init__(self, cpu: bool):
        self.nodes, self.edges = [], []
        self.cpu = cpu

    def io(self, node, square, **attrs):
        attrs["square"] = square
        in_ram = self.cpu and "disk" not in (attrs["src"], attrs["dst"])
        attrs["stream"] = "compute" if in_ram else attrs["op"]
        self.nodes.append((node, attrs))
        self.edges.append((node, square) if attrs["op"] == "load" else (square, node))

    def edge(self, u, v):
        self.edges.append((u, v))


@register("insert_io", requires=("order", "w_home", "kv_home", "act_home", "attn_device"),
          provides=("slot", "w_buf", "kv_buf", "act_in"))
def insert_io(graph, cfg):
    p = cfg.policy
    if (p.compress_weight.bits or p.compress_cache.bits) and "compression" not in graph.graph:
        raise PassError("policy.compress_weight / policy.compress_cache set bits, but the pipeline has no "
                        "'compress' pass: add it to pipeline right after place_tensors")
    prefetch = max(0, int(cfg.executor.prefetch))
    A = dict(graph.nodes(data=True))  # plain dict access: views are slow at 100k+ nodes
    seq = sorted((n for n in A if "kind" in A[n]), key=lambda n: A[n]["order"])
    io = _Batch(cpu=cfg.hardware.device == "cpu")
    start = 0  # first square of the current run of one layer
    for idx, n in enumerate(seq):
        a = A[n]
        a["slot"], a["phase"], a["frees"] = a["order"], COMPUTE, []
        start = idx if idx == 0 or seq[idx - 1][1] != n[1] else start
        last = idx == len(seq) - 1 or seq[idx + 1][1] != n[1]
        _weights(io, A[seq[start]]["order"], last, n, a, prefetch)
        _activation_in(io, A, n, a, prefetch)
        if a["kind"] == "attn":
            _kv(io, A, n, a, prefetch)
        if a["kind"] != "head" and a["act_home"] != "device":
            io.io(("store", "act") + n, n, op="store", tensor=("act",) + n, buf=("act",) + n,
                  src="device", dst=a["act_home"], bytes=a["act_bytes"], slot=a["slot"], phase=STORE)
    graph.add_nodes_from(io.nodes)
    graph.add_edges_from(io.edges, dep="io")
    A.update(io.nodes)
    graph.graph["ops"] = sorted(seq + [m for m, _ in io.nodes], key=lambda m: _sort_key(A, m))
    return graph


def _sort_key(A, m):
    b = A[m]
    target = A[b["square"]]["order"] if "square" in b else b["order"]
    return (b["slot"], b["phase"], target, 0 if b.get("tensor", ("w",))[0] == "w" else 1)


def _weights(io, run_start, last, n, a, prefetch):
    """One load per run of consecutive squares of the same layer (zig-zag reuses it across batches)."""
    j = n[1]
    if a["w_home"] == "device" and (not a.get("w_compressed") or a.get("w_packed")):  # used where it lives
        a["w_buf"] = None
        return
    # compressed weights (passes/compress.py): the load moves the compressed bytes (none when they
    # live on the device) into w_buf; the run's first square dequantises them there (w_dequant), and
    # w_buf then holds w_work_bytes for the rest of the run
    held = a.get("w_work_bytes", a["w_bytes"])
    a["w_buf"] = ("w", j, run_start)
    if run_start == a["order"]:
        if a.get("w_compressed") and not a.get("w_packed"):  # the run's first square dequantises
            a["w_dequant"] = held
        moved = a["w_bytes"] if a["w_home"] != "device" else 0
        io.io(("load",) + a["w_buf"], n, op="load", tensor=("w", j), buf=a["w_buf"], src=a["w_home"],
            dst="device", bytes=moved, held=held, slot=max(0, a["order"] - prefetch), phase=LOAD)
    else:
        io.edge(("load",) + a["w_buf"], n)
    if last:
        a["frees"].append((a["w_buf"], "device", "w", held))


def _activation_in(io, A, n, a, prefetch):
    """The hidden state from the previous layer: loaded from its home unless it stayed on device."""
    i, j, k = n
    if j == 0:  # the embedding reads token ids, kept with the executor's block state
        a["act_in"] = None
        return
    prod = A[(i, j - 1, k)]
    buf = ("act", i, j - 1, k)
    a["act_in"] = buf
    if prod["act_home"] != "device":
        slot = max(a["order"] - prefetch, prod["order"] + 1)
        io.io(("load",) + buf, n, op="load", tensor=buf, buf=buf, src=prod["act_home"], dst="device",
            bytes=prod["act_bytes"], slot=slot, phase=LOAD)
        io.edge(("store",) + buf, ("load",) + buf)
    a["frees"].append((buf, "device", "act", prod["act_bytes"]))


def _kv(io, A, n, a, prefetch):
    """Attention reads the cached prefix (decode, or a chat turn's prefill); every attention
    square stores its new slice."""
    i, j, k = n
    where = "host" if a["attn_device"] == "host" else "device"
    a["kv_buf"] = None
    if a["ctx"] > a["s"] and a["kv_home"] != where:
        prev = A[(i - 1, j, k)] if i > 0 else {"order": -1}  # a past turn's cache is stored already
        buf = ("kv", j, k, i)
        a["kv_buf"] = buf
        slot = max(a["order"] - prefetch, prev["order"] + 1)
        io.io(("load",) + buf, n, op="load", tensor=("kv", j, k), buf=buf, src=a["kv_home"], dst=where,
            bytes=a["kv_read"], slot=slot, phase=LOAD)
        if i > 0:
            io.edge(("store", "kv", j, k, i - 1), ("load",) + buf)
        a["frees"].append((buf, where, "kv", a["kv_read"]))
    io.io(("store", "kv", j, k, i), n, op="store", tensor=("kv", j, k), buf=("kvnew", j, k, i),
        src=where, dst=a["kv_home"], bytes=a["kv_write"], slot=a["order"], phase=STORE)
