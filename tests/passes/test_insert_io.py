"""passes/insert_io.py: load / store nodes, weights reused across a zig-zag block, prefetch."""
from .graphs import compiled, config

WEIGHTS_ON_HOST = [0, 100, 100, 0, 100, 0]


def loads(g):
    return [n for n in g.graph["ops"] if g.nodes[n].get("op") == "load"]


def test_zigzag_loads_each_layer_once_per_token_row_loads_per_square():
    zig, _ = compiled(config("zigzag", WEIGHTS_ON_HOST))
    row, _ = compiled(config("row", WEIGHTS_ON_HOST))
    assert len(loads(zig)) == 3 * 4  # tokens x layers: weights reused across the 4 batches
    assert len(loads(row)) == 3 * 4 * 4  # every square loads its layer


def test_loads_come_before_use_and_after_their_producer():
    g, _ = compiled(config("row", [0, 0, 0, 0, 0, 0]))
    pos = {n: p for p, n in enumerate(g.graph["ops"])}
    for n in loads(g):
        assert pos[n] < pos[g.nodes[n]["square"]]
        for pred in g.predecessors(n):
            assert pos[pred] < pos[n]


def test_prefetch_overlaps_next_weights_with_current_compute():
    g, _ = compiled(config("zigzag", WEIGHTS_ON_HOST, prefetch=1))
    ops = g.graph["ops"]
    i = ops.index(("load", "w", 2, g.nodes[(0, 2, 0)]["order"]))
    assert ops[i + 1] == (0, 1, 3)  # the mlp weights load right before the last attention square
