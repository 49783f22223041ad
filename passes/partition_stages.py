"""Pipeline stages: which process (rank) runs each layer.

requires: -    provides: stage (int) on squares when there are several stages;
graph.graph: num_stages, stage_layers (layers per stage), stage_of_layer, stage_budgets (bytes per tier).
Stages are contiguous runs of layers; the embedding is on the first stage and the head on the
last (as FlexGen's dist_flex_opt.py). parallel.stage_layers pins the split; otherwise the split
minimises the slowest stage's time (compute, plus the weight I/O its policy.percent implies at
the profile's rates) among the splits whose weights and cache, with room for the largest
workspace and activations of its layers, fit each stage's own budgets (when none does,
plan_memory refuses the plan naming the stage and the keys to change).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from graphgen.config import num_stages, stage_budgets

from . import PassError, register


@register("partition_stages", provides=("stage",))
def partition_stages(graph, cfg):
    n_layers, S = graph.graph["num_layers"], num_stages(cfg)
    if S < 1:
        raise PassError(f"parallel.stages={S}: use 1 or more")
    if S > n_layers:
        raise PassError(f"parallel.stages={S} is more than the model's {n_layers} layers (embedding, each "
                        f"attention and MLP, head): lower parallel.stages (or torchrun --nproc-per-node) to "
                        f"at most {n_layers}")
    budgets = stage_budgets(cfg)
    if cfg.parallel.stage_layers:
        counts = pinned(cfg.parallel.stage_layers, S, n_layers)
    elif S == 1:
        counts = [n_layers]
    else:  # within the budgets if a split fits them; else the fastest, and plan_memory names the stage over
        secs = layer_seconds(graph, cfg)
        counts = balanced(secs, layer_bytes(graph, cfg), budgets) or balanced(secs, None, budgets)
    stage_of = [s for s, c in enumerate(counts) for _ in range(c)]
    graph.graph.update(num_stages=S, stage_layers=list(counts), stage_of_layer=stage_of, stage_budgets=budgets)
    if S > 1:
        for n, a in graph.nodes(data=True):
            if "kind" in a:
                a["stage"] = stage_of[n[1]]
    return graph


def pinned(counts: Sequence[int], S: int, n_layers: int) -> List[int]:
    counts = [int(c) for c in counts]
    if len(counts) != S or sum(counts) != n_layers or min(counts) < 1:
        raise PassError(f"parallel.stage_layers={counts} must give {S} stages (parallel.stages) of at least one "
                        f"layer each, {n_layers} layers in all (embedding, each attention and MLP, head)")
    return counts


def layer_seconds(graph, cfg) -> List[float]:
    """Seconds of each layer over the block: compute at the profile's FLOP/s (decode no faster than
    streaming the weights), plus loading the share of its weights policy.percent puts off the device
    once per step. Without a profile, FLOPs and bytes at nominal rates: only the ratios matter here."""
    p, dt = cfg.hardware.profile or {}, cfg.model.dtype
    flops_p = p.get(f"device_flops_{dt}") or 1e11
    flops_d = p.get(f"device_flops_decode_{dt}") or flops_p
    mm_bw = p.get(f"device_mm_bw_{dt}") or 0.0
    same = p.get("device_is_host", 1.0 if cfg.hardware.device == "cpu" else 0.0)
    h2d = 0.0 if same else 1.0 / (p.get("h2d_bw") or 1e10)
    disk = 1.0 / (p.get("disk_read_bw") or 1e9)
    w_dev, w_host = cfg.policy.percent[0] / 100, cfg.policy.percent[1] / 100
    per_byte = w_host * h2d + (1 - w_dev - w_host) * (disk + h2d)
    out = [0.0] * graph.graph["num_layers"]
    for n, a in graph.nodes(data=True):
        if "kind" not in a:
            continue
        if a["step_kind"] == "prefill":
            t = a["flops"] / flops_p
        else:
            t = max(a["flops"] / flops_d, a["w_bytes"] / mm_bw if mm_bw else 0.0)
        if n[2] == 0:  # zig-zag loads a layer's off-device weights once per step, for all GPU batches
            t += a["w_bytes"] * per_byte
        out[n[1]] += t
    return out


def layer_bytes(graph, cfg) -> List[dict]:
    """Bytes each layer keeps on each tier for the whole block: its weights and the KV caches of its
    GPU batches, split by policy.percent; and on the device, while it computes ("transient"), its
    largest workspace beside the activations of every GPU batch in and out (plan_memory has the
    exact figure; a stage needs the largest transient of its layers, not their sum)."""
    pc, nb = cfg.policy.percent, graph.graph["num_batches"]
    out = [{"device": 0.0, "host": 0.0, "disk": 0.0, "transient": 0} for _ in range(graph.graph["num_layers"])]
    for n, a in graph.nodes(data=True):
        if "kind" in a:
            t = a["workspace"] + 2 * nb * a["act_bytes"]
            out[n[1]]["transient"] = max(out[n[1]]["transient"], t)
    for j, o in enumerate(out):
        a = graph.nodes[(0, j, 0)]
        w, kv = a["w_bytes"], a.get("kv_bytes", 0) * nb
        o.update(device=w * pc[0] / 100 + kv * pc[2] / 100, host=w * pc[1] / 100 + kv * pc[3] / 100,
                 disk=w * (100 - pc[0] - pc[1]) / 100 + kv * (100 - pc[2] - pc[3]) / 100)
    return out


def balanced(secs: List[float], nbytes: Optional[List[dict]], budgets: List[dict]) -> Optional[List[int]]:
    """Contiguous split minimising the slowest stage, each stage's bytes within its budgets (DP);
    None when no split fits (nbytes None: no budget check). Weights count dense here (compressed
    ones take less): plan_memory checks the compiled plan exactly."""
    L, S = len(secs), len(budgets)
    pre = [0.0]
    for t in secs:
        pre.append(pre[-1] + t)
    tiers = ("device", "host", "disk")
    pb = {t: [0.0] for t in tiers}
    for b in nbytes or []:
        for t in tiers:
            pb[t].append(pb[t][-1] + b[t])

    peak = {}  # (lo, hi) -> the largest transient of layers lo..hi-1

    def transient(lo, hi):
        if (lo, hi) not in peak:
            peak[lo, hi] = max(nbytes[hi - 1].get("transient", 0), transient(lo, hi - 1) if hi - 1 > lo else 0)
        return peak[lo, hi]

    def fits(s, lo, hi):
        if nbytes is None:
            return True
        return all(pb[t][hi] - pb[t][lo] + (transient(lo, hi) if t == "device" else 0) <= budgets[s][t]
                   for t in tiers)

    INF = float("inf")
    best = [[INF] * (L + 1) for _ in range(S + 1)]  # best[s][e]: first e layers on s stages
    cut = [[0] * (L + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for s in range(1, S + 1):
        for e in range(s, L - (S - s) + 1):
            for b in range(s - 1, e):
                if best[s - 1][b] == INF or not fits(s - 1, b, e):
                    continue
                v = max(best[s - 1][b], pre[e] - pre[b])
                if v < best[s][e]:
                    best[s][e], cut[s][e] = v, b
    if best[S][L] == INF:
        return None
    counts, e = [], L
    for s in range(S, 0, -1):
        b = cut[s][e]
        counts.append(e - b)
        e = b
    return counts[::-1]

