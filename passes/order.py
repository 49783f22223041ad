"""Traversal order: which square computes when.

requires: -    provides: order (int, 0..n-1 over squares)
A schedule is a sort key over (i, j, k); adding one = a key here + conf/schedule/NAME.yaml.
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


@register("order", provides=("order",))
def order(graph, cfg):
    name = cfg.schedule.name
    if name not in ORDERS:
        raise PassError(f"schedule.name={name!r} is unknown; known orders: {', '.join(sorted(ORDERS))}")
    for pos, n in enumerate(sorted(squares(graph), key=ORDERS[name])):
        graph.nodes[n]["order"] = pos
    graph.graph["schedule"] = name
    return graph
