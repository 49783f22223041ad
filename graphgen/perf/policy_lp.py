"""The linear program behind policy=auto (graphgen.perf.optimize), in the style of FlexGen's (Sheng et
al., ICML 2023, Sec. 5; FlexGen experimental/cost_model.py).

For fixed knobs (gpu_batch_size, num_gpu_batches, cpu_attention, compression) it minimises the
block's time over the nine fractions (weights, KV cache, activations x device / host / disk), by
the async executor's slots (one square each: its loads are for the next square and run beside it):
a layer's step is num_gpu_batches - 1 slots loading for its next GPU batch (cache prefix,
activation) and one loading for the next layer (its weights, its first cache prefix and
activation). A slot's time is linearised with one variable per (kind, phase, slot kind) bounded
below by each stream's seconds (stores: the new cache slice and the activation out), each over its
links at the profile's bandwidths, compute priced by graphgen.perf.costmodel with its CPU terms
(weights not prepacked, inline copies within RAM, the cache join); (with a calibrated
compute_io_contention) compute plus that share of the slot's disk I/O; whole layers placed off the
device, each loading all its weights beside one slot; and with one GPU batch, an activation homed
off the device going out and back between two squares. policy_tok_s evaluates the same bounds at a
given placement (graphgen.perf.simulate agrees with it within a few percent). Memory per tier:
the homes (weights, the KV cache at its full length prompt + gen, live activations) plus the
working buffers (two layers' weight copies, the loaded cache prefix, the largest workspace) from
graphgen.costs; on a GPU, host weights must also fit the pinned-memory limit.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy.optimize import linprog

from passes.compress import kv_nbytes, weight_nbytes

from ..build import layer_attrs
from ..compile import checkpoint_of, spec_for
from ..config import Config, parse_bytes, tier_budgets
from ..costs import Shape, dtype_of, kv_slice_bytes
from .costmodel import CostModel, attention_flops_of

FRACTIONS = ("wg", "wc", "wn", "cg", "cc", "cn", "hg", "hc", "hn")
PHASES = ("prefill", "decode")
COMPRESS = (4, 64)  # FlexGen's group-wise quantisation: 4 bits, groups of 64
TIE = 1e-3  # weight of the bytes-moved tie-break in the LP objective


@dataclass(frozen=True)
class Knobs:
    gbs: int
    ngb: int
    cpu_attention: bool
    compress: bool  # 4-bit weights and KV cache


class Lin(dict):
    """A linear expression: {variable: coefficient}, constant under None."""

    def __add__(self, other):
        out = Lin(self)
        for k, v in other.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def __mul__(self, c: float):
        return Lin({k: v * c for k, v in self.items()})

    __rmul__ = __mul__


def var(*names: str) -> Lin:
    return Lin({n: 1.0 for n in names})


def const(c: float) -> Lin:
    return Lin({None: float(c)})


# --- the problem: bytes, FLOPs and rates of one workload on one machine -----------------------

class Problem:
    """Everything the LPs of one (model, workload, hardware) share."""

    def __init__(self, cfg: Config, profile: Dict[str, float], spec=None):
        self.cfg = cfg
        self.spec = spec or spec_for(cfg, checkpoint_of(cfg))
        self.model = CostModel(profile, cfg.model.dtype, cfg.hardware.device)
        self.itemsize = dtype_of(cfg.model.dtype).itemsize
        self.budgets = tier_budgets(cfg.hardware)
        w, hw = cfg.workload, cfg.hardware
        self.S, self.n = w.prompt_len, w.gen_len
        self.cuda = hw.device.startswith("cuda")
        pinned = parse_bytes(hw.pinned_mem, "hardware.pinned_mem") if hw.pinned_mem else self.budgets["host"] // 2
        self.pinned = pinned if self.cuda and cfg.executor.pin_weight else None
        self.kinds = sorted({layer.kind for layer in self.spec.layers}, key=["embed", "attn", "mlp", "head"].index)
        self.count = {k: sum(layer.kind == k for layer in self.spec.layers) for k in self.kinds}
        self.rep = {k: next(layer for layer in self.spec.layers if layer.kind == k) for k in self.kinds}
        m = self.model
        same = m.same_memory
        self.h2d = 0.0 if same else 1 / m.rate("h2d_bw")
        self.d2h = 0.0 if same else 1 / m.rate("d2h_bw")
        self.d2h_kv = 0.0 if same else 1 / m.rate("d2h_cache_bw", "d2h_bw")
        self.same_memory = same
        self.dr, self.dr_kv = 1 / m.disk_bw(read=True), 1 / m.disk_bw(read=True, cache=True)
        self.dw, self.dw_kv = 1 / m.rate("disk_write_bw"), 1 / m.rate("disk_write_cache_bw", "disk_write_bw")
        self.dequant = 1 / profile["dequant_bw"] if profile.get("dequant_bw") else 0.0
        self.latency = m.disk_latency()  # per disk request
        self.wlatency = m.disk_latency(write=True)
        self._layers: Dict[Tuple[int, bool], Dict] = {}

    def shape(self, gbs: int) -> Shape:
        return Shape(gbs, self.S, self.n, self.itemsize)

    def layers(self, gbs: int, compress: bool) -> Dict[Tuple[str, str], dict]:
        """(kind, phase) -> the square attributes of a representative layer; decode at mid-generation
        (context prompt + gen/2, the mean over decode steps, as FlexGen's cost model takes it)."""
        key = (gbs, compress)
        if key not in self._layers:
            sh, out = self.shape(gbs), {}
            for phase, i in (("prefill", 0), ("decode", max(1, self.n // 2))):
                for k in self.kinds:
                    a = square_attrs(self.spec, self.rep[k], sh, i)
                    a["w_dense"] = a["w_bytes"]
                    a["act_in"] = a["act_bytes"] if k != "embed" else 0
                    if compress:
                        self._compress(a, sh)
                    out[(k, phase)] = a
            self._layers[key] = out
        return self._layers[key]

    def _compress(self, a: dict, sh: Shape) -> None:
        comp = (COMPRESS[0], COMPRESS[1], -1)
        layer = self.rep[a["kind"]]
        a["w_bytes"], a["w_work_bytes"] = weight_nbytes(layer, sh.itemsize, comp), a["w_bytes"]
        if a["kind"] == "attn":
            past = a["ctx"] - a["s"]
            a["kv_bytes"] = kv_nbytes(self.spec, sh, sh.max_len, comp)
            a["kv_read"], a["kv_write"] = kv_nbytes(self.spec, sh, past, comp), kv_nbytes(self.spec, sh, a["s"], comp)
            a["kv_compressed"] = comp


def square_attrs(spec, layer, sh: Shape, i: int) -> dict:
    """The attributes build.layer_attrs gives square (i, layer), for one layer only."""
    return layer_attrs(_OneLayer(spec, layer), sh, i)[0]


class _OneLayer:
    """A view of a spec with a single layer, so layer_attrs computes just that one."""

    def __init__(self, spec, layer):
        self._spec, self.layers = spec, [layer]

    def __getattr__(self, name):
        return getattr(self._spec, name)


# --- one LP -----------------------------------------------------------------------------------

NEXT = {"embed": "attn", "attn": "mlp", "mlp": "attn", "head": "embed"}  # whose weights load during a layer


def stream_times(P: Problem, L: Dict, kn: Knobs, kind: str, phase: str) -> Dict[str, Tuple[Lin, Lin, Lin]]:
    """Seconds of one slot (one square) of a layer of `kind`, per stream: (load, compute, store), for
    its two kinds of slot. The async executor issues a slot's loads for the next square and runs them
    beside that slot's compute only (graphgen/streams.py: a load waits for the compute of the slot
    before its own), so a layer's time per step is (ngb - 1) 'own' slots, whose loads are for the
    layer's next GPU batch (its cache prefix and activation), plus one 'next' slot, whose loads are
    for the next layer's first square (its weights, cache prefix and activation). Compute and stores
    are the layer's over all GPU batches, spread evenly over its slots."""
    a, nb = L[(kind, phase)], kn.ngb
    nk = NEXT[kind] if NEXT[kind] in P.kinds else kind
    nxt = L[(nk, phase)]
    zigzag = P.cfg.schedule.name == "zigzag"
    w_loads = 1 if zigzag else nb  # zig-zag: one weight load per layer and step
    lat = P.latency  # a fraction on disk = that share of the ops go to disk
    host_attn = kn.cpu_attention and phase == "decode" and kind == "attn"
    dev_attn, cpu_attn = _attention(P, a, kn)
    compute = const(nb * (dev_attn["base"])) + (var("cg") + (var("cc", "cn") * (0.0 if host_attn else 1.0))) * (
        nb * dev_attn["attn"]) + var("cc", "cn") * (nb * cpu_attn["attn"] if host_attn else 0.0)
    if kn.compress:  # the layer's first square dequantises its weights into the working copy
        compute = compute + const(w_loads * a["w_dense"] * P.dequant)
    else:  # CPU: weights loaded from the host or disk tier are not prepacked (CostModel.reorder_s)
        compute = compute + var("wc", "wn") * (nb * _plain_s(P, a, kn))
    if kind == "attn" and phase == "decode" and not kn.compress:  # a loaded prefix is joined first
        compute = compute + (var("cn") + var("cc") * (0.0 if host_attn else 1.0)) * (nb * _join_s(P, a, kn))
    compute = compute + _inline(P, a, kn, kind, phase, w_loads, host_attn)
    store = Lin()
    if kind == "attn":
        wr = nb * a["kv_write"]
        d2h = 0.0 if host_attn else P.d2h_kv
        store = var("cc") * (wr * d2h) + var("cn") * (wr * (d2h + P.dw_kv) + nb * P.wlatency)
    if kind != "head":
        out = nb * a["act_bytes"]
        store = store + var("hc") * (out * P.d2h) + var("hn") * (out * (P.d2h + P.dw) + nb * P.wlatency)
    share = 1.0  # attention layers' cache prefixes per layer that carries them (attention follows it)
    if nk == "attn" and kind != "attn":
        share = P.count["attn"] / sum(P.count[k] for k in P.kinds if NEXT[k] == "attn")
    w = nxt["w_bytes"]
    after = _square_loads(P, nxt, kn, phase, share) + var("wc") * (w * P.h2d) + var("wn") * (
        w * (P.dr + P.h2d) + lat)
    # zig-zag: the layer's next GPU batch follows; otherwise (row by row) every square is followed by the
    # next layer's, whose weights it loads again
    own = _square_loads(P, a, kn, phase) if zigzag else after
    return {"own": (own, compute * (1 / nb), store * (1 / nb)), "next": (after, compute * (1 / nb), store * (1 / nb))}


def _square_loads(P: Problem, a: dict, kn: Knobs, phase: str, kv_share: float = 1.0) -> Lin:
    """The loads one square of layer `a` needs: its activation in from its home and, in decode, the
    cache prefix its attention reads (kv_share of it: see stream_times)."""
    load, lat = Lin(), P.latency
    if a["kind"] != "embed":
        load = var("hc") * (a["act_in"] * P.h2d) + var("hn") * (a["act_in"] * (P.dr + P.h2d) + lat)
    if a["kind"] == "attn" and phase == "decode":
        rd, cpu = kv_share * a["kv_read"], kn.cpu_attention
        load = load + var("cn") * (rd * (P.dr_kv + (0.0 if cpu else P.h2d)) + kv_share * lat) + var("cc") * (
            0.0 if cpu else rd * P.h2d)
    return load


def _attention(P: Problem, a: dict, kn: Knobs) -> Tuple[Dict[str, float], Dict[str, float]]:
    """One square's compute seconds: 'base' (matmul, overhead, prefill attention, dequant) and
    'attn' (decode attention) when attention runs on the device, and on the host."""
    sh, out = P.shape(kn.gbs), []
    dense = kv_slice_bytes(P.spec, sh, a["ctx"]) if a["kind"] == "attn" else 0
    for where in ("device", "host"):
        parts = P.model.compute_parts(dict(a, attn_device=where), attention_flops_of(P.spec, sh, a), dense,
                                      kn.gbs, P.spec.hidden_size)
        attn = sum(v for k, v in parts.items() if k.startswith("attention ("))
        out.append({"base": sum(parts.values()) - attn, "attn": attn})
    return out[0], out[1]


def _plain_s(P: Problem, a: dict, kn: Knobs) -> float:
    """Seconds one square's matmuls pay beyond the prepacked ones when its dense weights come from
    the host or disk tier (CPU: CostModel.reorder_s in decode, plain_prefill_s in prefill)."""
    if not a["flops"]:
        return 0.0
    attn = attention_flops_of(P.spec, P.shape(kn.gbs), a)
    host, dev = (P.model.compute_parts(dict(a, w_home=home), attn) for home in ("host", "device"))
    return sum(host.values()) - sum(dev.values())


def _join_s(P: Problem, a: dict, kn: Knobs) -> float:
    """Seconds a decode attention square copies a loaded prefix into its scratch (CostModel.joins)."""
    rate = P.model.opt(f"kv_join_bw_{P.model.dtype}")
    return kv_slice_bytes(P.spec, P.shape(kn.gbs), a["ctx"]) / rate if rate else 0.0


def _inline(P: Problem, a: dict, kn: Knobs, kind: str, phase: str, w_loads: int, host_attn: bool) -> Lin:
    """CPU: loads and stores within RAM run inline on the compute stream (passes/insert_io.py), each
    at CostModel.io_s: inline_io_s, plus for a store the bytes it writes at host_memcpy_bw. Per layer
    and step: the layer's weight loads from the host tier; the cache slice every attention square
    stores where it is not on disk, and the prefix it loads from the host tier to attention on the
    device; the activation loaded in from, and stored out to, the host tier."""
    if not P.same_memory:
        return Lin()
    bw = P.model.opt("host_memcpy_bw")
    op, per_byte = P.model.opt("inline_io_s"), 1 / bw if bw else 0.0
    if not (op or per_byte):
        return Lin()
    nb = kn.ngb
    out = var("wc") * (w_loads * op)
    if kind == "attn":
        out = out + var("cg", "cc") * (nb * (op + a["kv_write"] * per_byte))
        if phase == "decode" and not host_attn:
            out = out + var("cc") * (nb * op)
    if kind != "embed":
        out = out + var("hc") * (nb * op)
    if kind != "head":
        out = out + var("hc") * (nb * (op + a["act_bytes"] * per_byte))
    return out


def memory_rows(P: Problem, L: Dict, kn: Knobs) -> Dict[str, Lin]:
    """Bytes at the peak of each tier, linear in the fractions (homes + working buffers)."""
    nb, sh = kn.ngb, P.shape(kn.gbs)
    W = sum(L[(layer.kind, "prefill")]["w_bytes"] for layer in P.spec.layers)
    attn = [v for (k, ph), v in L.items() if k == "attn"]
    KV = P.count.get("attn", 0) * nb * (attn[0]["kv_bytes"] if attn else 0)
    act = max(v["act_bytes"] for v in L.values())
    acts = (nb + 1) * act  # a layer's outputs for every GPU batch wait for the next layer
    w_work = max(v.get("w_work_bytes", v["w_bytes"]) for v in L.values())
    work = max(v["workspace"] for v in L.values()) + 3 * act
    kv_last = _kv_read_at_end(P, sh, kn)
    kv_new = max((v["kv_write"] for v in attn), default=0)
    host_attn = 1.0 if kn.cpu_attention else 0.0
    dev = var("wg") * W + var("cg") * KV + var("hg") * acts + const(work + kv_new)
    dev = dev + (const(2 * w_work) if kn.compress else (const(1.0) + var("wg") * -1.0) * (2 * w_work))
    dev = dev + var("cc", "cn") * ((1 - host_attn) * 2 * kv_last)
    host = var("wc") * W + var("cc") * KV + var("hc") * acts + var("cn") * (host_attn * 2 * kv_last)
    host = host + const(host_attn * nb * kv_new)
    disk = var("wn") * W + var("cn") * KV + var("hn") * acts
    rows = {"device": dev, "host": host, "disk": disk}
    if P.pinned is not None:
        rows["pinned"] = var("wc") * W
    return rows


def _kv_read_at_end(P: Problem, sh: Shape, kn: Knobs) -> int:
    """The largest cache prefix a decode step reads (the last step), per GPU batch."""
    if kn.compress:
        return kv_nbytes(P.spec, sh, sh.max_len - 1, (COMPRESS[0], COMPRESS[1], -1))
    return kv_slice_bytes(P.spec, sh, sh.max_len - 1)


def solve_lp(P: Problem, kn: Knobs, budgets: Dict[str, float]) -> Optional[Tuple[List[float], float]]:
    """(percent, LP throughput in tok/s) of the best placement for these knobs, None if none fits."""
    L = P.layers(kn.gbs, kn.compress)
    tvars = [f"{t}_{k}_{ph}" for t in SLOT_VAR.values() for k in P.kinds for ph in PHASES]
    names = list(FRACTIONS) + tvars
    idx = {v: i for i, v in enumerate(names)}
    A_ub, b_ub = [], []

    def le(expr: Lin, bound: float) -> None:  # expr <= bound
        row = np.zeros(len(names))
        for k, v in expr.items():
            if k is not None:
                row[idx[k]] += v
        A_ub.append(row)
        b_ub.append(bound - expr.get(None, 0.0))

    c = np.zeros(len(names))
    moves = _moves_view(P)
    for k in P.kinds:
        for ph in PHASES:
            weight = P.count[k] * (1 if ph == "prefill" else P.n - 1)
            bounds, moved = layer_bounds(P, L, kn, k, ph), stream_times(moves, L, kn, k, ph)
            for slot, count in _slots(kn):
                for expr in bounds[slot]:
                    le(expr + var(f"{SLOT_VAR[slot]}_{k}_{ph}") * -1.0, 0.0)
                load, _, store = moved[slot]  # one memory: moves priced for the tie-break only
                for v, coef in (load + store).items():  # tie-break: of equally fast placements, the one
                    if v is not None:                    # that moves the fewest bytes (the LP is degenerate)
                        c[idx[v]] += TIE * weight * count * coef
    for tier, expr in memory_rows(P, L, kn).items():
        le(expr, budgets["host" if tier == "pinned" else tier] if tier != "pinned" else P.pinned)
    A_eq = np.zeros((3, len(names)))
    for r, group in enumerate((FRACTIONS[0:3], FRACTIONS[3:6], FRACTIONS[6:9])):
        A_eq[r, [idx[g] for g in group]] = 1.0
    for k in P.kinds:
        for ph in PHASES:
            for slot, count in _slots(kn):
                c[idx[f"{SLOT_VAR[slot]}_{k}_{ph}"]] = P.count[k] * (1 if ph == "prefill" else P.n - 1) * count
    res = linprog(c, A_ub=np.array(A_ub), b_ub=np.array(b_ub), A_eq=A_eq, b_eq=np.ones(3),
                  bounds=[(0, 1)] * len(FRACTIONS) + [(0, None)] * len(tvars), method="highs")
    if res.status != 0:
        return None
    x = dict(zip(names, res.x))
    block_s = sum(x[f"{SLOT_VAR[slot]}_{k}_{ph}"] * count * P.count[k] * (1 if ph == "prefill" else P.n - 1)
                  for k in P.kinds for ph in PHASES for slot, count in _slots(kn))
    return _percent(x), tok_s(P, kn, block_s)


SLOT_VAR = {"next": "T", "own": "U"}  # LP variables: a layer's slot time, by slot kind (stream_times)


def _slots(kn: Knobs) -> List[Tuple[str, int]]:
    """(slot kind, slots of a layer per step): one 'next' slot, ngb - 1 'own' ones."""
    return [("next", 1)] + ([("own", kn.ngb - 1)] if kn.ngb > 1 else [])


def layer_bounds(P: Problem, L: Dict, kn: Knobs, kind: str, phase: str) -> Dict[str, List[Lin]]:
    """Per slot kind (stream_times), the lower bounds of its time: each stream's seconds, and (with a
    calibrated compute_io_contention) compute slowed by the disk I/O beside it (at most all of it)."""
    kappa, out = P.model.opt("compute_io_contention"), {}
    disk = stream_times(_disk_view(P), L, kn, kind, phase) if kappa else {}
    for slot, (load, compute, store) in stream_times(P, L, kn, kind, phase).items():
        out[slot] = [load, compute, store]
        if kappa:
            load_d, _, store_d = disk[slot]
            out[slot].append(compute + (load_d + store_d) * kappa)
    if kn.ngb == 1 and kind != "head":  # the next square reads this one's output: no slot to hide its trip in
        out["next"].append(out["next"][1] + _act_trip(P, L, kn, kind, phase))
    for slot in ("next",) if P.cfg.schedule.name == "zigzag" else ("next", "own"):
        if slot in out:
            out[slot].append(_whole_layers(P, L, kind, phase, out[slot][1], kappa))
    return out


def _whole_layers(P: Problem, L: Dict, kind: str, phase: str, compute: Lin, kappa: float) -> Lin:
    """graphgen places whole layers (passes/place_tensors.py), not a share of each: with a fraction wc
    of the weights on the host, that fraction of the layers loads all its weights, each load beside
    one slot's compute (of a layer placed alike: the tiers hold runs of layers), and where the load
    takes longer the slot waits for it; from disk likewise, the compute beside the read slowed by
    compute_io_contention. Averaged over the layers, with C0 a lower bound of the slot's compute (its
    constant part and the least term of each of the cache's and the activations' fractions, which sum
    to 1) and such a layer's own weight terms on top: C0 + wc (max(load, C0 + its wc term) - C0) + wn
    (...), linear and never above the slot's true time."""
    nk = NEXT[kind] if NEXT[kind] in P.kinds else kind
    c0 = compute.get(None, 0.0) + sum(min(compute.get(v, 0.0) for v in g) for g in (FRACTIONS[3:6], FRACTIONS[6:9]))
    w = L[(nk, phase)]["w_bytes"]
    c_host, c_disk = c0 + compute.get("wc", 0.0), c0 + compute.get("wn", 0.0)
    host = max(w * P.h2d, c_host)
    read = w * P.dr + P.latency
    disk = max(read + w * P.h2d, c_disk + kappa * min(read, c_disk))
    return const(c0) + var("wc") * (host - c0) + var("wn") * (disk - c0)


def _act_trip(P: Problem, L: Dict, kn: Knobs, kind: str, phase: str) -> Lin:
    """With one GPU batch the next square consumes this square's output activation right away: homed
    off the device, it is stored and loaded back between the two computes (a load never goes before
    its producer's store), one after the other (compute + this time)."""
    nk = NEXT[kind] if NEXT[kind] in P.kinds else kind
    out, inp = L[(kind, phase)]["act_bytes"], L[(nk, phase)]["act_in"]
    return var("hc") * (out * P.d2h + inp * P.h2d) + var("hn") * (
        out * (P.d2h + P.dw) + P.wlatency + inp * (P.dr + P.h2d) + P.latency)


def policy_tok_s(P: Problem, kn: Knobs, percent: List[float]) -> float:
    """The LP's throughput for one given placement (FlexGen's six percents; the rest on disk): what
    the LP predicts for a policy it did not choose, to compare with the simulator's."""
    x = {}
    for (dev, host, disk), i in ((("wg", "wc", "wn"), 0), (("cg", "cc", "cn"), 2), (("hg", "hc", "hn"), 4)):
        x[dev], x[host] = percent[i] / 100, percent[i + 1] / 100
        x[disk] = max(0.0, 1.0 - x[dev] - x[host])
    value = lambda e: sum(v * (x[k] if k is not None else 1.0) for k, v in e.items())  # noqa: E731
    L = P.layers(kn.gbs, kn.compress)
    block_s = 0.0
    for k in P.kinds:
        for ph in PHASES:
            bounds = layer_bounds(P, L, kn, k, ph)
            block_s += P.count[k] * (1 if ph == "prefill" else P.n - 1) * sum(
                count * max(value(e) for e in bounds[slot]) for slot, count in _slots(kn))
    return tok_s(P, kn, block_s)


def _moves_view(P: Problem) -> Problem:
    """P for the tie-break: where device and host are one memory (a CPU-only machine) a move
    between them costs no time in the model, but it is still an op and a hand-off between streams
    that gains nothing, so the tie-break prices it at memcpy speed (the difference measured here,
    activations homed on the host vs the device, was within the machine's +-12% noise)."""
    if not P.same_memory:
        return P
    return _moves_at(P, 1 / P.model.rate("host_memcpy_bw"))


def _disk_view(P: Problem) -> Problem:
    """P with only the disk's part of each link priced: a stream's disk I/O seconds."""
    return _moves_at(P, 0.0)


def _moves_at(P: Problem, seconds_per_byte: float) -> Problem:
    """A copy of P whose device <-> host moves cost `seconds_per_byte`."""
    view = copy.copy(P)
    view.h2d = view.d2h = view.d2h_kv = seconds_per_byte
    return view


def _percent(x: Dict[str, float]) -> List[float]:
    """Fractions -> FlexGen's six percents, 0.1% steps, never more than 100 per tensor kind."""
    out = []
    for dev, host in (("wg", "wc"), ("cg", "cc"), ("hg", "hc")):
        d = math.floor(1000 * max(0.0, x[dev]) + 1e-6) / 10
        h = math.floor(1000 * max(0.0, x[host]) + 1e-6) / 10
        d, h = (d, h) if 1.0 - x[dev] - x[host] > 1e-4 else (d, round(100 - d, 1))
        out += [d, min(h, round(100 - d, 1))]
    return out


def tok_s(P: Problem, kn: Knobs, block_s: float) -> float:
    """Generated tokens per second; with workload.num_prompts the last block's padding counts."""
    bls, N = kn.gbs * kn.ngb, P.cfg.workload.num_prompts
    if not block_s:
        return 0.0
    if N:
        return float(N * P.n / (math.ceil(N / bls) * block_s))
    return float(bls * P.n / block_s)
