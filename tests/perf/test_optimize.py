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
    I/O: the LP's estimate for a placement that must read from disk drops, an all-memory one does not."""
    cfg = tiny_cfg("0.8MB", "0.6MB")  # weights (0.9 MB) and the rest cannot all stay in memory
    roomy = tiny_cfg("8MB", "8MB")
    kn = Knobs(1, 1, False, False)
    for c, must_read_disk in ((cfg, True), (roomy, False)):
        P = Problem(c, PROFILE)
        budgets = {t: float(v) for t, v in P.budgets.items()}
        base = solve_lp(P, kn, budgets)
        slow = solve_lp(Problem(c, dict(PROFILE, compute_io_contention=0.5)), kn, budgets)
        assert base is not None and slow is not None
        if must_read_disk:
            assert slow[1] < base[1] * 0.999
        else:
            assert slow[1] == pytest.approx(base[1])
