"""policy=auto: the placement, batch sizes, CPU attention and compression that maximise throughput
under the tier budgets, in the style of FlexGen's policy search (Sheng et al., ICML 2023, Sec. 5).

A search over batch sizes (FlexGen's: gpu_batch_size grows until nothing fits, num_gpu_batches
until the LP's throughput drops), for CPU attention off/on and compression off/on (when the
pipeline has the compress pass), solves one linear program per knob setting (graphgen.perf.policy_lp)
and ranks them. The best candidates are compiled (plan_memory must accept them: a tier it refuses
gets a tighter LP budget and the LP is solved again) and simulated on the cost model; the fastest
simulated one wins. It refuses, saying what would fit, when nothing does, and warns when the
model needs no offloading at all.
"""
from __future__ import annotations

import copy
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..compile import checkpoint_of, compile, spec_for, workload_shape
from ..config import Config
from ..verify import PassError
from .costmodel import Prediction, simulate
from .policy_lp import COMPRESS, Knobs, Problem, solve_lp, tok_s
from .profile import hardware_profile

VERIFY = 3  # candidates compiled and simulated


class NoFit(ValueError):
    """No policy fits the tier budgets; the message says what would."""


@dataclass
class Candidate:
    knobs: Knobs
    percent: List[float]
    lp_tok_s: float
    sim: Optional[Prediction] = None

    @property
    def tok_s(self) -> float:
        return self.sim.total_tok_s if self.sim else self.lp_tok_s


@dataclass
class Result:
    best: Candidate
    tried: List[Candidate] = field(default_factory=list)  # verified candidates, best first
    lps: int = 0  # linear programs solved


# --- the search -----------------------------------------------------------------------------

GBS_STEPS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
NGB_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def knob_space(P: Problem) -> List[Tuple[bool, bool]]:
    """(cpu_attention, compress) pairs worth searching; compression needs the compress pass."""
    comp = [False, True] if "compress" in P.cfg.pipeline else [False]
    return [(cpu, c) for cpu in (False, True) for c in comp]


def search(P: Problem, budgets: Dict[str, float]) -> Tuple[List[Candidate], int]:
    """LP candidates over batch sizes, best LP throughput first; and how many LPs were solved."""
    N, out, lps = P.cfg.workload.num_prompts, [], 0
    for cpu, comp in knob_space(P):
        for gbs in GBS_STEPS:
            if N and gbs > N:
                break
            fits, prev, drops = False, 0.0, 0
            for ngb in NGB_STEPS:
                if N and gbs * ngb >= 2 * N:
                    break
                kn = Knobs(gbs, ngb, cpu, comp)
                r = solve_lp(P, kn, budgets)
                lps += 1
                if r is None:
                    break
                fits = True
                out.append(Candidate(kn, r[0], r[1]))
                drops = drops + 1 if r[1] < prev else 0
                prev = max(prev, r[1])
                if drops >= 2:
                    break
            if not fits:
                break
    # ties (within 0.5%) go to the larger GPU batch: fewer, bigger squares pay fewer per-op costs
    # that a profile may not carry (FlexGen's T4 constants have none)
    out.sort(key=lambda c: (-round(math.log(max(c.lp_tok_s, 1e-12)) / math.log(1.005)), -c.knobs.gbs))
    return out, lps


def policy_for(cfg: Config, cand: Candidate) -> Config:
    """cfg with the candidate's policy (auto off: the choice is made)."""
    out = copy.deepcopy(cfg)
    p, kn = out.policy, cand.knobs
    p.auto = False
    p.percent = list(cand.percent)
    p.gpu_batch_size, p.num_gpu_batches, p.cpu_attention = kn.gbs, kn.ngb, kn.cpu_attention
    for c in (p.compress_weight, p.compress_cache):
        c.bits, c.group_size = (COMPRESS if kn.compress else (None, c.group_size))
        c.group_dim = -1
    return out


def compile_policy(cfg: Config, spec=None):
    """compile() for cfg's policy and workload: (graph, None) or (partial graph, PassError)."""
    try:
        return compile(spec or spec_for(cfg, checkpoint_of(cfg)), cfg, workload_shape(cfg)), None
    except PassError as e:
        return e.graph, e


def verify(P: Problem, cand: Candidate, budgets: Dict[str, float], tries: int = 4) -> Optional[Candidate]:
    """Compile the candidate; where plan_memory refuses a tier, shrink that tier's LP budget by the
    overshoot and solve again. Accepted: simulated on the cost model."""
    b = dict(budgets)
    for _ in range(tries):
        cfg = policy_for(P.cfg, cand)
        g, err = compile_policy(cfg, P.spec)
        if err is None:
            cand.sim = simulate(g, P.model, overlap=cfg.executor.name != "reference")
            return cand
        peaks = g.graph.get("peak_bytes")
        if not peaks:
            return None  # refused for another reason than memory
        for tier, peak in peaks.items():
            if peak > P.budgets[tier]:
                b[tier] -= (peak - P.budgets[tier]) * 1.1 + 0.01 * P.budgets[tier]
        r = solve_lp(P, cand.knobs, b)
        if r is None:
            return None
        cand = Candidate(cand.knobs, r[0], r[1])
    return None


def optimize(cfg: Config, profile: Optional[Dict[str, float]] = None, verify_top: int = VERIFY,
             spec=None) -> Result:
    """The best policy for cfg's model, workload and hardware budgets (see the module docstring).
    profile: the cost model's constants (default: hardware.profile, or this machine measured)."""
    if profile is None:
        profile = hardware_profile(cfg)
    P = Problem(cfg, profile, spec)
    budgets = {t: float(v) for t, v in P.budgets.items()}
    cands, lps = search(P, budgets)
    if not cands:
        raise NoFit(no_fit_message(P))
    tried, seen = [], set()
    for cand in cands:
        if len(tried) >= verify_top:
            break
        if cand.knobs in seen:
            continue
        seen.add(cand.knobs)
        ok = verify(P, cand, budgets)
        if ok is not None:
            tried.append(ok)
    if not tried:
        raise NoFit(no_fit_message(P, planned=True))
    for c in tried:
        c.sim_tok_s = tok_s(P, c.knobs, c.sim.total_s)
    tried.sort(key=lambda c: -c.sim_tok_s)
    if tried[0].percent[0::2] == [100.0, 100.0, 100.0]:
        warnings.warn(f"policy=auto: offloading is unnecessary: {cfg.model.name} with its KV cache and working "
                      f"buffers fits in hardware.device_mem ({_size(P.budgets['device'])}) at "
                      f"gpu_batch_size={tried[0].knobs.gbs}; everything stays on the device", stacklevel=2)
    return Result(tried[0], tried, lps)


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def no_fit_message(P: Problem, planned: bool = False) -> str:
    """What the smallest job needs (gbs=1, 1 GPU batch) against the budgets, and what to change."""
    L = P.layers(1, False)
    W = sum(L[(layer.kind, "prefill")]["w_bytes"] for layer in P.spec.layers)
    kv = P.count.get("attn", 0) * L[("attn", "prefill")]["kv_bytes"] if "attn" in P.kinds else 0
    work = max(v["workspace"] for v in L.values()) + 2 * max(v["w_bytes"] for v in L.values())
    b = P.budgets
    why = ("every candidate the LP found was refused by plan_memory" if planned else
           "no placement fits the tier budgets even at gpu_batch_size=1, num_gpu_batches=1")
    need = (f"{P.cfg.model.name} needs {_size(W)} of weights + {_size(kv)} of KV cache (prompt {P.S} + gen "
            f"{P.n}) across the tiers, and at least {_size(work)} of working buffers on the device (two "
            f"layers' weights and the largest workspace)")
    have = (f"the budgets are device {_size(b['device'])} (hardware.device_mem), host {_size(b['host'])} "
            f"(hardware.host_mem), disk {_size(b['disk'])} (hardware.disk_mem)")
    if work > b["device"]:
        fix = f"raise hardware.device_mem to at least {_size(work * 1.1)}"
    elif W + kv > sum(b.values()):
        fix = f"raise hardware.disk_mem (the cheapest) so the tiers hold {_size((W + kv) * 1.1)} in all"
    else:
        fix = "raise hardware.host_mem or hardware.disk_mem, or shorten workload.prompt_len / gen_len"
    comp = "" if "compress" in P.cfg.pipeline else "; or add the 'compress' pass to pipeline"
    return f"policy=auto: {why}: {need}; {have}. To fit: {fix}{comp}."


def describe(res: Result) -> str:
    c = res.best
    kn, pr = c.knobs, c.sim
    comp = "4-bit weights and cache" if kn.compress else "off"
    return (f"policy=auto chose percent={c.percent} gpu_batch_size={kn.gbs} num_gpu_batches={kn.ngb} "
            f"cpu_attention={str(kn.cpu_attention).lower()} compression={comp}: predicted "
            f"{c.sim_tok_s:.3f} tok/s (LP estimate {c.lp_tok_s:.3f}; bottleneck {pr.bottleneck}; "
            f"{res.lps} LPs, {len(res.tried)} candidates compiled)")


def resolve_policy(cfg: Config, out=sys.stderr, spec=None) -> Config:
    """cfg unchanged unless policy.auto; then cfg with the optimised policy, which is printed."""
    if not cfg.policy.auto:
        return cfg
    res = optimize(cfg, spec=spec)
    print(f"graphgen: {describe(res)}", file=out)
    return policy_for(cfg, res.best)
