"""Cost model vs measurement on this machine, and policy=auto vs a grid of hand-written policies.

Part 1 (cases): each case is a model, a policy (in memory, host or disk placements) and a
workload; it is run with the real engine (LLM.generate, executor=async, dummy bf16 weights, page
cache dropped first), best of --repeats after a short warm-up, and predicted by the cost model on
hardware=auto's profile, fitted to probe runs first (graphgen.perf.calibrate; --calibrate each: before
every case, as the load of a shared machine drifts). Prints measured and predicted
prefill / decode / total throughput, the error of the total, and the spread of the repeats (1 -
slowest / fastest: the noise of a shared machine). A case that reads from disk is also predicted
at the disk read rates its own run achieved (its trace's disk loads: bytes / their seconds, at the
profile's disk_latency_s), beside the first prediction: this takes the disk's speed as given
(not a prediction made before the run) and tests the rest of the model (overlap, compute, scheduling).
Part 2 (--auto): for one model and tier budgets, every policy of a hand-written grid and the one
policy=auto picks are simulated, and the grid's best few and auto's pick are measured, in
interleaved rounds (--repeats of them; best and median of each policy).

    python benchmarks/validate_cost_model.py                  # all cases, then the auto comparison
    python benchmarks/validate_cost_model.py --cases opt-125m-mem --repeats 1 --no-auto
    python benchmarks/validate_cost_model.py --breakdown       # per-op-kind measured vs predicted seconds
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLM, compose, drop_page_cache, machine, prompts  # noqa: E402

from graphgen.perf.calibrate import READ_KEYS, observed_disk_rates, with_disk_rates  # noqa: E402
from graphgen.perf.costmodel import CostModel, simulate, square_parts  # noqa: E402
from graphgen.perf.probes import run_ahead  # noqa: E402
from graphgen.perf.simulate import hardware_profile, predict  # noqa: E402

BASE = ["executor=async", "model.weights=dummy", "model.dtype=bfloat16", "report.progress=false",
        "hardware=auto", "hardware.device_mem=12GB", "hardware.host_mem=12GB", "hardware.disk_mem=60GB"]

# name -> (what it shows, overrides)
CASES: Dict[str, tuple] = {
    "opt-125m-mem": ("in memory", ["model=opt-125m", "policy=all-device", "policy.gpu_batch_size=16",
                                   "policy.num_gpu_batches=2", "workload.prompt_len=128", "workload.gen_len=32"]),
    "opt-350m-mem": ("in memory", ["model=opt-350m", "policy=all-device", "policy.gpu_batch_size=16",
                                   "policy.num_gpu_batches=1", "workload.prompt_len=128", "workload.gen_len=32"]),
    "opt-1.3b-mem": ("in memory", ["model=opt-1.3b", "policy=all-device", "policy.gpu_batch_size=8",
                                   "policy.num_gpu_batches=2", "workload.prompt_len=64", "workload.gen_len=16"]),
    "opt-1.3b-host": ("weights + cache on host, CPU attention",
                      ["model=opt-1.3b", "policy.percent=[0,100,0,100,100,0]", "policy.cpu_attention=true",
                       "policy.gpu_batch_size=8", "policy.num_gpu_batches=2", "workload.prompt_len=64",
                       "workload.gen_len=16"]),
    "opt-350m-wdisk": ("weights on disk", ["model=opt-350m", "policy.percent=[0,0,100,0,100,0]",
                                          "policy.gpu_batch_size=16", "policy.num_gpu_batches=2",
                                          "workload.prompt_len=64", "workload.gen_len=16"]),
    "opt-1.3b-disk": ("half the weights + the cache on disk, CPU attention",
                      ["model=opt-1.3b", "policy.percent=[0,50,0,0,100,0]", "policy.cpu_attention=true",
                       "policy.gpu_batch_size=16", "policy.num_gpu_batches=2", "workload.prompt_len=64",
                       "workload.gen_len=16"]),
    "opt-1.3b-wdisk": ("weights on disk", ["model=opt-1.3b", "policy.percent=[0,0,100,0,100,0]",
                                          "policy.gpu_batch_size=16", "policy.num_gpu_batches=2",
                                          "workload.prompt_len=128", "workload.gen_len=16"]),
    "opt-125m-kvdisk": ("cache on disk, CPU attention",
                        ["model=opt-125m", "policy.percent=[100,0,0,0,100,0]", "policy.cpu_attention=true",
                         "policy.gpu_batch_size=32", "policy.num_gpu_batches=2", "workload.prompt_len=128",
                         "workload.gen_len=32"]),
    # decode-heavy, in memory: every step streams the 2.6 GB of weights, which memory bandwidth bounds
    # at batch 16 (16 FLOPs per weight byte) and nearly so at 64
    "opt-1.3b-dec16": ("in memory, decode-heavy", ["model=opt-1.3b", "policy=all-device", "policy.gpu_batch_size=16",
                                                   "policy.num_gpu_batches=1", "workload.prompt_len=32",
                                                   "workload.gen_len=64"]),
    "opt-1.3b-dec64": ("in memory, decode-heavy", ["model=opt-1.3b", "policy=all-device", "policy.gpu_batch_size=64",
                                                   "policy.num_gpu_batches=1", "workload.prompt_len=32",
                                                   "workload.gen_len=64"]),
}


def measure(cfg, repeats: int, trace: bool = False):
    """Best-of-`repeats` run stats of cfg's workload, after a 2-token warm-up (with trace: the
    run's trace events, st["events"]); and its graph."""
    w, p = cfg.workload, cfg.policy
    ids = prompts(p.gpu_batch_size * p.num_gpu_batches, w.prompt_len)
    cfg.executor.trace = trace
    with LLM(config=cfg) as llm:
        llm.generate(ids, max_new_tokens=2)  # weights placed, kernels warm
        runs = []
        for _ in range(repeats):
            drop_page_cache()
            n_ev = len(llm.executor.trace.events) if trace else 0
            llm.generate(ids, max_new_tokens=w.gen_len)
            st = dict(llm.last_stats)
            if trace:
                st["events"] = llm.executor.trace.events[n_ev:]
            runs.append(st)
        graph = llm.graph
    best = max(runs, key=lambda s: s["total_tok_s"])
    best["spread"] = 1 - min(r["total_tok_s"] for r in runs) / best["total_tok_s"]  # how noisy the repeats were
    return best, graph


def row(name: str, what: str, st: Dict, pr, at_disk: Optional[float]) -> str:
    """A case's line; at_disk: the error of total throughput predicted at the disk rates of the case."""
    gen = st["gen_len"]
    pred = {"prefill": pr.prompt_tokens / pr.prefill_s, "decode": (pr.tokens - pr.tokens // gen) / pr.decode_s,
            "total": pr.total_tok_s}
    err = pred["total"] / st["total_tok_s"] - 1
    second = "-" if at_disk is None else f"{at_disk:+.1%}"
    return (f"{name:<16} {what[:38]:<38} {st['prefill_tok_s']:8.1f} {pred['prefill']:8.1f}   "
            f"{st['decode_tok_s']:7.2f} {pred['decode']:7.2f}   {st['total_tok_s']:7.2f} {pred['total']:7.2f}  "
            f"{err:+6.1%} {second:>8}  {st['spread']:6.0%}   {pr.bottleneck}; load {os.getloadavg()[0]:.1f}")


HEADER = (f"{'case':<16} {'placement':<38} {'prefill tok/s':>17}   {'decode tok/s':>15}   "
          f"{'total tok/s':>15}  {'error':>6} {'at disk':>8}  {'spread':>6}   predicted bottleneck\n"
          f"{'':<55}{'meas':>8} {'pred':>8}   {'meas':>7} {'pred':>7}   {'meas':>7} {'pred':>7}  "
          f"{'':>6} {'rate':>8}\n"
          f"(error: predicted at the calibrated profile; at disk rate: the same case predicted with the profile's "
          f"disk read rates set to the rates the disk gave during the case, from the executor's trace)")


def at_case_disk_rates(cfg, graph, events, profile: Dict[str, float]):
    """The case predicted again with the profile's disk read rates (disk_read_bw for weights,
    disk_read_cache_bw for the KV cache) set to those its own run achieved (bytes / seconds of
    its disk loads, at the profile's disk_latency_s: graphgen.perf.calibrate.observed_disk_rates).
    The disk's speed is taken as given; what is tested is the rest of the model. (None, {}) for
    a case that reads nothing from disk."""
    rates = observed_disk_rates(graph, events, profile.get("disk_latency_s", 0.0))
    if not rates:
        return None, rates
    model = CostModel(with_disk_rates(profile, rates), cfg.model.dtype, cfg.hardware.device)
    return simulate(graph, model, overlap=cfg.executor.name != "reference"), rates


def describe_rates(rates: Dict[str, float], profile: Dict[str, float]) -> str:
    names = {v: k for k, v in READ_KEYS.items()}
    parts = []
    for key, r in sorted(rates.items()):
        cal = profile.get(key, profile["disk_read_bw"])  # no cache key: the cache is priced at disk_read_bw
        what = "weights" if names[key] == "read" else "KV cache"
        parts.append(f"{what} {r / 1e9:.2f} GB/s ({key}; calibrated {cal / 1e9:.2f}, x{r / cal:.2f})")
    return "disk reads during the case: " + ", ".join(parts)


def breakdown(graph, events, model: CostModel) -> None:
    """Measured (trace) and predicted seconds per op kind: where the model is off."""
    A = {str(n): a for n, a in graph.nodes(data=True)}
    meas, pred, count = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in events:
        if e.stream not in ("load", "compute", "store"):
            continue
        a = A[e.name]
        if e.stream == "compute":
            key = f"compute {a['step_kind']} {a['kind']}" + (" (host)" if a.get("attn_device") == "host" else "")
            t = sum(square_parts(graph, model, a).values())
        else:
            key = f"{e.stream} {a['tensor'][0]} {a['src']}->{a['dst']} {A[str(a['square'])]['step_kind']}"
            t = model.io_s(a)
        meas[key] += e.end - e.start
        pred[key] += t
        count[key] += 1
    for k in sorted(meas):
        print(f"    {k:<40} n={count[k]:<6} measured {meas[k]:8.3f} s   predicted {pred[k]:8.3f} s")


def run_cases(names: Sequence[str], repeats: int, show_breakdown: bool,
              calibrate: str) -> Tuple[List[float], List[Optional[float]]]:
    """Each case measured and predicted: the errors of total throughput at the calibrated profile,
    and at the disk rates of the case (None where it reads nothing from disk)."""
    print(HEADER)
    errors, at_disk = [], []
    for name in names:
        if calibrate == "each":  # the shared machine's load drifts: fit the profile just before the case
            recalibrate()
        what, ov = CASES[name]
        cfg = compose(BASE + ov)
        st, graph = measure(cfg, repeats, trace=True)
        profile = hardware_profile(cfg)
        pr = predict(cfg, graph)
        pr_disk, rates = at_case_disk_rates(cfg, graph, st["events"], profile)
        errors.append(pr.total_tok_s / st["total_tok_s"] - 1)
        at_disk.append(None if pr_disk is None else pr_disk.total_tok_s / st["total_tok_s"] - 1)
        print(row(name, what, st, pr, at_disk[-1]) + f"; policy=auto's LP {lp_tok_s(cfg):.2f}", flush=True)
        if rates:
            print(f"    {describe_rates(rates, profile)}; predicted total {pr_disk.total_tok_s:.2f} tok/s",
                  flush=True)
        if show_breakdown:
            breakdown(graph, st["events"], CostModel(profile, cfg.model.dtype, "cpu"))
    return errors, at_disk


def summary(errors: Sequence[float], at_disk: Sequence[Optional[float]], bar: float = 0.15) -> List[str]:
    """The summary lines: all cases at the calibrated profile; then the cases that read from disk,
    at the calibrated rates and at the rates the disk gave during each case."""
    within = lambda es: sum(abs(e) <= bar for e in es)  # noqa: E731
    lines = [f"|error| of total throughput: median {statistics.median(abs(e) for e in errors):.1%}, "
             f"max {max(abs(e) for e in errors):.1%}; within {bar:.0%}: {within(errors)} of {len(errors)}"]
    disk = [(e, d) for e, d in zip(errors, at_disk) if d is not None]
    if disk:
        n = len(disk)
        lines.append(f"cases reading from disk: {within(e for e, _ in disk)} of {n} within {bar:.0%} at the "
                     f"calibrated rates; {within(d for _, d in disk)} of {n} at the rates the disk gave during "
                     f"each case")
        both = [d if d is not None else e for e, d in zip(errors, at_disk)]
        lines.append(f"all cases: {within(errors)} of {len(errors)} within {bar:.0%} at the calibrated rates; "
                     f"{within(both)} of {len(both)} at the rates the disk gave during each case")
    return lines


def lp_tok_s(cfg) -> float:
    """What policy=auto's LP predicts for this case's policy (graphgen.perf.policy_lp.policy_tok_s)."""
    from graphgen.perf.policy_lp import Knobs, Problem, policy_tok_s

    p = cfg.policy
    kn = Knobs(p.gpu_batch_size, p.num_gpu_batches, bool(p.cpu_attention), bool(p.compress_weight.bits))
    return policy_tok_s(Problem(cfg, hardware_profile(cfg)), kn, list(p.percent))


# --- policy=auto against a grid -----------------------------------------------------------------

AUTO_BASE = ["model=opt-1.3b", "workload.prompt_len=64", "workload.gen_len=16", "workload.num_prompts=32",
             "hardware.device_mem=1.5GB", "hardware.host_mem=2GB", "hardware.disk_mem=40GB"]


def grid() -> List[List[str]]:
    """Hand-written policies a user would try for the budget: placements x batch shapes x CPU attention."""
    placements = ["[0,100,0,100,100,0]", "[20,80,0,100,100,0]", "[40,60,0,100,100,0]", "[50,50,0,50,100,0]",
                  "[0,60,0,100,100,0]", "[0,50,0,50,100,0]", "[0,50,0,0,100,0]", "[30,40,0,50,100,0]"]
    shapes = [(4, 1), (8, 1), (8, 2), (16, 1), (16, 2), (32, 1)]
    out = []
    for pl in placements:
        for gbs, ngb in shapes:
            for cpu in ("false", "true"):
                out.append([f"policy.percent={pl}", f"policy.gpu_batch_size={gbs}",
                            f"policy.num_gpu_batches={ngb}", f"policy.cpu_attention={cpu}"])
    return out


def label(cfg) -> str:
    p = cfg.policy
    comp = " 4-bit" if p.compress_weight.bits else ""
    return (f"percent={[round(x, 1) for x in p.percent]} gbs {p.gpu_batch_size} x {p.num_gpu_batches}"
            f"{' cpu-attn' if p.cpu_attention else ''}{comp}")


def compare_auto(repeats: int, measure_top: int) -> None:
    from graphgen.perf.optimize import compile_policy, describe, optimize, policy_for

    base = compose(BASE + AUTO_BASE)
    t0 = time.perf_counter()
    res = optimize(base)
    print(f"\n{describe(res)}  [{time.perf_counter() - t0:.1f} s]")
    sims = []
    for ov in grid():
        cfg = compose(BASE + AUTO_BASE + ov)
        g, err = compile_policy(cfg)
        if err is None:
            sims.append((predict(cfg, g).total_tok_s, ov, cfg))
    sims.sort(key=lambda x: -x[0])
    print(f"grid: {len(sims)} of {len(grid())} hand-written policies fit; best simulated "
          f"{sims[0][0]:.2f} tok/s ({' '.join(sims[0][1])}); auto simulated {res.best.sim_tok_s:.2f} tok/s")
    print(f"{'policy':<60} {'predicted':>9} {'best':>9} {'median':>9}   measured tok/s, each round")
    rows = [("auto  " + label(policy_for(base, res.best)), res.best.sim_tok_s, policy_for(base, res.best))]
    rows += [("grid  " + label(c), t, c) for t, _, c in sims[:measure_top]]
    runs: List[List[float]] = [[] for _ in rows]
    for _ in range(repeats):  # rounds over all policies: the machine's drift hits each of them alike
        for r, (_, _, cfg) in enumerate(rows):
            runs[r].append(measure(cfg, 1)[0]["total_tok_s"])
    for (name, pred, _), m in zip(rows, runs):
        print(f"{name:<60} {pred:9.2f} {max(m):9.2f} {statistics.median(m):9.2f}   "
              f"({', '.join(f'{x:.2f}' for x in m)})", flush=True)
    for what, stat in (("best", max), ("median", statistics.median)):
        auto, grid_best = stat(runs[0]), max(stat(m) for m in runs[1:])
        print(f"auto {what} {auto:.2f} tok/s = {auto / grid_best:.0%} of the best grid policy's {what} "
              f"({grid_best:.2f} tok/s)")


def recalibrate() -> None:
    from graphgen.perf.calibrate import calibrate

    calibrate(verbose=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--repeats", type=int, default=2, help="runs per case; the best one counts")
    ap.add_argument("--breakdown", action="store_true", help="per-op-kind measured vs predicted seconds")
    ap.add_argument("--no-auto", action="store_true", help="skip the policy=auto comparison")
    ap.add_argument("--measure-top", type=int, default=3, help="grid policies measured (best simulated first)")
    ap.add_argument("--calibrate", choices=("no", "once", "each"), default="once",
                    help="fit the profile to probe runs (python -m graphgen.perf.calibrate) first, or before each case")
    args = ap.parse_args(argv)
    print(f"{machine()}; {run_ahead()}")  # machine() has the load average: other agents share the cores
    if args.calibrate == "once":
        recalibrate()
    profile = hardware_profile(compose(BASE))
    print("profile: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(profile.items())))
    names = [n for n in args.cases.split(",") if n]
    if names:
        errors, at_disk = run_cases(names, args.repeats, args.breakdown, args.calibrate)
        print("\n".join(summary(errors, at_disk)))
    if not args.no_auto:
        compare_auto(args.repeats, args.measure_top)


if __name__ == "__main__":
    main()
