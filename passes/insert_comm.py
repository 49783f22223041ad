"""Communication: a send and a receive node on every edge that crosses pipeline stages.

requires: slot (I/O inserted), stage    provides: on every op node: stage (the rank that runs it);
send / recv nodes with op, tensor, buf, stage, peer (the other stage), src / dst ("stageS"),
bytes, shape, dtype ("act": the model's dtype, "tok": int64), tag (matches a send with its
receive), slot, phase, square; graph.graph["ops"] re-sorted with them.
Activations go forward (the last layer of a stage -> the first of the next); the sampled token
ids go from the last stage back to the first (the head's output -> the next step's embedding).
A send leaves when its square has computed (store phase of its slot); a receive is posted up to
executor.prefetch slots ahead of its square, never before the slot after its send.
Without stages (one process) the pass changes nothing.
"""
from __future__ import annotations

from . import register
from .insert_io import LOAD, STORE, _sort_key


@register("insert_comm", requires=("slot",))
def insert_comm(graph, cfg):
    if graph.graph.get("num_stages", 1) == 1:
        return graph
    A = dict(graph.nodes(data=True))
    spec, sh, nb = graph.graph["spec"], graph.graph["shape"], graph.graph["num_batches"]
    L, prefetch = graph.graph["num_layers"], max(0, int(cfg.executor.prefetch))
    stage_of = graph.graph["stage_of_layer"]
    nodes, edges = [], []
    for u, v, dep in crossing(stage_of, graph.graph["num_tokens"], nb):
        i, j, k = u
        what = "act" if dep == "act" else "tok"
        shape = (sh.batch, A[u]["s"], spec.act_dim(A[u]["kind"])) if what == "act" else (sh.batch,)
        tag = ((i * L + j) * nb + k) * 2 + (what == "tok")
        su, sv = stage_of[u[1]], stage_of[v[1]]
        common = dict(tensor=(what, i, j, k), buf=("act", i, j, k) if what == "act" else None, shape=shape,
                      dtype="model" if what == "act" else "int64", tag=tag,
                      bytes=A[u]["act_bytes"], src=f"stage{su}", dst=f"stage{sv}")
        send, recv = ("send", what, i, j, k), ("recv", what, i, j, k)
        nodes.append((send, dict(common, op="send", stage=su, peer=sv, square=u, slot=A[u]["slot"], phase=STORE)))
        slot = max(A[v]["slot"] - prefetch, A[u]["slot"] + 1)
        nodes.append((recv, dict(common, op="recv", stage=sv, peer=su, square=v, slot=slot, phase=LOAD)))
        edges += [(u, send, "io"), (send, recv, "comm"), (recv, v, "io")]
    graph.add_nodes_from(nodes)
    graph.add_edges_from((a, b, {"dep": d}) for a, b, d in edges)
    A.update(nodes)
    for m in graph.graph["ops"]:  # loads and stores run where their square does
        if "square" in A[m] and "stage" not in A[m]:
            A[m]["stage"] = A[A[m]["square"]]["stage"]
    graph.graph["ops"] = sorted(graph.graph["ops"] + [m for m, _ in nodes], key=lambda m: _sort_key(A, m))
    return graph



def crossing(stage_of, gen_len: int, nb: int):
    """(producer, consumer, dep) of every edge between stages: activations out of each stage's
    last layer, token ids from the head back to the embedding."""
    last = len(stage_of) - 1
    ends = [j for j in range(last) if stage_of[j] != stage_of[j + 1]]
    for i in range(gen_len):
        for k in range(nb):
            for j in ends:
                yield (i, j, k), (i, j + 1, k), "act"
            if i > 0 and stage_of[last] != stage_of[0]:
                yield (i - 1, last, k), (i, 0, k), "token"
