"""Cost model and simulator: FlexGen's T4 experiments land where FlexGen's own cost model puts them
(and near the published measurement for OPT-30B); stream semantics on tiny graphs; the calibration's
regression is the cost model's pricing."""
from __future__ import annotations

import numpy as np
import pytest

from graphgen.build import build_graph, squares
from graphgen.perf.calibrate import COMPUTE_KEYS, fit_relative, square_features
from graphgen.config import compose
from graphgen.perf.costmodel import CostModel, simulate, square_parts
from graphgen.models import build_spec, hf_config_from_arch
from graphgen.perf.simulate import predict
from passes import run_pipeline

TINY = {"model_type": "opt", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "ffn_dim": 128,
        "num_attention_heads": 4, "max_position_embeddings": 128, "word_embed_proj_dim": 32}
# a GPU-like machine: device apart from the host (PCIe 10 GB/s), disk 0.5 GB/s
PROFILE = {"device_flops_float32": 1e12, "device_flops_decode_float32": 2e11, "device_bmm_flops_float32": 5e11,
           "device_attn_bw": 2e11, "cpu_attn_bw": 1e10, "h2d_bw": 1e10, "d2h_bw": 1e10, "disk_read_bw": 5e8,
           "disk_write_bw": 5e8, "device_is_host": 0.0}


def tiny(percent, executor="async", cpu_attention=False, batches=2):
    cfg = compose(["model=opt-125m", "model.dtype=float32", f"executor={executor}", "hardware.device=cuda",
                   f"policy.percent={percent}", f"policy.cpu_attention={str(cpu_attention).lower()}"])
    cfg.hardware.profile = dict(PROFILE)
    g = build_graph(build_spec(hf_config_from_arch(TINY)), batch=4, num_batches=batches, prompt_len=16,
                    gen_len=4, dtype="float32")
    return run_pipeline(g, cfg), cfg


@pytest.mark.parametrize("experiment,lo,hi,bottleneck", [
    # FlexGen's LP cost model (experimental/cost_model.py) gives 0.154 tok/s for this policy: the KV
    # cache (657 GB) is read from disk at 0.473 GB/s every decode step. Published measurement: 0.69.
    ("flexgen-opt-175b-t4", 0.13, 0.18, "load (disk->host)"),
    # FlexGen's cost model: 7.1 tok/s; published measurement: 7.32
    ("flexgen-opt-30b-t4", 6.6, 8.4, "compute"),
])
def test_flexgen_t4_experiments(experiment, lo, hi, bottleneck):
    cfg = compose(["job=simulate", f"experiment={experiment}"])
    pr = predict(cfg)
    assert lo <= pr.total_tok_s <= hi, pr.total_tok_s
    assert pr.bottleneck.startswith(bottleneck)
    assert pr.overlap and pr.bound_tok_s >= pr.total_tok_s


def test_device_resident_plan_is_compute_bound():
    g, cfg = tiny("[100,0,100,0,100,0]")
    pr = predict(cfg, g)
    assert pr.bottleneck.startswith("compute") and pr.busy_s["load"] == 0 and pr.busy_s["store"] == 0


def test_disk_plan_is_load_bound():
    g, cfg = tiny("[0,0,0,0,100,0]")
    pr = predict(cfg, g)
    assert pr.bottleneck == "load (disk->device)"
    assert pr.link_bytes["disk->device"] > 0 and pr.busy_s["load"] > pr.busy_s["compute"]


def test_overlap_against_one_op_at_a_time():
    g, cfg = tiny("[0,50,0,50,100,0]", cpu_attention=True)
    model = CostModel(PROFILE, "float32", "cuda")
    streams, serial = simulate(g, model), simulate(g, model, overlap=False)
    assert serial.total_s == pytest.approx(sum(serial.busy_s.values()))
    assert max(streams.busy_s.values()) <= streams.total_s + 1e-12 < serial.total_s
    assert streams.busy_s == pytest.approx(serial.busy_s)  # same ops, same durations
    assert streams.prefill_s > 0 and streams.decode_s > 0


def test_reference_executor_is_simulated_without_overlap():
    g, cfg = tiny("[0,0,0,0,100,0]", executor="reference")
    pr = predict(cfg, g)
    assert not pr.overlap and pr.total_s == pytest.approx(sum(pr.busy_s.values()))


def test_host_attention_moves_no_cache_to_the_device():
    g, cfg = tiny("[100,0,0,100,100,0]", cpu_attention=True)
    pr = predict(cfg, g)
    assert "host->device" not in pr.link_bytes and pr.compute_parts["attention (host)"] > 0


def test_calibration_regression_is_the_cost_models_pricing():
    """Every square's features . (1/rate, overhead) == the cost model's price with those constants."""
    g, _ = tiny("[100,0,0,100,100,0]", cpu_attention=True)
    coef = np.array([2e-5, 3e-5, 1 / 1e11, 1 / 5e10, 1 / 8e9, 1 / 3e10, 1 / 4e9, 1 / 2e9])
    rates = dict(zip(COMPUTE_KEYS, coef))
    prof = {"compute_overhead_s": rates["compute_overhead_s"], "attn_overhead_s": rates["attn_overhead_s"],
            "calibrated": 1.0, **{f"{k}_float32": 1 / rates[k] for k in COMPUTE_KEYS[2:]}}
    model = CostModel(prof, "float32", "cpu")
    for n in squares(g):
        a = g.nodes[n]
        assert sum(square_parts(g, model, a).values()) == pytest.approx(square_features(g, a) @ coef)


def test_fit_recovers_known_constants():
    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (40, 4)) * np.array([1, 1e9, 1e8, 1e7])
    X[:, 0] = 1
    c = np.array([1e-3, 1 / 2e11, 1 / 5e9, 1 / 1e9])
    assert fit_relative(X, X @ c) == pytest.approx(c, rel=1e-6)


def test_writes_have_their_own_disk_latency_when_calibrated():
    base = {"disk_read_bw": 1e9, "disk_write_bw": 1e9, "disk_latency_s": 0.004, "device_is_host": 1.0}
    m = CostModel(dict(base, disk_write_latency_s=0.0003), "bfloat16", "cpu")
    assert m.link_s("disk", "host", 10**6) == pytest.approx(1e-3 + 0.004)  # reads: O_DIRECT requests
    assert m.link_s("host", "disk", 10**6) == pytest.approx(1e-3 + 0.0003)  # writes: buffered slices
    assert CostModel(base, "bfloat16", "cpu").link_s("host", "disk", 10**6) == pytest.approx(1e-3 + 0.004)


def test_disk_io_beside_compute_stretches_it_by_the_contention():
    g, cfg = tiny("[0,0,100,0,100,0]")  # weights on disk: loads run beside compute
    fast = dict(PROFILE, disk_read_bw=2e11)  # fast enough that compute is the bottleneck
    cfg.hardware.profile = fast
    plain = predict(cfg, g)
    cfg.hardware.profile = dict(fast, compute_io_contention=0.5)
    slowed = predict(cfg, g)
    extra = slowed.compute_parts["disk I/O beside"]
    assert extra > 0 and slowed.total_s > plain.total_s
    assert slowed.busy_s["compute"] == pytest.approx(plain.busy_s["compute"] + extra)
    assert extra <= 0.5 * plain.busy_s["load"] + 1e-12  # at most kappa x all the disk I/O
    g, cfg = tiny("[100,0,100,0,100,0]")  # nothing on disk: nothing changes
    cfg.hardware.profile = dict(PROFILE, compute_io_contention=0.5)
    pr = predict(cfg, g)
    assert "disk I/O beside" not in pr.compute_parts


def test_disk_overlap_sums_the_disk_io_beside_each_compute_op():
    from executors.trace import Event
    from graphgen.perf.calibrate import disk_overlap

    ev = [Event("load", "l0", 0.0, 2.0, 1, {}, "disk->device"), Event("compute", "c0", 1.0, 3.0, 0, {}),
          Event("store", "s0", 2.5, 4.0, 1, {}, "device->disk"), Event("load", "l1", 2.0, 2.2, 1, {}, "host->device"),
          Event("compute", "c1", 5.0, 6.0, 0, {})]
    assert disk_overlap(ev) == {1: pytest.approx(1.0 + 0.5), 4: 0.0}


def tiny_pipeline(stages, net_bw=1e10, batches=4):
    cfg = compose(["model.dtype=float32", "hardware.device=cuda", f"parallel.stages={stages}",
                   "policy.percent=[100,0,100,0,100,0]"])
    slow = {k: v / 1e3 for k, v in PROFILE.items() if "flops" in k or "attn_bw" in k}  # compute-bound
    cfg.hardware.profile = dict(PROFILE, **slow, net_bw=net_bw, net_latency_s=1e-6)
    g = build_graph(build_spec(hf_config_from_arch(TINY)), batch=4, num_batches=batches, prompt_len=16,
                    gen_len=4, dtype="float32")
    return run_pipeline(g, cfg), cfg


def test_pipeline_stages_run_side_by_side():
    """Compute-bound, 4 micro-batches: 2 stages take less than one, each stage busy about half the work;
    the links carry what the sends carry; the bubbles are what the stages do not fill."""
    g1, cfg = tiny_pipeline(1)
    one = simulate(g1, CostModel(cfg.hardware.profile, "float32", "cuda"))
    g2, cfg = tiny_pipeline(2)
    two = simulate(g2, CostModel(cfg.hardware.profile, "float32", "cuda"))
    assert len(two.stages) == 2 and not one.stages
    assert two.total_s < 0.8 * one.total_s
    assert sum(s["compute"] for s in two.stages) == pytest.approx(one.busy_s["compute"], rel=1e-6)
    sent = {}
    for m in g2.graph["ops"]:
        b = g2.nodes[m]
        if b.get("op") == "send":
            sent[f"{b['src']}->{b['dst']}"] = sent.get(f"{b['src']}->{b['dst']}", 0) + b["bytes"]
    assert two.link_bytes == {**{k: v for k, v in two.link_bytes.items() if not k.startswith("stage")}, **sent}
    assert 0.0 < two.bubble_fraction < 1.0


def test_pipeline_pays_for_a_slow_link():
    """Every receive waits for its send: a link 10^4 times slower shows up in the prediction."""
    g, cfg = tiny_pipeline(2, net_bw=1e10)
    fast = simulate(g, CostModel(cfg.hardware.profile, "float32", "cuda"))
    slow = simulate(g, CostModel(dict(cfg.hardware.profile, net_bw=1e6), "float32", "cuda"))
    assert slow.total_s > fast.total_s + 0.5 * max(slow.link_s.values())


def test_pipeline_without_a_network_figure_says_which_key():
    g, cfg = tiny_pipeline(2)
    prof = {k: v for k, v in cfg.hardware.profile.items() if not k.startswith("net_")}
    with pytest.raises(ValueError, match="hardware.profile.net_bw"):
        simulate(g, CostModel(prof, "float32", "cuda"))
