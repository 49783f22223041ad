"""Memory planning: replay the flat schedule on sizes alone and record per-tier peaks.

requires: slot (I/O inserted)    provides: graph.graph["peak_bytes"], ["peak_breakdown"], ["budgets"]
An infeasible plan is refused here, before anything runs, naming the keys to change.
With pipeline stages each stage's ops are replayed against its own budgets (stage_peak_bytes);
peak_bytes / budgets then hold, per tier, the stage closest to its budget. A send frees the
activation on its stage's device; a receive allocates it on the receiver's.
"""
from __future__ import annotations

from collections import defaultdict
from typing import List

from graphgen.config import TIERS, format_bytes, tier_budgets

from . import PassError, register


def _category(tensor) -> str:
    return {"w": "weights", "kv": "cache", "act": "activations"}[tensor[0]]


class _Ledger:
    """Bytes in use per (tier, category); peaks per tier with the breakdown at the peak."""

    def __init__(self):
        self.use = defaultdict(int)
        self.total = {t: 0 for t in TIERS}
        self.peak = {t: 0 for t in TIERS}
        self.at_peak = {t: {} for t in TIERS}

    def add(self, tier, cat, nbytes, transient=0):
        self.use[(tier, cat)] += nbytes
        self.total[tier] += nbytes
        total = self.total[tier] + transient
        if total > self.peak[tier]:
            self.peak[tier] = total
            self.at_peak[tier] = {c: v for (t, c), v in self.use.items() if t == tier and v}
            if transient:
                self.at_peak[tier]["workspace"] = transient


def static_homes(graph, ledgers):
    """Weights at their homes for the whole run; each KV cache allocated whole at its home."""
    for n, a in graph.nodes(data=True):
        if "kind" not in a or n[0] != 0:
            continue
        ledger = ledgers[a.get("stage", 0)]
        if n[2] == 0:
            ledger.add(a["w_home"], "weights", a["w_bytes"])
        if a["kind"] == "attn":
            ledger.add(a["kv_home"], "cache", a["kv_bytes"])


def replay(graph) -> List[_Ledger]:
    """Replay the schedule on sizes alone: one ledger per pipeline stage (one without stages)."""
    ledgers = [_Ledger() for _ in range(graph.graph.get("num_stages", 1))]
    static_homes(graph, ledgers)
    A = dict(graph.nodes(data=True))
    for m in graph.graph["ops"]:
        b = A[m]
        ledger = ledgers[b.get("stage", 0)]
        op = b.get("op", "compute")
        if op in ("send", "recv"):  # token ids are kept with the block state, not in a tier
            if b["tensor"][0] == "act":
                ledger.add("device", "activations", b["bytes"] if op == "recv" else -b["bytes"])
        elif op == "compute":
            where = "host" if b.get("attn_device") == "host" else "device"
            if b["kind"] == "attn":
                ledger.add(where, "cache", b["kv_write"])  # the new slice, until stored
            out = 0 if b["kind"] == "head" else b["act_bytes"]
            ledger.add("device", "activations", out, transient=b["workspace"])
            for _, tier, kind, nbytes in b["frees"]:  # last uses: the order among a slot's
                ledger.add(tier, _category((kind,)), -nbytes)  # stores and frees moves no peak
        elif op == "load":  # compressed weights: the moved bytes are dequantised into `held`
            held = b.get("held", b["bytes"])
            ledger.add(b["dst"], _category(b["tensor"]), held, transient=b["bytes"] if held != b["bytes"] else 0)
            if b["tensor"][0] == "act":  # an activation is consumed once: its home copy goes
                ledger.add(b["src"], "activations", -b["bytes"])
        else:  # store: a cache slice lands in its preallocated home; an activation moves
            ledger.add(b["src"], _category(b["tensor"]), -b["bytes"])
            if b["tensor"][0] == "act":
                ledger.add(b["dst"], "activations", b["bytes"])
    return ledgers


@register("plan_memory", requires=("slot",))
def plan_memory(graph, cfg):
    if graph.graph.get("num_stages", 1) > 1:
        return plan_stages(graph, cfg)
    ledger = replay(graph)[0]
    budgets = tier_budgets(cfg.hardware)
    graph.graph.update(peak_bytes=dict(ledger.peak), peak_breakdown=ledger.at_peak, budgets=budgets)
    for tier in TIERS:
        if ledger.peak[tier] > budgets[tier]:
            raise PassError(over_budget(tier, ledger, budgets[tier], cfg))
    return graph


def plan_stages(graph, cfg):
    """Each stage against its own budgets; the first stage over budget is refused, named."""
    peaks, worst, breakdown = [], {}, {}
    for s, (budgets, ledger) in enumerate(zip(graph.graph["stage_budgets"], replay(graph))):
        peaks.append(dict(ledger.peak))
        for tier in TIERS:
            if ledger.peak[tier] > budgets[tier]:
                raise PassError(f"pipeline stage {s} (rank {s}, layers {stage_range(graph, s)}): "
                                + over_budget(tier, ledger, budgets[tier], cfg)
                                + " (that rank's hardware.*, or parallel.stage_budgets / parallel.stage_layers)")
            if tier not in worst or ledger.peak[tier] * worst[tier][1] > worst[tier][0] * max(budgets[tier], 1):
                worst[tier] = (ledger.peak[tier], max(budgets[tier], 1), s)
                breakdown[tier] = ledger.at_peak[tier]
    graph.graph.update(stage_peak_bytes=peaks, peak_bytes={t: worst[t][0] for t in TIERS},
                       budgets={t: graph.graph["stage_budgets"][worst[t][2]][t] for t in TIERS},
                       peak_breakdown=breakdown)
    return graph


def stage_range(graph, s: int) -> str:
    js = [j for j, t in enumerate(graph.graph["stage_of_layer"]) if t == s]
    return f"{js[0]}..{js[-1]}"


def gb(n: float) -> str:
    return format_bytes(n)


def over_budget(tier, ledger, budget, cfg) -> str:
    parts = ", ".join(f"{c} {gb(v)}" for c, v in sorted(ledger.at_peak[tier].items()))
    p = cfg.policy
    key = {"device": "hardware.device_mem", "host": "hardware.host_mem", "disk": "hardware.disk_mem"}[tier]
    advice = {
        "device": f"lower policy.percent[0] (weights on device, now {p.percent[0]}) or policy.percent[2] "
                  f"(cache on device, now {p.percent[2]}), or policy.gpu_batch_size (now {p.gpu_batch_size})",
        "host": f"move weights or cache to disk (lower policy.percent[1] = {p.percent[1]} or "
                f"policy.percent[3] = {p.percent[3]}), or lower policy.num_gpu_batches (now {p.num_gpu_batches})",
        "disk": "lower workload.gen_len or policy.gpu_batch_size, or free disk space",
    }[tier]
    off = [f"policy.compress_{what}.bits=4" for what, c in (("weight", p.compress_weight), ("cache", p.compress_cache))
           if not c.bits]
    if off:  # 4-bit weights / cache take ~28% of their bfloat16 bytes (passes/compress.py)
        advice += f"; or compress ({' and/or '.join(off)})"
    return (f"plan does not fit: the {tier} tier needs {gb(ledger.peak[tier])} at peak ({parts}) "
            f"but {key} is {gb(budget)}. To fit: {advice}; or raise {key}.")
