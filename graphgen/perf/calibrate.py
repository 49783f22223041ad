"""Calibration: fit the cost model's executor-level constants to traced runs on this machine, as
FlexGen fitted its T4 constants to real runs (experimental/cost_model.py).

    python -m graphgen.perf.calibrate [--dtype bfloat16] [--offload-dir DIR]

Runs small probe jobs with the async executor and a trace: OPT-shaped models of two widths (768
and 2048) with a few decoder blocks (at least two, and enough that their weights are 4x the
last-level cache: a real model's weights stream from memory, never from the cache), a few GPU
batch sizes and prompt lengths, in memory, with weights on disk, and with the KV cache on disk
under CPU attention; device_mem_bw and host_mem_bw are measured again just before. Each op
kind's duration is then fitted by
non-negative least squares on relative error, over the median of ops of equal shape, each shape
weighted by its share of its run's time:
  square      = compute_overhead_s (+ attn_overhead_s for attention) + weight bytes / device_mm_bw
                + prefill: matmul FLOPs / device_flops + attention FLOPs / device_bmm_flops
                + decode (and the head, one row per sequence): matmul FLOPs / device_flops_decode
                  (+ weight bytes / plain_weight_bw when they came from the host or disk tier: not
                  prepacked, see CostModel.reorder_s) + cache bytes / device_attn_bw | cpu_attn_bw
                + prefill on such weights: matmul FLOPs / plain_flops (oneDNN's plain, unfused path)
  disk op     = disk_latency_s + bytes / disk_read_bw (weight reads) | disk_read_cache_bw (KV cache
                reads): the latency is the median 4 KiB read through the disk tier's path
                (probes.small_read_times), shared by both kinds; each rate is its reads' bytes over
                their seconds net of it (fit_disk_reads)
                disk_write_latency_s + bytes / disk_write_bw (writes: the cache's slices are buffered)
plus compute_io_contention seconds per second of disk I/O the trace shows beside the square (on
a small machine the I/O threads take cores from compute; the overlap is measured, so the fit stays
linear), plus the executor's time between ops (compute stream wall time not inside any op),
added to compute_overhead_s; a copy within RAM that the compute stream runs inline (CPU) costs
inline_io_s (the median of those ops beyond the bytes a store writes at host_memcpy_bw). The
fitted keys replace the microbenchmarks' in the cached profile of
hardware=auto (profile key calibrated = 1; meta['calibration'] lists the runs and the fit).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
from bisect import bisect_left
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import nnls

from ..api import LLM
from ..compile import spec_for
from ..config import compose
from ..costs import kv_slice_bytes
from . import checks, probes, profile as hp
from .costmodel import CostModel, attention_flops
from .probes import run_ahead

# probe jobs: (model conf, overrides); few decoder blocks keep dummy weights and runs short
PROBE = ["model.weights=dummy", "executor=async", "report.progress=false",
         "hardware.device_mem=16GB", "hardware.host_mem=16GB", "hardware.disk_mem=40GB", "workload.gen_len=8"]
MIN_BLOCKS = 2
CACHE_MULTIPLE = 4  # a probe's decoder blocks hold at least this many times the last-level cache in weights
DEV = ["policy=all-device"]
RUNS: List[Tuple[str, List[str]]] = [
    ("opt-125m", DEV + ["policy.gpu_batch_size=4", "policy.num_gpu_batches=2", "workload.prompt_len=64"]),
    ("opt-125m", DEV + ["policy.gpu_batch_size=32", "policy.num_gpu_batches=1", "workload.prompt_len=256"]),
    ("opt-1.3b", DEV + ["policy.gpu_batch_size=4", "policy.num_gpu_batches=1", "workload.prompt_len=64"]),
    ("opt-1.3b", DEV + ["policy.gpu_batch_size=16", "policy.num_gpu_batches=2", "workload.prompt_len=192"]),
    # decode at the batch policy=auto tends to pick (fitted only up to gbs 16, the decode FLOP rate
    # priced a gbs-32 decode mlp of opt-1.3b at 4.1 s for a run against 2.9 s measured)
    ("opt-1.3b", DEV + ["policy.gpu_batch_size=32", "policy.num_gpu_batches=1", "workload.prompt_len=32"]),
    # weights on the host tier: in RAM, but not prepacked (each decode matmul reorders them)
    ("opt-1.3b", ["policy.percent=[0,100,100,0,100,0]", "policy.gpu_batch_size=8", "policy.num_gpu_batches=1",
                  "workload.prompt_len=64"]),
    # weights on disk: reads of 34-206 MB (opt-1.3b's layers and head) and of 5-9 MB (opt-125m's)
    ("opt-1.3b", ["policy.percent=[0,0,100,0,100,0]", "policy.gpu_batch_size=8", "policy.num_gpu_batches=1",
                  "workload.prompt_len=64"]),
    ("opt-125m", ["policy.percent=[0,0,100,0,100,0]", "policy.gpu_batch_size=16", "policy.num_gpu_batches=1",
                  "workload.prompt_len=64"]),
    ("opt-125m", ["policy.percent=[100,0,0,0,100,0]", "policy.cpu_attention=true", "policy.gpu_batch_size=16",
                  "policy.num_gpu_batches=2", "workload.prompt_len=256"]),
]
REPEATS = 2  # runs per probe; their ops are pooled
QUANTILE = 0.5  # of each group's durations: a run's time is the sum of its ops, disturbed ones included,
# so the typical op predicts it (the 20th percentile, tried first, fits an undisturbed machine and
# over-predicted throughput by ~10% on this shared one)
COMPUTE_KEYS = ("compute_overhead_s", "attn_overhead_s", "device_flops", "device_bmm_flops", "device_mm_bw",
                "device_flops_decode", "device_attn_bw", "cpu_attn_bw", "plain_weight_bw", "plain_flops", "kv_join_bw")


def square_features(graph, a: dict, same_memory: bool = True) -> np.ndarray:
    """One square's regressors, in COMPUTE_KEYS order (as graphgen.perf.costmodel prices it).
    same_memory (a CPU-only machine): attention delegated to the host runs the device's kernel in
    the device's memory, so it shares device_attn_bw (fitted from every decode attention square)."""
    spec, sh = graph.graph["spec"], graph.graph["shape"]
    attn = attention_flops(graph, a)
    mm = a["flops"] - attn
    f = np.zeros(len(COMPUTE_KEYS))
    f[0], f[1] = 1.0, float(a["kind"] == "attn")
    decode = a["step_kind"] != "prefill"
    if mm:  # every matmul square streams its weights once; FLOPs at the prefill or decode rate
        f[4] = a.get("w_work_bytes", a["w_bytes"])
        f[5 if decode or a["kind"] == "head" else 2] = mm  # the head: one row per sequence
        if a.get("w_home", "device") != "device" and not a.get("w_compressed"):  # not prepacked (CPU)
            if decode or a["kind"] == "head":
                f[8] = a["w_bytes"]  # reordered in each call
            else:
                f[9] = mm  # the plain, unfused kernels
    if a["kind"] == "attn":
        if decode:
            dense = kv_slice_bytes(spec, sh, a["ctx"])
            f[7 if a.get("attn_device") == "host" and not same_memory else 6] = dense
            if CostModel.joins(a):
                f[10] = dense  # the loaded prefix copied into the head-major scratch first
        else:
            f[3] = attn
    return f


def probe(model: str, overrides: Sequence[str], dtype: str, offload_dir: Optional[str]) -> Dict:
    """One traced run (after a 2-token warm-up): its graph, events and stats."""
    ov = [f"model={model}", f"model.dtype={dtype}"] + PROBE + list(overrides)
    ov += [f"hardware.offload_dir={offload_dir}"] if offload_dir else []
    ov += [f"model.arch.num_hidden_layers={probe_blocks(compose(ov))}"]
    cfg = compose(ov + ["executor.trace=true"])
    w, p = cfg.workload, cfg.policy
    ids = torch.randint(4, 1000, (p.gpu_batch_size * p.num_gpu_batches, w.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    with LLM(config=cfg) as llm:
        llm.generate(ids, max_new_tokens=2)
        n0 = len(llm.executor.trace.events)
        for _ in range(REPEATS):
            llm.generate(ids, max_new_tokens=w.gen_len)
        return {"graph": llm.graph, "events": llm.executor.trace.events[n0:], "stats": dict(llm.last_stats),
                "name": f"{model} {' '.join(overrides)}"}


def probe_blocks(cfg) -> int:
    """Decoder blocks of a probe model: enough that their weights stream from memory as a real
    model's do. Two blocks of opt-125m (28 MB) stay largely in a 32 MB L3 between decode steps
    and priced every opt-125m-sized square ~10% fast; a deep model's layers never fit."""
    spec = spec_for(cfg)
    block = sum(l.numel for l in spec.layers if l.block == 0) * torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8
    need = math.ceil(CACHE_MULTIPLE * last_level_cache_bytes() / max(block, 1))
    return min(cfg.model.arch["num_hidden_layers"], max(MIN_BLOCKS, need))


def last_level_cache_bytes(cpu: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Size of the CPU's largest cache (Linux sysfs); 32 MiB where it cannot be read."""
    sizes = []
    for index in glob.glob(os.path.join(cpu, "index*")):
        try:
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
        digits = text.rstrip("KkMmGgBb")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=32 << 20)


def disk_overlap(events) -> Dict[int, float]:
    """Per compute event (by index): seconds of disk I/O (load and store streams) running beside it."""
    io = sorted((e.start, e.end) for e in events if e.stream in ("load", "store") and "disk" in e.link)
    starts = [s for s, _ in io]
    longest = max((b - a for a, b in io), default=0.0)
    out = {}
    for n, e in enumerate(events):
        if e.stream != "compute" or not io:
            continue
        lo = bisect_left(starts, e.start - longest)  # no earlier op can reach into this one
        out[n] = sum(max(0.0, min(e.end, b) - max(e.start, a)) for a, b in io[lo:bisect_left(starts, e.end)])
    return out


def groups(run: Dict, same_memory: bool = True) -> Tuple[List, List, List, Dict[str, List]]:
    """Per square shape: features (COMPUTE_KEYS, then the disk I/O seconds beside it), the QUANTILE
    of its durations (and of that I/O), its op count; disk ops per direction."""
    g = run["graph"]
    A = {str(n): a for n, a in g.nodes(data=True)}
    sq: Dict[tuple, List[float]] = defaultdict(list)
    beside: Dict[tuple, List[float]] = defaultdict(list)
    feats: Dict[tuple, np.ndarray] = {}
    disk: Dict[str, List] = {"read": [], "read_cache": [], "write": []}
    overlap = disk_overlap(run["events"])
    for n, e in enumerate(run["events"]):
        if e.stream not in ("load", "compute", "store"):
            continue
        a = A[e.name]
        if e.stream == "compute":
            f = square_features(g, a, same_memory)
            key = tuple(f)
            feats[key] = f
            sq[key].append(e.end - e.start)
            beside[key].append(overlap.get(n, 0.0))
        elif kind := disk_op_kind(a):
            disk[kind].append((a["bytes"], e.end - e.start))
    keys = sorted(sq)
    return ([np.append(feats[k], np.quantile(beside[k], QUANTILE)) for k in keys],
            [float(np.quantile(sq[k], QUANTILE)) for k in keys], [len(sq[k]) for k in keys], disk)


def disk_op_kind(a: dict) -> Optional[str]:
    """A load / store op's kind of disk I/O: "read" (weights, activations), "read_cache" (a KV
    cache prefix), "write"; None when it does not cross the disk or moves nothing."""
    if "disk" not in (a["src"], a["dst"]) or not a["bytes"]:
        return None
    return "write" if a["src"] != "disk" else "read_cache" if a["tensor"][0] == "kv" else "read"


READ_KEYS = {"read": "disk_read_bw", "read_cache": "disk_read_cache_bw"}  # the profile key pricing each kind


def disk_reads(graph, events) -> Dict[str, Tuple[int, int, float]]:
    """A traced run's disk reads per profile key that prices them (READ_KEYS): (ops, bytes,
    seconds), the seconds summed over the load ops' own durations, as calibration fits them."""
    A = {str(n): a for n, a in graph.nodes(data=True)}
    out: Dict[str, Tuple[int, int, float]] = {}
    for e in events:
        a = A.get(e.name) if e.stream == "load" else None
        key = READ_KEYS.get(disk_op_kind(a)) if a and a.get("op") == "load" else None
        if key:
            n, b, t = out.get(key, (0, 0, 0.0))
            out[key] = (n + 1, b + a["bytes"], t + e.end - e.start)
    return out


def observed_disk_rates(graph, events, latency_s: float) -> Dict[str, float]:
    """The read rates the disk gave a traced run, as the cost model defines them (an op takes
    latency_s + bytes / rate): per key of READ_KEYS, the rate at which its reads, at that latency,
    take the seconds they took: bytes / (seconds - ops x latency_s). A kind the run did not read,
    or whose reads took no longer than their latency alone, is left out."""
    rates = {key: net_rate(n, b, t, latency_s) for key, (n, b, t) in disk_reads(graph, events).items()}
    return {key: r for key, r in rates.items() if r}


def with_disk_rates(profile: Dict[str, float], rates: Dict[str, float]) -> Dict[str, float]:
    """A copy of `profile` whose disk read keys (READ_KEYS) are `rates` where given."""
    unknown = set(rates) - set(READ_KEYS.values())
    if unknown:
        raise ValueError(f"not disk read keys: {sorted(unknown)}; the keys are {sorted(READ_KEYS.values())}")
    return {**profile, **rates}


def fit_relative(X: np.ndarray, y: np.ndarray, weight: Optional[np.ndarray] = None) -> np.ndarray:
    """Non-negative coefficients minimising sum(weight * (X c / y - 1)^2)."""
    w = np.sqrt(weight if weight is not None else np.ones(len(y)))
    coef, _ = nnls(X / y[:, None] * w[:, None], w)
    return coef


def on_compute_thread(run: Dict) -> List:
    """The events the compute stream ran: squares, and copies within RAM run inline (CPU)."""
    A = run["graph"].nodes
    inline = {str(n) for n, a in A(data=True) if a.get("op") in ("load", "store") and a.get("stream") == "compute"}
    return [e for e in run["events"] if e.stream == "compute" or e.name in inline]


def between_squares(run: Dict) -> float:
    """Seconds per op the compute stream spends outside ops (dispatch, waits), in-memory runs."""
    comp = sorted((e.start, e.end) for e in on_compute_thread(run))
    gaps = [b[0] - a[1] for a, b in zip(comp, comp[1:]) if b[0] > a[1]]
    return statistics.median(gaps) if gaps else 0.0


def inline_io(runs: List[Dict], memcpy_bw: float) -> float:
    """inline_io_s: the median seconds of a copy within RAM run inline on the compute stream
    beyond the slice a store writes at memcpy_bw (graphgen.perf.costmodel CostModel.io_s)."""
    extra = []
    for r in runs:
        A = {str(n): a for n, a in r["graph"].nodes(data=True)}
        for e in on_compute_thread(r):
            a = A[e.name]
            if e.stream != "compute":
                copied = a["bytes"] if a["op"] == "store" and memcpy_bw else 0
                extra.append(e.end - e.start - copied / (memcpy_bw or 1.0))
    return max(0.0, statistics.median(extra)) if extra else 0.0


def fit_disk_reads(reads: Sequence[Tuple[int, float]], cache_reads: Sequence[Tuple[int, float]],
                   latency_s: float) -> Dict[str, float]:
    """disk_read_bw and disk_read_cache_bw from (bytes, seconds) of the probes' weight reads and KV
    cache prefix reads, at a read latency measured apart (calibrate: the median 4 KiB read through
    the disk tier's path, probes.small_read_times): per kind, its n reads' bytes B over their
    seconds T net of the latency, B / (T - n x latency_s): the rate at which the cost model (a read
    costs latency_s + bytes / rate) prices those reads at the seconds they took in all, as
    observed_disk_rates reads a run. It is least squares with that intercept and each read's
    variance proportional to its bytes (a sum of request times). A kind with fewer than 2 reads,
    or whose reads took no longer than their latency, is left out.

    Why neither the latency nor the rates are fitted on relative error, as before: the probes' reads
    (4.7 MB and up) cannot set the intercept: ~0.06 ms is a few % of their time, less than their rate
    varies between the probe runs that make the small and the large ones (1.1-2.7 GB/s), so a
    latency fitted from them took that variation (0 to 2.83 ms in calibrations minutes apart) and
    the cache's rate, fitted net of it, moved with it (4.39 GB/s against 1.3-2.1). And a rate fitted
    on relative error weighs each read's rate alike: with reads' rates spread as on this disk it
    came out 1.07-1.61x the bytes over the seconds of the very reads it was fitted to, the rate that
    prices a run (docs/costmodel.md, "How calibration fits the disk's read latency and rates")."""
    out = {}
    for key, pts in (("disk_read_bw", reads), ("disk_read_cache_bw", cache_reads)):
        if len(pts) >= 2:
            rate = net_rate(len(pts), sum(n for n, _ in pts), sum(t for _, t in pts), latency_s)
            if rate:
                out[key] = rate
    return out


def net_rate(n: int, nbytes: float, seconds: float, latency_s: float) -> Optional[float]:
    """The rate at which n reads of nbytes in all, each costing latency_s, take `seconds`: None when
    the latency alone takes that long."""
    return float(nbytes / (seconds - n * latency_s)) if seconds - n * latency_s > 0 else None


def fit(runs: List[Dict], dtype: str, memcpy_bw: float = 0.0, same_memory: bool = True,
        read_latency_s: Optional[float] = None) -> Tuple[Dict[str, float], Dict]:
    """The calibrated keys from traced runs (memcpy_bw: the profile's host_memcpy_bw, which
    prices the bytes of the inline copies; same_memory: the runs' device is the host CPU;
    read_latency_s: the disk's seconds per read, measured apart, kept as disk_latency_s and taken
    out of the reads' seconds before their rates; None: rates net of no latency, and
    disk_latency_s left as the profile has it)."""
    X, y, share, reads, cache_reads, writes, gaps = [], [], [], [], [], [], []
    for r in runs:
        f, t, n, d = groups(r, same_memory)
        X += f
        y += t
        total = sum(a * b for a, b in zip(t, n))
        share += [a * b / total for a, b in zip(t, n)]  # each run's time, split by where it goes
        reads += d["read"]
        cache_reads += d["read_cache"]
        writes += d["write"]
        if not any("disk" in getattr(e, "link", "") for e in r["events"]):  # in memory: no waits for I/O
            gaps.append(between_squares(r))
    X, y = np.array(X), np.array(y)
    c = fit_relative(X, y, np.array(share))  # the shapes a run spends its time in weigh the most
    out = {}
    names = {"device_flops": f"device_flops_{dtype}", "device_bmm_flops": f"device_bmm_flops_{dtype}",
             "device_mm_bw": f"device_mm_bw_{dtype}", "device_flops_decode": f"device_flops_decode_{dtype}",
             "device_attn_bw": f"device_attn_bw_{dtype}", "cpu_attn_bw": f"cpu_attn_bw_{dtype}",
             "plain_weight_bw": f"plain_weight_bw_{dtype}", "plain_flops": f"plain_flops_{dtype}",
             "kv_join_bw": f"kv_join_bw_{dtype}"}
    out["compute_io_contention"] = float(c[len(COMPUTE_KEYS)])  # seconds per second of disk I/O beside
    for key, v in zip(COMPUTE_KEYS, c):
        if key.endswith("_s"):
            out[key] = float(v)
        else:  # a rate; a zero coefficient: that term never mattered, so it is free
            out[names[key]] = float(1 / v) if v > 1e-18 else 1e18
    if same_memory:  # delegated attention is the device's kernel in the device's memory
        out[names["cpu_attn_bw"]] = out[names["device_attn_bw"]]
    gap = statistics.median(gaps) if gaps else 0.0
    out["compute_overhead_s"] += gap
    out["inline_io_s"] = inline_io(runs, memcpy_bw)
    if read_latency_s is not None and (reads or cache_reads):
        out["disk_latency_s"] = float(read_latency_s)
    out.update(fit_disk_reads(reads, cache_reads, read_latency_s or 0.0))
    if len(writes) >= 2:  # the cache's slice writes: ~0 and ~13 MB, sizes that set the latency apart
        lat, inv = fit_relative(np.array([[1.0, n] for n, _ in writes]), np.array([t for _, t in writes]))
        out["disk_write_bw"] = float(1 / inv) if inv > 1e-18 else 1e18
        out["disk_write_latency_s"] = float(lat)
    pred = X @ c
    err = pred / y - 1
    quality = {"squares": int(len(y)), "median_abs_rel_err": float(np.median(np.abs(err))),
               "gap_s": gap, "disk_reads": len(reads), "disk_cache_reads": len(cache_reads),
               "disk_writes": len(writes)}
    return out, quality


def memory_now(device: str = "cpu") -> Dict[str, float]:
    """device_mem_bw and host_mem_bw measured again (median of checks.TRIES tries, more while they
    disagree): a figure cached under another load would bound the fitted squares by a stale floor
    (one measured at load average 12 priced a decode step memory-bound at 8.2 GB/s, while the run
    streamed its weights at 12 GB/s)."""
    dev = torch.device(device)
    measure = lambda: probes.memory_profile(dev, 256 << 20, 5)  # noqa: E731
    return checks.median(checks.settle([measure() for _ in range(checks.TRIES)], measure))


def calibrate(dtype: str = "bfloat16", offload_dir: Optional[str] = None, device: str = "cpu",
              verbose: bool = True) -> Dict[str, float]:
    """Run the probes, fit, and store the fitted keys in the cached hardware profile."""
    record = hp.load_or_measure_record(device, offload_dir)
    fitted = memory_now(device)  # the floor of every compute part, measured beside the probes it bounds
    runs = []
    for model, ov in RUNS:
        runs.append(probe(model, ov, dtype, offload_dir))
        if verbose:
            st = runs[-1]["stats"]
            print(f"  probe {runs[-1]['name']}: {st['total_tok_s']:.1f} tok/s", flush=True)
    small = probes.small_read_times(offload_dir)  # the disk's fixed cost per read, beside the probes
    keys, quality = fit(runs, dtype, record["profile"].get("host_memcpy_bw", 0.0),
                        same_memory=bool(record["profile"].get("device_is_host")),
                        read_latency_s=statistics.median(small))
    fitted.update(keys)
    record["profile"].update(fitted, calibrated=1.0)
    record["meta"]["calibration"] = {"runs": [r["name"] for r in runs], "fit": quality, "dtype": dtype}
    problems = checks.check_profile(record["profile"])
    record["meta"].update(cached=not problems, problems=problems)  # the fit replaces the probes it checks
    hp.keep_for_this_run(record, device)
    if problems:  # never cache a bad measurement
        print("graphgen: WARNING: the calibrated profile is inconsistent (" + "; ".join(problems) + "): used "
              "for this process only, NOT cached. " + hp.remeasure_hint(device), file=sys.stderr)
        return fitted
    path = hp.cache_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    if verbose:
        for k, v in sorted(fitted.items()):
            print(f"  {k:<28} {v:.4g}")
        print(f"  fit: {quality}; written to {path}")
    return fitted


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m graphgen.perf.calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype to calibrate (bfloat16 | float32)")
    ap.add_argument("--offload-dir", default=None, help="disk tier directory (default: the profile's)")
    ap.add_argument("--nice", type=int, default=-15, help="scheduling priority while probing, of this process "
                    "and its session's autogroup (root: negative runs ahead of other processes, whose load "
                    "would be fitted as noise)")
    args = ap.parse_args(argv)
    print(f"graphgen: calibrating at {run_ahead(args.nice)}", file=sys.stderr)
    calibrate(args.dtype, args.offload_dir)


if __name__ == "__main__":
    main()
