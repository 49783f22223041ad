"""Cost model and simulator: FlexGen's published T4 table within 20%; every compute part no faster than
the bytes it streams through its memory, in the simulator and the LP alike; stream semantics on tiny
graphs; the calibration's regression is the cost model's pricing."""
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


# FlexGen's published single-T4 table (Sheng et al., ICML 2023, Table 2: prompt 512, gen 32), predicted
# from FlexGen's fitted compute and PCIe constants, the T4's memory bandwidth, and the disk read rates of
# the paper's Sec. 6 and Table 4 (conf/hardware/t4-flexgen.yaml, docs/costmodel.md)
@pytest.mark.parametrize("experiment,published,bottleneck", [
    ("flexgen-opt-6.7b-t4", 25.26, "compute (matmul, memory-bound)"),  # decode streams 13.7 GB of weights a step at 320 GB/s
    ("flexgen-opt-30b-t4", 7.32, "compute"),
    ("flexgen-opt-175b-t4", 0.69, "load (disk->host)"),  # the KV cache read from disk at 2.72 GB/s
])
def test_flexgen_t4_table_within_20_percent(experiment, published, bottleneck):
    pr = predict(compose(["job=simulate", f"experiment={experiment}"]))
    assert pr.total_tok_s == pytest.approx(published, rel=0.20)
    assert pr.bottleneck.startswith(bottleneck)
    assert pr.overlap and pr.bound_tok_s >= pr.total_tok_s


def test_t4_profile_defaults_to_its_float16_and_names_the_key_otherwise():
    cfg = compose(["job=simulate", "hardware=t4-flexgen", "model=opt-125m"])
    assert cfg.model.dtype == "float16" and predict(cfg).total_tok_s > 0
    with pytest.raises(ValueError, match=r"set model\.dtype=float16"):
        predict(compose(["job=simulate", "hardware=t4-flexgen", "model=opt-125m", "model.dtype=bfloat16"]))


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
    coef = np.array([2e-5, 3e-5, 1 / 1e11, 1 / 5e10, 1 / 8e9, 1 / 3e10, 1 / 4e9, 1 / 2e9, 1 / 6e9, 1 / 7e11, 1 / 9e9])
    rates = dict(zip(COMPUTE_KEYS, coef))
    prof = {"compute_overhead_s": rates["compute_overhead_s"], "attn_overhead_s": rates["attn_overhead_s"],
            "calibrated": 1.0, **{f"{k}_float32": 1 / rates[k] for k in COMPUTE_KEYS[2:]}}
    one = np.where(np.array(COMPUTE_KEYS) == "cpu_attn_bw", coef[COMPUTE_KEYS.index("device_attn_bw")], coef)
    for same_memory, c in ((False, coef), (True, one)):  # one memory: the fit gives both attention keys one rate
        model = CostModel(dict(prof, cpu_attn_bw_float32=1 / c[COMPUTE_KEYS.index("cpu_attn_bw")]), "float32", "cpu")
        # weights on the device; on the host; the cache in place where attention runs, or loaded and joined
        for percent in ("[100,0,0,100,100,0]", "[0,100,0,100,100,0]", "[100,0,100,0,100,0]"):
            g, _ = tiny(percent, cpu_attention=True)
            for n in squares(g):
                a = g.nodes[n]
                assert sum(square_parts(g, model, a).values()) == pytest.approx(
                    square_features(g, a, same_memory) @ c)


def test_weights_not_prepacked_pay_a_reorder_in_each_decode_matmul():
    """CPU: the device tier's dense weights are prepacked (executors/packed.py), the host's and the
    disk's are not: their decode matmuls pay weight bytes at plain_weight_bw."""
    g, _ = tiny("[0,100,0,100,100,0]")
    host = _decode_square(g, "mlp")
    dev = dict(host, w_home="device")
    m = CostModel(dict(PROFILE, device_is_host=1.0, plain_weight_bw_float32=1e9), "float32", "cpu")
    extra = m.compute_parts(host, 0.0)["matmul"] - m.compute_parts(dev, 0.0)["matmul"]
    assert extra == pytest.approx(host["w_bytes"] / 1e9)
    gpu = CostModel(dict(PROFILE, plain_weight_bw_float32=1e9), "float32", "cuda")  # separate memories: no such cost
    assert gpu.compute_parts(host, 0.0) == gpu.compute_parts(dev, 0.0)
    pre = next(g.nodes[n] for n in squares(g) if g.nodes[n]["kind"] == "mlp" and g.nodes[n]["step_kind"] == "prefill")
    m = CostModel(dict(PROFILE, device_is_host=1.0, plain_flops_float32=1e9, device_mem_bw=1e18), "float32", "cpu")
    extra = m.compute_parts(pre, 0.0)["matmul"] - m.compute_parts(dict(pre, w_home="device"), 0.0)["matmul"]
    assert extra == pytest.approx(pre["flops"] / 1e9)  # prefill: the plain kernels' FLOPs


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


# --- memory bandwidth: each compute part no faster than the bytes it streams (issue 19) ------------

def _decode_square(g, kind):
    return next(g.nodes[n] for n in squares(g) if g.nodes[n]["kind"] == kind and g.nodes[n]["step_kind"] != "prefill")


def test_decode_matmul_is_bound_by_device_memory_bandwidth():
    g, _ = tiny("[100,0,100,0,100,0]")
    a = _decode_square(g, "mlp")
    no_key = CostModel(dict(PROFILE, device_flops_decode_float32=1e18), "float32", "cuda")
    assert no_key.compute_parts(a, 0.0)["matmul"] == pytest.approx(a["flops"] / 1e18)  # FLOPs only
    slow = CostModel(dict(PROFILE, device_flops_decode_float32=1e18, device_mem_bw=1e9), "float32", "cuda")
    assert slow.compute_parts(a, 0.0)["matmul, memory-bound"] == pytest.approx(a["w_bytes"] / 1e9)
    fast = CostModel(dict(PROFILE, device_mem_bw=1e18), "float32", "cuda")
    assert fast.compute_parts(a, 0.0)["matmul"] == pytest.approx(a["flops"] / PROFILE["device_flops_decode_float32"])


def test_prefill_matmul_of_few_tokens_is_bound_by_memory_too():
    g, _ = tiny("[100,0,100,0,100,0]")
    a = next(g.nodes[n] for n in squares(g) if g.nodes[n]["kind"] == "mlp" and g.nodes[n]["step_kind"] == "prefill")
    m = CostModel(dict(PROFILE, device_mem_bw=1e6), "float32", "cuda")
    assert m.compute_parts(a, 0.0)["matmul, memory-bound"] == pytest.approx(a["w_bytes"] / 1e6)


def test_attention_reads_its_cache_at_the_memory_bandwidth_where_it_runs():
    g, _ = tiny("[100,0,0,100,100,0]", cpu_attention=True)
    host, kv = dict(_decode_square(g, "attn"), attn_device="host"), 10**6
    m = CostModel(dict(PROFILE, host_mem_bw=1e6, device_mem_bw=1e18), "float32", "cuda")
    assert m.compute_parts(host, 0.0, kv)["attention (host), memory-bound"] == pytest.approx(1.0)
    dev = dict(host, attn_device="device")
    assert m.compute_parts(dev, 0.0, kv)["attention (device)"] == pytest.approx(kv / PROFILE["device_attn_bw"])
    one_memory = CostModel(dict(PROFILE, device_is_host=1.0, device_mem_bw=1e6), "float32", "cpu")  # CPU-only
    assert one_memory.compute_parts(host, 0.0, kv)["attention (host), memory-bound"] == pytest.approx(1.0)


def test_policy_lp_prices_compute_as_the_simulator():
    """The LP's compute seconds per layer are the cost model's square prices, memory floor included."""
    from graphgen.costs import kv_slice_bytes
    from graphgen.perf.costmodel import attention_flops_of
    from graphgen.perf.policy_lp import Knobs, Problem, _attention

    prof = dict(PROFILE, device_mem_bw=2e9, host_mem_bw=1e9)
    P = Problem(compose(["model.dtype=float32", "hardware.device=cuda", "model=opt-125m"]), prof)
    kn, model = Knobs(gbs=4, ngb=1, cpu_attention=True, compress=False), CostModel(prof, "float32", "cuda")
    for (kind, phase), a in P.layers(kn.gbs, kn.compress).items():
        dev, _ = _attention(P, a, kn)
        dense = kv_slice_bytes(P.spec, P.shape(4), a["ctx"]) if kind == "attn" else 0
        parts = model.compute_parts(dict(a, attn_device="device"), attention_flops_of(P.spec, P.shape(4), a),
                                    dense, 4, P.spec.hidden_size)
        assert dev["base"] + dev["attn"] == pytest.approx(sum(parts.values()))
        if kind == "mlp" and phase == "decode":
            assert parts["matmul, memory-bound"] == pytest.approx(a["w_bytes"] / 2e9)  # the floor binds


def test_kv_cache_reads_from_disk_have_their_own_rate():
    m = CostModel({"disk_read_bw": 1e9, "disk_read_cache_bw": 4e9, "disk_write_bw": 1e9}, "bfloat16", "cpu")
    assert m.link_s("disk", "host", 4 * 10**9, cache=True) == pytest.approx(1.0)
    assert m.link_s("disk", "host", 4 * 10**9) == pytest.approx(4.0)
    assert CostModel({"disk_read_bw": 1e9}, "bfloat16", "cpu").link_s("disk", "host", 10**9, cache=True) == 1.0


def test_cpu_copies_within_ram_on_the_compute_stream_are_simulated():
    """On a CPU (hardware.device=cpu) insert_io runs loads and stores within RAM inline on the compute
    stream: the simulator charges their time to their square's step kind."""
    cfg = compose(["model=opt-125m", "model.dtype=float32", "executor=async", "hardware.device=cpu",
                   "policy.percent=[0,100,100,0,100,0]"])
    cfg.hardware.profile = dict(PROFILE, device_is_host=1.0)
    g = build_graph(build_spec(hf_config_from_arch(TINY)), batch=4, num_batches=2, prompt_len=16, gen_len=4,
                    dtype="float32")
    g = run_pipeline(g, cfg)
    inline = [m for m in g.graph["ops"] if g.nodes[m].get("op") in ("load", "store")
              and g.nodes[m].get("stream") == "compute"]
    assert inline  # weights on the host: their loads to the device run on the compute stream
    pr = predict(cfg, g)
    assert pr.prefill_s > 0 and pr.decode_s > 0 and pr.busy_s["load"] == 0


def test_a_copy_within_ram_run_inline_costs_its_dispatch_and_the_slice_a_store_writes():
    m = CostModel({"inline_io_s": 3e-5, "host_memcpy_bw": 1e10, "device_is_host": 1.0}, "bfloat16", "cpu")
    store = {"op": "store", "tensor": ("kv", 0, 0), "src": "device", "dst": "device", "bytes": 10**6,
             "stream": "compute"}
    assert m.io_s(store) == pytest.approx(3e-5 + 1e-4)
    load = dict(store, op="load", tensor=("w", 1), src="host")  # the tensor is handed over: nothing copied
    assert m.io_s(load) == pytest.approx(3e-5)
    assert CostModel({"device_is_host": 1.0}, "bfloat16", "cpu").io_s(load) == 0.0  # uncalibrated: free
    on_gpu = dict(load, stream="load")  # its own stream, over PCIe
    assert CostModel(PROFILE, "float32", "cuda").io_s(on_gpu) == pytest.approx(10**6 / PROFILE["h2d_bw"])


def test_calibration_fits_the_inline_copies_apart_from_the_time_between_ops():
    from executors.trace import Event
    from graphgen.perf.calibrate import between_squares, inline_io

    cfg = compose(["model=opt-125m", "model.dtype=float32", "hardware.device=cpu",
                   "policy.percent=[0,100,100,0,100,0]"])
    g = run_pipeline(build_graph(build_spec(hf_config_from_arch(TINY)), batch=4, num_batches=1, prompt_len=16,
                                 gen_len=4, dtype="float32"), cfg)
    A, t, events = g.nodes, 0.0, []
    for m in g.graph["ops"]:  # each inline copy 50 us, each square 1 ms, 10 us between ops
        op = A[m].get("op", "compute")
        d = 1e-3 if op == "compute" else 5e-5
        events.append(Event(op, str(m), t, t + d, 0, {}))
        t += d + 1e-5
    run = {"graph": g, "events": events}
    assert inline_io([run], 0.0) == pytest.approx(5e-5)
    assert between_squares(run) == pytest.approx(1e-5)


def _cpu_graph(percent, cpu_attention=True):
    cfg = compose(["model=opt-125m", "model.dtype=float32", "executor=async", "hardware.device=cpu",
                   f"policy.percent={percent}", f"policy.cpu_attention={str(cpu_attention).lower()}"])
    g = build_graph(build_spec(hf_config_from_arch(TINY)), batch=4, num_batches=1, prompt_len=16, gen_len=4,
                    dtype="float32")
    return run_pipeline(g, cfg)


def test_a_cache_loaded_from_another_tier_is_joined_into_the_scratch_at_kv_join_bw():
    """executors/attention.py: a prefix loaded from another tier than attention's (kv_buf) is copied with
    the new slice into a head-major scratch buffer before attention; a cache at home is read in place."""
    prof = {"device_attn_bw_float32": 4e9, "cpu_attn_bw_float32": 4e9, "kv_join_bw_float32": 1e9,
            "device_flops_float32": 1e12, "device_is_host": 1.0}
    m = CostModel(prof, "float32", "cpu")
    for percent, joined in (("[100,0,100,0,100,0]", False), ("[100,0,0,100,100,0]", False),
                            ("[100,0,0,0,100,0]", True)):  # cache on the device, on the host (in place), on disk
        g = _cpu_graph(percent, cpu_attention=percent != "[100,0,100,0,100,0]")
        a = _decode_square(g, "attn")
        parts = square_parts(g, m, a)
        assert CostModel.joins(a) == joined and ("cache join" in parts) == joined
        if joined:
            dense = parts["attention (host)"] * 4e9
            assert parts["cache join"] == pytest.approx(dense / 1e9)
    g = _cpu_graph("[100,0,0,0,100,0]")
    a = _decode_square(g, "attn")
    assert "cache join" not in square_parts(g, CostModel(dict(prof, kv_join_bw_float32=0), "float32", "cpu"), a)
    assert not CostModel.joins(dict(a, kv_compressed=(4, 64, 2)))  # dequantised into the scratch instead


def test_calibration_fits_the_cache_reads_from_disk_apart_from_the_weight_reads():
    """The KV cache's prefix reads (slice-written files, read back each step) and weight reads run at
    different rates on one disk (measured here: 1.1-1.3 against 1.8-2.2 GB/s for 7-14 MB reads):
    calibration fits disk_read_cache_bw from the cache reads, disk_read_bw from the others."""
    from executors.trace import Event
    from graphgen.perf.calibrate import fit

    g = _cpu_graph("[0,0,0,0,100,0]")  # weights and cache on disk, CPU attention
    A, t, events = g.nodes, 0.0, []
    for m in g.graph["ops"]:
        a = A[m]
        op = a.get("op", "compute")
        d = 1e-3 if op == "compute" else 1e-5 + a["bytes"] / (1e9 if a["tensor"][0] == "kv" else 2e9)
        link = "" if op == "compute" else f"{a['src']}->{a['dst']}"
        events.append(Event({"compute": "compute"}.get(op, op), str(m), t, t + d, a.get("bytes", 0), {}, link))
        t += d
    keys, quality = fit([{"graph": g, "events": events}], "float32", read_latency_s=1e-5)
    assert quality["disk_cache_reads"] > 0 and quality["disk_reads"] > 0
    assert keys["disk_latency_s"] == 1e-5  # measured apart (calibrate: probes.small_read_times), kept
    assert keys["disk_read_bw"] == pytest.approx(2e9)
    assert keys["disk_read_cache_bw"] == pytest.approx(1e9)
    assert keys["cpu_attn_bw_float32"] == keys["device_attn_bw_float32"]  # one memory: one attention kernel
