"""Tensor placement from the policy's six percents (FlexGen), plus per-layer overrides.

requires: -    provides: w_home (layer granularity), kv_home (per cache tensor (j, k)),
act_home (per activation tensor (j, k)). The rest after device% and host% goes to disk.
Each tensor goes to the tier whose cumulative share contains its midpoint, so the byte
split matches the percents as closely as whole tensors allow. With pipeline stages the split
is made within each stage (each has its own tiers), and an activation sent to the next stage
stays on the device it is sent from.
"""
from __future__ import annotations

from typing import List, Sequence

from graphgen.build import squares
from graphgen.config import TIERS

from . import PassError, register


def check_percent(percent: Sequence[float]) -> None:
    if len(percent) != 6:
        raise PassError(f"policy.percent needs 6 numbers [w_dev, w_host, cache_dev, cache_host, act_dev, "
                        f"act_host], got {list(percent)}")
    for name, a, b in (("weights", *percent[0:2]), ("cache", *percent[2:4]), ("activations", *percent[4:6])):
        if min(a, b) < 0 or a + b > 100:
            raise PassError(f"policy.percent for {name} is ({a}, {b}): each >= 0 and device + host <= 100")


def split(sizes: List[float], dev: float, host: float) -> List[str]:
    """Assign each tensor (in order) a tier by where its midpoint falls in the cumulative size."""
    total = float(sum(sizes)) or 1.0
    out, cum = [], 0.0
    for size in sizes:
        mid = 100.0 * (cum + size / 2) / total
        out.append("device" if mid < dev else "host" if mid < dev + host else "disk")
        cum += size
    return out


def per_stage(stage_of: List[int], assign) -> List[str]:
    """Tiers of every layer, each stage's layers split on their own: assign(layer indices) -> tiers."""
    out: List[str] = [""] * len(stage_of)
    for s in sorted(set(stage_of)):
        js = [j for j, t in enumerate(stage_of) if t == s]
        for j, tier in zip(js, assign(js)):
            out[j] = tier
    return out


@register("place_tensors", provides=("w_home", "kv_home", "act_home"))
def place_tensors(graph, cfg):
    p = cfg.policy
    check_percent(p.percent)
    spec, nb = graph.graph["spec"], graph.graph["num_batches"]
    stage_of = graph.graph.get("stage_of_layer") or [0] * len(spec.layers)
    w_home = per_stage(stage_of, lambda js: split([spec.layers[j].numel for j in js], p.percent[0], p.percent[1]))
    for j, tier in (p.weight_overrides or {}).items():
        if tier not in TIERS or not 0 <= int(j) < len(spec.layers):
            raise PassError(f"policy.weight_overrides {{{j}: {tier}}}: layer must be 0..{len(spec.layers) - 1} "
                            f"and tier one of {TIERS}")
        w_home[int(j)] = tier
    attn = [layer.index for layer in spec.layers if layer.kind == "attn"]
    kv, act = {}, {}
    for s in sorted(set(stage_of)):
        pairs = [(j, k) for j in attn if stage_of[j] == s for k in range(nb)]
        kv.update(zip(pairs, split([1] * len(pairs), p.percent[2], p.percent[3])))
        pairs = [(j, k) for j in range(len(spec.layers)) if stage_of[j] == s for k in range(nb)]
        act.update(zip(pairs, split([1] * len(pairs), p.percent[4], p.percent[5])))
    last = len(spec.layers) - 1
    for n in squares(graph):
        i, j, k = n
        a = graph.nodes[n]
        a["w_home"] = w_home[j]
        # token ids out of the head are a few bytes: they stay with the compute; so does an
        # activation the next stage receives (sent from the device)
        sent = j < last and stage_of[j] != stage_of[j + 1]
        a["act_home"] = "device" if a["kind"] == "head" or sent else act[(j, k)]
        if a["kind"] == "attn":
            a["kv_home"] = kv[(j, k)]
    return graph
