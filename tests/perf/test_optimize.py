"""policy=auto (graphgen.perf.optimize): the LP's constraints hold, returned policies fit their budgets
(plan_memory accepts them), refusals say what to change, an unnecessary offload is flagged."""
from __future__ import annotations

import numpy as np
import pytest

from graphgen.config import compose, parse_bytes
from graphgen.perf.optimize import NoFit, compile_policy, optimize, policy_for
from graphgen.perf.policy_lp import FRACTIONS, Knobs, Problem, memory_rows, solve_lp

# a small OPT: 4 blocks of 0.2 MB (float32) and 0.15 MB of embeddings: 0.9 MB of weights
TINY = {"model_type": "opt", "vocab_size": 64, "hidden_size": 64, "num_hidden_layers": 4, "ffn_dim": 256,
        "num_attention_heads": 4, "max_position_embeddings": 512, "word_embed_proj_dim": 64}
# a CPU-like machine with a separate device: PCIe 10 GB/s, disk 1 GB/s
PROFILE = {"device_flops_float32": 1e11, "device_flops_decode_float32": 2e10, "device_bmm_flops_float32": 5e10,
           "device_attn_bw": 2e10, "cpu_attn_bw": 5e9, "h2d_bw": 1e10, "d2h_bw": 1e10, "disk_read_bw": 1e9,
           "disk_write_bw": 1e9, "device_is_host": 0.0, "compute_overhead_s": 1e-5}


def tiny_cfg(device="2MB", host="2MB", disk="1GB", extra=()):
    cfg = compose(["model=opt-125m", "policy=auto", "model.dtype=float32", "workload.prompt_len=32", "workload.gen_len=8",
                   f"hardware.device_mem={device}", f"hardware.host_mem={host}", f"hardware.disk_mem={disk}",
                   "hardware.device=cuda", "executor=async", *extra])
    cfg.model.arch, cfg.model.name = dict(TINY), "tiny"
    return cfg


def fits(cfg, cand) -> bool:
    g, err = compile_policy(policy_for(cfg, cand))
    budgets = {t: parse_bytes(v) for t, v in (("device", cfg.hardware.device_mem),
                                              ("host", cfg.hardware.host_mem), ("disk", cfg.hardware.disk_mem))}
    return err is None and all(g.graph["peak_bytes"][t] <= budgets[t] for t in budgets)


@pytest.mark.parametrize("device,host", [("0.5MB", "2MB"), ("0.4MB", "8MB"), ("0.7MB", "0.3MB"), ("0.45MB", "0.45MB")])
def test_returned_policy_fits_its_budgets(device, host):
    cfg = tiny_cfg(device, host)
    res = optimize(cfg, PROFILE, verify_top=2)
    assert res.tried and all(fits(cfg, c) for c in res.tried)
    assert res.best.percent[0] < 100  # the weights do not fit on the device: offloaded
    assert res.best.sim_tok_s == max(c.sim_tok_s for c in res.tried)
    p = res.best.percent
    assert all(0 <= x <= 100 for x in p) and p[0] + p[1] <= 100 and p[2] + p[3] <= 100 and p[4] + p[5] <= 100


def test_lp_solution_satisfies_its_constraints():
    cfg = tiny_cfg("0.8MB", "0.6MB")
    P = Problem(cfg, PROFILE)
    budgets = {t: float(v) for t, v in P.budgets.items()}
    solved = 0
    knobs = (Knobs(1, 1, False, False), Knobs(4, 2, True, False), Knobs(2, 3, False, False), Knobs(64, 8, False, False))
    for kn in knobs:
        r = solve_lp(P, kn, budgets)
        if r is None:  # infeasible for these budgets
            continue
        solved += 1
        percent = np.array(r[0]) / 100
        x = dict(zip(FRACTIONS, [percent[0], percent[1], 1 - percent[0] - percent[1], percent[2], percent[3],
                                 1 - percent[2] - percent[3], percent[4], percent[5], 1 - percent[4] - percent[5]]))
        for tier, expr in memory_rows(P, P.layers(kn.gbs, kn.compress), kn).items():
            used = expr.get(None, 0.0) + sum(c * x[v] for v, c in expr.items() if v is not None)
            limit = P.pinned if tier == "pinned" else budgets[tier]
            assert used <= limit * 1.001 + 1e3, (kn, tier, used, limit)  # 0.1% steps of the percents
    assert solved >= 3


def test_pinned_memory_limits_host_weights():
    cfg = tiny_cfg("0.45MB", "8MB", extra=["hardware.pinned_mem=0.2MB"])
    P = Problem(cfg, PROFILE)
    r = solve_lp(P, Knobs(1, 1, False, False), {t: float(v) for t, v in P.budgets.items()})
    W = sum(P.layers(1, False)[(layer.kind, "prefill")]["w_bytes"] for layer in P.spec.layers)
    assert r is not None and r[0][1] / 100 * W <= 0.2e6 * 1.001  # the rest goes to disk


def test_refuses_when_nothing_fits():
    with pytest.raises(NoFit, match="hardware.disk_mem"):
        optimize(tiny_cfg("100KB", "100KB", "100KB"), PROFILE)


def test_warns_when_the_model_fits_on_the_device():
    with pytest.warns(UserWarning, match="offloading is unnecessary"):
        res = optimize(tiny_cfg("4GB", "4GB"), PROFILE, verify_top=1)
    assert res.best.percent[0::2] == [100.0, 100.0, 100.0]


def test_num_prompts_bounds_the_block():
    res = optimize(tiny_cfg("0.5MB", "2MB", extra=["workload.num_prompts=6"]), PROFILE, verify_top=1)
    assert res.best.knobs.gbs * res.best.knobs.ngb < 12


def test_simulate_cli_with_policy_auto(capsys):
    from graphgen.run import run

    cfg = tiny_cfg("0.5MB", "2MB", extra=["job=simulate"])
    cfg.hardware.profile = dict(PROFILE)
    pr = run(cfg)
    out = capsys.readouterr().out
    assert "policy=auto chose percent=" in out and "predicted" in out and pr.total_tok_s > 0


def test_contention_lowers_the_lp_estimate_of_placements_that_read_from_disk():
    """With compute_io_contention, a layer's time is at least its compute plus that share of its disk
    I/O: the LP's estimate for a placement that must read from disk drops, an all-memory one does not.
    (A disk fast enough that compute, not the reads, bounds the layers: beside a longer read the
    slowed compute would still wait for it.)"""
    cfg = tiny_cfg("0.8MB", "0.6MB")  # weights (0.9 MB) and the rest cannot all stay in memory
    roomy = tiny_cfg("8MB", "8MB")
    kn = Knobs(1, 1, False, False)
    fast = dict(PROFILE, disk_read_bw=1e11, disk_write_bw=1e11)
    for c, must_read_disk in ((cfg, True), (roomy, False)):
        P = Problem(c, fast)
        budgets = {t: float(v) for t, v in P.budgets.items()}
        base = solve_lp(P, kn, budgets)
        slow = solve_lp(Problem(c, dict(fast, compute_io_contention=0.5)), kn, budgets)
        assert base is not None and slow is not None
        if must_read_disk:
            assert slow[1] < base[1] * 0.999
        else:
            assert slow[1] == pytest.approx(base[1])


# a CPU-only machine as graphgen.perf.calibrate fits it: one memory, weights outside the device tier not
# prepacked, copies within RAM inline on the compute stream, a loaded cache prefix joined into a scratch
# buffer, the cache read from disk at its own rate, compute slowed beside disk I/O
CPU = dict(PROFILE, device_is_host=1.0, cpu_attn_bw=2e10, device_mem_bw=2e10, host_memcpy_bw=5e9, inline_io_s=2e-5,
           plain_weight_bw_float32=4e9, plain_flops_float32=4e11, kv_join_bw_float32=3e9, disk_read_cache_bw=6e8,
           compute_io_contention=0.4, calibrated=1.0, device_mm_bw_float32=1e10)
CPU_TERMS = ("plain_weight_bw_float32", "plain_flops_float32", "inline_io_s", "host_memcpy_bw", "kv_join_bw_float32")


def _cpu_policy(percent, cpu_attention=False, profile=CPU):
    cfg = tiny_cfg(extra=["hardware.device=cpu", f"policy.percent={percent}", "policy.gpu_batch_size=4",
                          "policy.num_gpu_batches=2", f"policy.cpu_attention={str(cpu_attention).lower()}"])
    cfg.hardware.profile = dict(profile)
    P = Problem(cfg, dict(profile))
    kn = Knobs(4, 2, cpu_attention, False)
    return cfg, P, kn


@pytest.mark.parametrize("percent,cpu_attention,rel", [
    ("[100,0,100,0,100,0]", False, 0.01),  # in memory
    ("[0,100,100,0,100,0]", False, 0.01),  # weights on the host tier: not prepacked, loads inline
    ("[100,0,100,0,0,100]", False, 0.01),  # activations on the host tier: inline loads and stores
    ("[100,0,0,100,100,0]", False, 0.01),  # the cache on the host, attention on the device: loaded, joined
    ("[0,100,0,100,100,0]", True, 0.01),  # weights and cache on the host, CPU attention over it in place
    ("[40,60,0,100,100,0]", True, 0.05),  # whole layers placed: 40% of 4 blocks' bytes is not 40% of each
    ("[100,0,0,0,100,0]", True, 0.03),  # the cache on disk: read at its rate, joined, beside compute
    ("[0,0,100,0,100,0]", False, 0.03),  # the weights on disk: whole layers read beside one slot each
])
def test_lp_prices_a_policy_as_the_simulator(percent, cpu_attention, rel):
    """For a given placement the LP's throughput (policy_tok_s) is the simulator's: the same CPU terms
    (plain weights, inline copies, the cache join) and the executor's one-slot prefetch. With I/O on disk
    they differ by how much of it overlaps, which the simulator follows op by op."""
    from graphgen.perf.policy_lp import policy_tok_s
    from graphgen.perf.simulate import predict

    cfg, P, kn = _cpu_policy(percent, cpu_attention)
    assert policy_tok_s(P, kn, list(cfg.policy.percent)) == pytest.approx(predict(cfg).total_tok_s, rel=rel)


@pytest.mark.parametrize("percent,cpu_attention,keys", [
    ("[0,100,100,0,100,0]", False, ("plain_weight_bw_float32", "plain_flops_float32", "inline_io_s")),
    ("[100,0,100,0,0,100]", False, ("inline_io_s", "host_memcpy_bw")),
    ("[100,0,0,0,100,0]", True, ("kv_join_bw_float32",)),
])
def test_lp_pays_each_cpu_term(percent, cpu_attention, keys):
    """Each CPU term a placement incurs lowers the LP's throughput for it, as it does the simulator's."""
    from graphgen.perf.policy_lp import policy_tok_s
    from graphgen.perf.simulate import predict

    for key in keys:
        free = dict(CPU, **{key: 0.0}) if key.endswith("_s") else {k: v for k, v in CPU.items() if k != key}
        cfg, P, kn = _cpu_policy(percent, cpu_attention)
        cfg0, P0, _ = _cpu_policy(percent, cpu_attention, free)
        percent_ = list(cfg.policy.percent)
        assert policy_tok_s(P, kn, percent_) < policy_tok_s(P0, kn, percent_) * 0.999, key
        assert predict(cfg).total_tok_s < predict(cfg0).total_tok_s * 0.999, key

