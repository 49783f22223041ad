"""Cost model: predict a compiled graph's prefill, decode and total time on a hardware profile.

Each op gets a duration from the profile (keys in graphgen.hardware_profile.PROFILE_KEYS):
compute = matmul FLOPs / FLOP/s + attention (prefill: FLOPs / bmm FLOP/s; decode: cache bytes /
attention bandwidth where it runs); a load or store = bytes / the bandwidth of its link (free
between device and host when they are the same memory, as on a CPU-only machine).
Overlap follows the async executor: three streams (load, compute, store) run ops in schedule
order; a load issued at slot t starts once compute t-1 is done and its producers have finished,
compute waits for its loads, a store for its compute.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Mapping, Tuple

STREAMS = ("load", "compute", "store")


@dataclass
class Prediction:
    prefill_s: float
    decode_s: float
    tokens: int  # generated tokens in the block
    prompt_tokens: int
    busy_s: Dict[str, float]  # per stream
    link_s: Dict[str, float]  # per link (src->dst), seconds of transfer
    link_bytes: Dict[str, int] = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def total_tok_s(self) -> float:
        return self.tokens / self.total_s if self.total_s else 0.0

    @property
    def bound_tok_s(self) -> float:
        """Throughput if the busiest stream never waited: the I/O-or-compute bound."""
        return self.tokens / max(self.busy_s.values()) if max(self.busy_s.values()) else 0.0

    @property
    def bottleneck(self) -> str:
        stream = max(self.busy_s, key=self.busy_s.get)
        if stream == "compute" or not self.link_s:
            return stream
        links = {k: v for k, v in self.link_s.items() if _stream_of_link(k) == stream}
        return f"{stream} ({max(links, key=links.get)})" if links else stream


def _stream_of_link(link: str) -> str:
    src, dst = link.split("->")
    return "store" if _RANK[dst] > _RANK[src] else "load"


_RANK = {"device": 0, "host": 1, "disk": 2}


class CostModel:
    """Durations of ops from a profile dict; `dtype` names the compute dtype's FLOP/s keys."""

    def __init__(self, profile: Mapping[str, float], dtype: str, device: str = "cpu"):
        self.p, self.dtype = dict(profile), dtype
        self.same_memory = bool(self.p.get("device_is_host", 1.0 if device == "cpu" else 0.0))
        if not self.p:
            raise ValueError("hardware.profile is empty: use hardware=auto (measures this machine) "
                             "or a shipped profile such as hardware=t4-flexgen")

    def rate(self, key: str, *fallbacks: str) -> float:
        for k in (key,) + fallbacks:
            if self.p.get(k):
                return float(self.p[k])
        raise ValueError(f"hardware.profile has no {key!r} (nor {', '.join(fallbacks) or 'a fallback'}); "
                         f"re-measure with hardware=auto")

    def compute_s(self, a: dict, attn_flops: float) -> float:
        dt = self.dtype
        if a["step_kind"] == "prefill":
            mm = self.rate(f"device_flops_{dt}")
            t = (a["flops"] - attn_flops) / mm
            return t + attn_flops / self.rate(f"device_bmm_flops_{dt}", f"device_flops_{dt}")
        mm = self.rate(f"device_flops_decode_{dt}", f"device_flops_{dt}")
        t = (a["flops"] - attn_flops) / mm
        if a["kind"] == "attn":
            bw = self.rate("cpu_attn_bw") if a.get("attn_device") == "host" else self.rate("device_attn_bw")
            t += (a["kv_read"] + a["kv_write"]) / bw
        return t

    def link_s(self, src: str, dst: str, nbytes: int, cache: bool = False) -> float:
        t = 0.0
        if "disk" in (src, dst):
            t += nbytes / self.rate("disk_read_bw" if src == "disk" else
                                    ("disk_write_cache_bw" if cache else "disk_write_bw"), "disk_write_bw")
        if "device" in (src, dst) and src != dst and not self.same_memory:  # PCIe (disk goes via host)
            t += nbytes / (self.rate("h2d_bw") if dst == "device" else
                           self.rate("d2h_cache_bw", "d2h_bw") if cache else self.rate("d2h_bw"))
        return t


def attention_flops(graph, a: dict) -> float:
    if a["kind"] != "attn":
        return 0.0
    spec, sh = graph.graph["spec"], graph.graph["shape"]
    return 4.0 * sh.batch * spec.num_heads * a["s"] * a["ctx"] * spec.head_dim


def simulate(graph, model: CostModel) -> Prediction:
    """List-schedule the ops on three streams; slot durations split prefill from decode."""
    A = dict(graph.nodes(data=True))
    end: Dict[Tuple, float] = {}
    free = {s: 0.0 for s in STREAMS}
    compute_end_by_slot: Dict[int, float] = {}
    busy: Dict[str, float] = defaultdict(float)
    link_t: Dict[str, float] = defaultdict(float)
    link_b: Dict[str, int] = defaultdict(int)
    preds = graph.pred
    for m in graph.graph["ops"]:
        b = A[m]
        op = b.get("op", "compute")
        ready = max((end[u] for u in preds[m] if u in end), default=0.0)
        if op == "compute":
            dur, stream = model.compute_s(b, attention_flops(graph, b)), "compute"
        else:
            link = f"{b['src']}->{b['dst']}"
            dur = model.link_s(b["src"], b["dst"], b["bytes"], cache=b["tensor"][0] == "kv")
            stream = op
            link_t[link] += dur
            link_b[link] += b["bytes"]
            if op == "load":
                ready = max(ready, compute_end_by_slot.get(b["slot"] - 1, 0.0))
        start = max(free[stream], ready)
        end[m] = free[stream] = start + dur
        busy[stream] += dur
        if op == "compute":
            compute_end_by_slot[b["slot"]] = end[m]
    return _phases(graph, A, end, compute_end_by_slot, busy, link_t, link_b)


def _phases(graph, A, end, compute_end_by_slot, busy, link_t, link_b) -> Prediction:
    """Attribute each slot's wall time (compute t-1 end .. compute t end) to its square's phase."""
    total = max(end.values()) if end else 0.0
    phase = {A[m]["slot"]: A[m]["step_kind"] for m in graph.graph["ops"] if "kind" in A[m]}
    spent = {"prefill": 0.0, "decode": 0.0}
    prev = 0.0
    slots = sorted(compute_end_by_slot)
    for t in slots:
        spent[phase[t]] += compute_end_by_slot[t] - prev
        prev = compute_end_by_slot[t]
    if slots:
        spent[phase[slots[-1]]] += total - prev  # trailing stores
    sh, nb = graph.graph["shape"], graph.graph["num_batches"]
    return Prediction(spent["prefill"], spent["decode"], sh.batch * nb * sh.gen_len, sh.batch * nb * sh.prompt_len,
                      {s: busy.get(s, 0.0) for s in STREAMS}, dict(link_t), dict(link_b))
