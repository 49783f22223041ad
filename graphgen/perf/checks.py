"""Is a measured hardware profile believable, and is a run near what its profile predicted?

A profile measured while other processes load the machine can be far off (on this 2-core VM one
cached compute_overhead_s = 31 ms, ~100x its quiet value, and priced a run at 15.8 tok/s against
~78 measured). So graphgen.perf.profile repeats the noisy probes (settle: the median of TRIES
independent runs, more while they disagree), checks the result (check_profile: what cannot all be
true of one machine) and never caches a profile that fails; and each generate run compares its
throughput with the prediction (prediction_warning).
"""
from __future__ import annotations

import math
import statistics
from typing import Callable, Dict, List, Optional

from .probes import LATENCY, MEMORY, OVERHEAD

NOISY = (MEMORY, OVERHEAD, LATENCY)  # probe steps run TRIES times: fixed costs and bandwidths
TRIES = 3
SPREAD = 1.5  # slowest / fastest try above this: the step runs again, up to RETRIES more times
RETRIES = 2
MEM_SLACK = 2.0  # a decode matmul may stream weights a little faster than a plain sum reads (prefetch)
DECODE_MM_FLOPS = 2.0 * 32 * 2048 * 8192  # a decode matmul of an LLM layer (opt-1.3b width, 32 sequences)
MISMATCH = 2.0  # a run's measured / predicted throughput beyond this, either way: warn
FLAGS = ("disk_o_direct", "device_is_host")
# fitted by graphgen.perf.calibrate (non-negative least squares): a fixed cost the data does not need is 0
MAY_BE_ZERO = ("disk_latency_s", "disk_write_latency_s", "compute_overhead_s", "attn_overhead_s", "inline_io_s",
               "compute_io_contention")

Run = Dict[str, float]


def settle(first: List[Run], again: Callable[[], Run]) -> List[Run]:
    """More runs of a probe step while the tries of any key spread by more than SPREAD (at most
    RETRIES more), so that the median outvotes a disturbed try."""
    runs = list(first)
    for _ in range(RETRIES):
        if all(spread([r[k] for r in runs]) <= SPREAD for k in runs[0] if k not in FLAGS):
            break
        runs.append(again())
    return runs


def spread(values: List[float]) -> float:
    lo, hi = min(values), max(values)
    return hi / lo if lo > 0 else (1.0 if hi == lo else math.inf)


def median(runs: List[Run]) -> Run:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def check_profile(p: Run) -> List[str]:
    """What in a measured profile cannot all be true of one machine, one sentence each."""
    bad = [f"{k} = {v!r} is not a positive number" for k, v in p.items()
           if not (isinstance(v, (int, float)) and math.isfinite(v)
                   and (v > 0 or k in FLAGS or v == 0 and k in MAY_BE_ZERO))]
    if bad:
        return bad
    mem = p.get("device_mem_bw")
    for key, rate in sorted(p.items()):  # weights cannot stream much faster than memory reads
        if key.startswith("device_mm_bw_") and mem and rate > MEM_SLACK * mem:
            bad.append(f"{key} = {rate / 1e9:.2f} GB/s is above {MEM_SLACK:g}x device_mem_bw = {mem / 1e9:.2f} GB/s")
    decode = p.get("device_flops_decode_bfloat16") if p.get("device_is_host") else None
    if decode and p.get("compute_overhead_s", 0.0) > DECODE_MM_FLOPS / decode:  # CPU: FLOPs dwarf dispatch
        bad.append(f"compute_overhead_s = {p['compute_overhead_s'] * 1e3:.2f} ms: a square of a 64-wide layer "
                   f"would cost more than a (32, 2048) x (2048, 8192) decode matmul "
                   f"({DECODE_MM_FLOPS / decode * 1e3:.2f} ms at device_flops_decode_bfloat16)")
    return bad


def implicated(problems: List[str], keys: Run) -> bool:
    """Does one of the problems name one of these keys (re-measure that step)?"""
    return any(k in p for p in problems for k in keys)


def prediction_warning(measured: float, predicted: float, remeasure: str) -> Optional[str]:
    """A warning when a run's measured throughput and the cost model's prediction for it differ by
    more than MISMATCH x, ending with `remeasure` (what to do); None when they agree."""
    if not (measured > 0 and predicted > 0):
        return None
    ratio = max(measured / predicted, predicted / measured)
    if ratio <= MISMATCH:
        return None
    return (f"this run measured {measured:.2f} tok/s, the cost model predicted {predicted:.2f} tok/s "
            f"({ratio:.1f}x {'faster' if measured > predicted else 'slower'} than predicted): {remeasure}")
