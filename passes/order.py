"""Traversal order: which square computes when.

requires: -    provides: order (int, 0..n-1 over squares)
A schedule is a sort key over (i, j, k); adding one = a key here + conf/schedule/NAME.yaml.
With pipeline stages (passes/partition_stages.py) each rank runs its squares in this order, so a
step's GPU batches go first: while the last stage finishes batch k's token, the first stage
computes batch k+1 (micro-batches keep every stage busy). zigzag then groups the GPU batches into
as many micro-batches as stages and reuses each layer's weights within a micro-batch.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

from graphgen.build import squares

from . import PassError, register

Square = Tuple[int, int, int]

ORDERS: Dict[str, Callable[[Square], tuple]] = {
    # FlexGen's zig-zag block: for each token, each layer, all GPU batches (weights reused across batches)
    "zigzag": lambda n: (n[0], n[1], n[2]),
    # row-by-row (HF Accelerate, DeepSpeed): one GPU batch through all tokens and layers, then the next
    "row": lambda n: (n[2], n[0], n[1]),
}



def pipeline_key(name: str, stages: int, num_batches: int) -> Callable[[Square], tuple]:
    """The order of a pipelined graph: per step, micro-batch after micro-batch."""
    if name == "row":  # each GPU batch its own micro-batch, through the stage's layers
        return lambda n: (n[0], n[2], n[1])
    return lambda n: (n[0], n[2] * stages // num_batches, n[1], n[2])  # zigzag within a micro-batch


@register("order", provides=("order",))
def order(graph, cfg):
    name = cfg.schedule.name
    if name not in ORDERS:
        raise PassError(f"schedule.name={name!r} is unknown; known orders: {', '.join(sorted(ORDERS))}")
    stages = graph.graph.get("num_stages", 1)
    key = ORDERS[name] if stages == 1 else pipeline_key(name, stages, graph.graph["num_batches"])
    for pos, n in enumerate(sorted(squares(graph), key=key)):
        graph.nodes[n]["order"] = pos
    graph.graph["schedule"] = name
    return graph
