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


def test_cpu_copies_within_ram_run_on_compute_disk_io_keeps_its_streams():
    """hardware.device=cpu: device <-> host copies run inline on compute; disk I/O on its stream."""
    cpu, _ = compiled(config("zigzag", [0, 50, 50, 50, 0, 100]))
    io = [cpu.nodes[n] for n in cpu.graph["ops"] if cpu.nodes[n].get("op") in ("load", "store")]
    on_disk = [b for b in io if "disk" in (b["src"], b["dst"])]
    assert on_disk and len(on_disk) < len(io)  # both kinds are present
    for b in io:
        assert b["stream"] == (b["op"] if b in on_disk else "compute")
    gpu_cfg = config("zigzag", [0, 50, 50, 50, 0, 100])
    gpu_cfg.hardware.device = "cuda"  # the pass only reads the key: no GPU needed
    gpu, _ = compiled(gpu_cfg)
    assert all(gpu.nodes[n]["stream"] == gpu.nodes[n]["op"] for n in gpu.graph["ops"]
               if gpu.nodes[n].get("op") in ("load", "store"))
