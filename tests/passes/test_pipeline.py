"""Passes on small graphs with golden expectations: order, placement, delegation, I/O, memory."""
from __future__ import annotations

import pytest

from graphgen.build import build_graph, squares
from graphgen.config import compose
from graphgen.models import build_spec, hf_config_from_arch
from passes import PassError, run_pipeline
from passes.place_tensors import split

TINY = {"model_type": "opt", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "ffn_dim": 32,
        "num_attention_heads": 2, "max_position_embeddings": 64, "word_embed_proj_dim": 16}


def compiled(overrides=(), tokens=3, batches=4, names=None, prompt_len=4):
    """The paper's figure: 3 tokens x 4 layers (embed, attn, mlp, head) x 4 batches."""
    cfg = compose(list(overrides))
    spec = build_spec(hf_config_from_arch(TINY))
    g = build_graph(spec, batch=2, num_batches=batches, prompt_len=prompt_len, gen_len=tokens)
    return run_pipeline(g, cfg, names), cfg


def compute_sequence(g):
    return [n for n in g.graph["ops"] if "kind" in g.nodes[n]]


def test_graph_shape_and_edges():
    spec = build_spec(hf_config_from_arch(TINY))
    g = build_graph(spec, batch=2, num_batches=4, prompt_len=4, gen_len=3)
    assert len(list(squares(g))) == 3 * 4 * 4
    deps = {d for _, _, d in g.edges(data="dep")}
    assert deps == {"act", "kv", "token"}
    assert g.edges[(0, 3, 1), (1, 0, 1)]["dep"] == "token"
    assert g.edges[(0, 1, 2), (1, 1, 2)]["dep"] == "kv"
    assert g.nodes[(0, 1, 0)]["s"] == 4 and g.nodes[(2, 1, 0)]["ctx"] == 6


def test_zigzag_goes_layer_by_layer_across_batches():
    g, _ = compiled(["schedule=zigzag"], names=["order"])
    first = sorted(squares(g), key=lambda n: g.nodes[n]["order"])[:6]
    assert first == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 0), (0, 1, 1)]


def test_row_runs_one_batch_through_everything():
    g, _ = compiled(["schedule=row"], names=["order"])
    seq = sorted(squares(g), key=lambda n: g.nodes[n]["order"])
    assert seq[:5] == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0), (1, 0, 0)]
    assert seq[12] == (0, 0, 1)


def test_unknown_schedule_names_the_known_ones():
    with pytest.raises(PassError, match="known orders: row, zigzag"):
        compiled(["schedule.name=diagonal"], names=["order"])


def test_split_matches_percents_by_midpoint():
    assert split([1] * 10, 30, 50) == ["device"] * 3 + ["host"] * 5 + ["disk"] * 2
    assert split([1, 1, 8], 50, 50) == ["device", "device", "host"]


def test_placement_follows_the_six_percents():
    g, _ = compiled(["policy.percent=[50,50,0,50,0,0]"], names=["order", "place_tensors"])
    kv = [g.nodes[(0, 1, k)]["kv_home"] for k in range(4)]
    assert kv == ["host", "host", "disk", "disk"]
    assert {g.nodes[n]["act_home"] for n in squares(g) if g.nodes[n]["kind"] != "head"} == {"disk"}
    assert g.nodes[(0, 0, 0)]["w_home"] == "device"  # the embedding is the first half of the bytes


def test_bad_percent_is_refused_naming_the_key():
    with pytest.raises(PassError, match="policy.percent"):
        compiled(["policy.percent=[80,40,0,0,0,0]"], names=["order", "place_tensors"])


def test_cpu_attention_delegates_decode_only():
    g, _ = compiled(["policy.percent=[100,0,0,100,100,0]", "policy.cpu_attention=true"],
                    names=["order", "place_tensors", "delegate_cpu_attention"])
    assert g.nodes[(0, 1, 0)]["attn_device"] == "device"  # prefill stays on the device
    assert g.nodes[(2, 1, 0)]["attn_device"] == "host"


def test_zigzag_loads_each_layer_once_per_token_row_loads_per_square():
    pct = "policy.percent=[0,100,100,0,100,0]"
    zig, _ = compiled(["schedule=zigzag", pct])
    row, _ = compiled(["schedule=row", pct])
    loads = lambda g: [n for n in g.graph["ops"] if g.nodes[n].get("op") == "load"]  # noqa: E731
    assert len(loads(zig)) == 3 * 4  # tokens x layers: weights reused across the 4 batches
    assert len(loads(row)) == 3 * 4 * 4  # every square loads its layer


def test_loads_come_before_use_and_after_their_producer():
    g, _ = compiled(["policy.percent=[0,0,0,0,0,0]", "schedule=row"])
    pos = {n: p for p, n in enumerate(g.graph["ops"])}
    for n in g.graph["ops"]:
        b = g.nodes[n]
        if b.get("op") == "load":
            assert pos[n] < pos[b["square"]]
            for pred in g.predecessors(n):
                assert pos[pred] < pos[n]


def test_prefetch_overlaps_next_weights_with_current_compute():
    g, _ = compiled(["policy.percent=[0,100,100,0,100,0]", "schedule=zigzag", "executor.prefetch=1"])
    ops = g.graph["ops"]
    i = ops.index(("load", "w", 2, g.nodes[(0, 2, 0)]["order"]))
    assert ops[i + 1] == (0, 1, 3)  # the mlp weights load right before the last attention square


def test_plan_over_budget_is_refused_with_advice():
    with pytest.raises(PassError) as e:
        compiled(["hardware.device_mem=1000"])
    msg = str(e.value)
    assert "hardware.device_mem" in msg and "policy.percent[0]" in msg and "plan_memory" in msg
    assert "passes already run: ['order'" in msg


def test_peaks_count_weights_at_home_and_working_copies():
    g, _ = compiled(["policy.percent=[0,100,100,0,100,0]"])
    peak = g.graph["peak_bytes"]
    w_total = sum(g.nodes[(0, j, 0)]["w_bytes"] for j in range(4))
    assert peak["host"] == w_total
    two_layers = max(g.nodes[(0, j, 0)]["w_bytes"] + g.nodes[(0, j + 1, 0)]["w_bytes"] for j in range(3))
    assert peak["device"] >= two_layers  # prefetch keeps the next layer beside the current one


def test_missing_requirement_names_the_pass():
    with pytest.raises(PassError, match="insert_io.*requires"):
        compiled([], names=["order", "insert_io"])


def test_unknown_pass_lists_known():
    with pytest.raises(PassError, match="known passes:.*place_tensors"):
        compiled([], names=["order", "magic"])
