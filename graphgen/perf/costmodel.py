"""Cost model: predict a compiled graph's prefill, decode and total time on a hardware profile.

Each op gets a duration from the profile (keys in graphgen.perf.profile.PROFILE_KEYS):
- compute: matmul FLOPs / FLOP/s (decode: no faster than streaming the layer's weights at
  device_mm_bw when the profile has it); attention in prefill as FLOPs / bmm FLOP/s, in decode as
  cache bytes / the attention bandwidth where it runs (device, or host for delegated attention,
  with FlexGen's small-batch correction when the profile has c1..c3); a compressed cache is
  dequantised at dequant_bw; plus compute_overhead_s per square (kernel launches, dispatch);
- a load or store: bytes / the bandwidth of each link it crosses (disk then PCIe; free between
  device and host when they are the same memory, as on a CPU-only machine) + disk_latency_s per
  disk request; compressed weights move compressed and are dequantised on the device by the
  first square that uses them (w_dequant).
Overlap is the async executor's (executors/async_streams.py), from its own dependency plan:
three streams run their ops in schedule order; an op starts when its producers have finished;
a load also waits for the compute of the slot before its own, a compute for the stores STORE_LAG
slots back, a store for the loads issued up to its slot. A calibrated profile's
compute_io_contention stretches a compute op by that many seconds per second of disk I/O the
simulation has running beside it (I/O threads taking cores from compute on a small machine).
With executor=reference every op runs alone, one after the other. Wall time is split into prefill and decode as the executors split it.
Pipeline stages (passes/partition_stages.py): each stage has its own streams; a send takes
bytes / net_bw + net_latency_s on its stage's comm stream, and its receive ends no earlier than
the send; prefill ends when the last prefill square does, decode takes the rest.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

from ..costs import kv_slice_bytes
from ..streams import STREAM_OF, STREAMS, plan_streams, stream_of

_RANK = {"device": 0, "host": 1, "disk": 2}


@dataclass
class Prediction:
    prefill_s: float
    decode_s: float
    tokens: int  # generated tokens in the block
    prompt_tokens: int
    busy_s: Dict[str, float]  # per stream
    link_s: Dict[str, float]  # per link (src->dst), seconds of transfer
    link_bytes: Dict[str, int] = field(default_factory=dict)
    compute_parts: Dict[str, float] = field(default_factory=dict)  # matmul / attention / overhead seconds
    overlap: bool = True  # async streams (False: the reference executor, one op at a time)
    stages: List[Dict[str, float]] = field(default_factory=list)  # pipeline: busy seconds per stream, per stage

    @property
    def bubble_fraction(self) -> float:
        """Pipeline: the share of stages x run time that stages' compute streams sit idle."""
        if not self.stages or not self.total_s:
            return 0.0
        return 1.0 - sum(b.get("compute", 0.0) for b in self.stages) / (len(self.stages) * self.total_s)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def total_tok_s(self) -> float:
        return self.tokens / self.total_s if self.total_s else 0.0

    @property
    def bound_tok_s(self) -> float:
        """Throughput if the busiest stream (of the busiest stage) never waited: the I/O-or-compute bound."""
        busiest = max(max(b.values()) for b in self.stages) if self.stages else max(self.busy_s.values())
        return self.tokens / busiest if busiest else 0.0

    @property
    def bottleneck(self) -> str:
        """The busiest stream, and within it the busiest link or compute part."""
        stream = max(self.busy_s, key=self.busy_s.get)
        if stream == "compute":
            parts = {k: v for k, v in self.compute_parts.items() if v}
            return f"compute ({max(parts, key=parts.get)})" if parts else "compute"
        links = {k: v for k, v in self.link_s.items() if _stream_of_link(k) == stream and v}
        return f"{stream} ({max(links, key=links.get)})" if links else stream


def _stream_of_link(link: str) -> str:
    src, dst = link.split("->")
    if src.startswith("stage"):
        return "comm"
    return "store" if _RANK[dst] > _RANK[src] else "load"


class CostModel:
    """Durations of ops from a profile dict; `dtype` names the compute dtype's FLOP/s keys."""

    def __init__(self, profile: Mapping[str, float], dtype: str, device: str = "cpu"):
        self.p, self.dtype = dict(profile), dtype
        if not self.p:
            raise ValueError("hardware.profile is empty: use hardware=auto (measures this machine) "
                             "or a shipped profile such as hardware=t4-flexgen")
        self.same_memory = bool(self.p.get("device_is_host", 1.0 if device == "cpu" else 0.0))

    def rate(self, key: str, *fallbacks: str) -> float:
        for k in (key,) + fallbacks:
            if self.p.get(k):
                return float(self.p[k])
        have = self.dtypes()
        if key.endswith(self.dtype) and have and self.dtype not in have:  # a profile of another dtype
            raise ValueError(f"hardware.profile has no {key!r}: it prices compute in {' and '.join(have)} "
                             f"only; set model.dtype={have[0]} (model.dtype={self.dtype} now)")
        raise ValueError(f"hardware.profile has no {key!r} (nor {', '.join(fallbacks) or 'a fallback'}); "
                         f"re-measure with hardware=auto (python -m graphgen.perf.profile --refresh)")

    def dtypes(self) -> List[str]:
        """The compute dtypes the profile has matmul rates for."""
        return sorted(k[len("device_flops_"):] for k in self.p
                      if k.startswith("device_flops_") and not k.startswith("device_flops_decode_"))

    def mem_bw(self, where: str = "device") -> float:
        """Bytes/s a kernel streams from the memory it computes in: device_mem_bw on the device,
        host_mem_bw on the host (one memory on a CPU-only machine); 0 where the profile has none."""
        if where == "host" and not self.same_memory:
            return self.opt("host_mem_bw")
        return self.opt("device_mem_bw") or (self.opt("host_mem_bw") if self.same_memory else 0.0)

    def put(self, out: Dict[str, float], part: str, seconds: float, nbytes: float, where: str = "device") -> None:
        """out[part] = the slower of a kernel's arithmetic (`seconds`) and streaming `nbytes` through
        the memory where it runs; named '<part>, memory-bound' when the bytes are the slower."""
        bw = self.mem_bw(where)
        if bw and nbytes and nbytes / bw > seconds:
            out[f"{part}, memory-bound"] = nbytes / bw
        else:
            out[part] = seconds

    def opt(self, key: str, default: float = 0.0) -> float:
        """An optional refinement: its value, or `default` where the profile does not have it."""
        return float(self.p.get(key) or default)

    def disk_latency(self, write: bool = False) -> float:
        """Seconds per disk request; writes have their own where calibration fitted them (the
        cache's small slice writes go through the page cache, reads bypass it)."""
        if write and self.p.get("disk_write_latency_s") is not None:
            return float(self.p["disk_write_latency_s"])
        return self.opt("disk_latency_s")

    # --- compute ------------------------------------------------------------------------------
    def compute_parts(self, a: dict, attn_flops: float, kv_dense: int = 0, batch: int = 64,
                      hidden: int = 4096) -> Dict[str, float]:
        """Seconds of one square by part: matmul, attention (where it runs), dequant, overhead.
        kv_dense: dense bytes of the cache positions decode attention reads (prefix + new slice)."""
        dt, mm = self.dtype, a["flops"] - attn_flops
        extra = self.opt("attn_overhead_s") if a["kind"] == "attn" else 0.0
        out = {"overhead": self.opt("compute_overhead_s") + extra}
        if a.get("w_dequant") and self.p.get("dequant_bw"):  # first square of a run: dense working copy
            out["dequant"] = a["w_dequant"] / self.p["dequant_bw"]
        if a["step_kind"] == "prefill":
            # the head only reads the last position: one row per sequence, priced like decode; a
            # fitted profile also streams every matmul square's weights once (small prompts)
            self.put(out, "matmul", self.decode_matmul_s(mm, a) if a["kind"] == "head" else
                     mm / self.rate(f"device_flops_{dt}") + self.streamed_s(mm, a) + self.plain_prefill_s(mm, a),
                     self.weights_read(mm, a))
            if attn_flops:
                dense = kv_dense or a["kv_read"] + a["kv_write"]
                self.put(out, "attention", attn_flops / self.rate(f"device_bmm_flops_{dt}", f"device_flops_{dt}"),
                         dense)
            return out
        self.put(out, "matmul", self.decode_matmul_s(mm, a), self.weights_read(mm, a))
        if a["kind"] == "attn":
            where = "host" if a.get("attn_device") == "host" else "device"
            dense = kv_dense or a["kv_read"] + a["kv_write"]
            self.put(out, f"attention ({where})", dense / self.attention_bw(where, batch, hidden), dense, where)
            if a.get("kv_compressed") and self.p.get("dequant_bw"):
                out["dequant"] = out.get("dequant", 0.0) + dense / self.p["dequant_bw"]
            elif self.joins(a) and self.p.get(f"kv_join_bw_{self.dtype}"):
                out["cache join"] = dense / self.p[f"kv_join_bw_{self.dtype}"]
        return out

    @staticmethod
    def joins(a: dict) -> bool:
        """Does this decode attention square copy its cache into a scratch buffer first? A prefix
        loaded from another tier than the one attention runs in (kv_buf) is joined with the new
        slice into a head-major buffer (executors/attention.py AttentionGlue.joined); a cache at
        home where attention runs is read in place. (A compressed prefix is dequantised into that
        buffer instead: priced at dequant_bw.)"""
        return a.get("kv_buf") is not None and not a.get("kv_compressed")

    def compute_s(self, a: dict, attn_flops: float, kv_dense: int = 0, batch: int = 64,
                  hidden: int = 4096) -> float:
        return sum(self.compute_parts(a, attn_flops, kv_dense, batch, hidden).values())

    def decode_matmul_s(self, flops: float, a: dict) -> float:
        """One row per sequence: FLOPs at the decode shape's FLOP/s, and the weights streamed at
        device_mm_bw_<dtype>: the larger of the two (measured microbenchmarks), or their sum when the
        profile was fitted to traced runs in that form (graphgen.perf.calibrate: calibrated = 1)."""
        t = flops / self.rate(f"device_flops_decode_{self.dtype}", f"device_flops_{self.dtype}")
        bw = self.p.get(f"device_mm_bw_{self.dtype}")
        if bw and flops:
            w = a.get("w_work_bytes", a["w_bytes"]) / bw
            t = t + w if self.p.get("calibrated") else max(t, w)
        return t + self.reorder_s(flops, a)

    def plain_prefill_s(self, flops: float, a: dict) -> float:
        """A prefill matmul on weights that are not prepacked (see reorder_s) runs oneDNN's plain
        path, without the device tier's fused q/k/v and gate/up matrices: its FLOPs again at
        plain_flops_<dtype> (fitted by graphgen.perf.calibrate; absent: free)."""
        rate = self.p.get(f"plain_flops_{self.dtype}")
        return flops / rate if rate and self.plain(flops, a) else 0.0

    def plain(self, flops: float, a: dict) -> bool:
        """Does this CPU matmul run on dense weights loaded from the host or disk tier (not prepacked)?"""
        return bool(flops and self.same_memory and a.get("w_home", "device") != "device" and not a.get("w_compressed"))

    def reorder_s(self, flops: float, a: dict) -> float:
        """On a CPU, weights at home on the device are reordered once into oneDNN's blocked layout
        (executors/packed.py prepack); dense weights loaded from the host or disk tier are not, and
        each decode matmul on them pays a reorder: their bytes at plain_weight_bw_<dtype> (fitted by
        graphgen.perf.calibrate; absent: free). Measured on opt-1.3b at GPU batch 8: a decode mlp
        square took 2.65 ms with its weights on the host tier against 1.76 ms on the device tier."""
        bw = self.p.get(f"plain_weight_bw_{self.dtype}")
        return a["w_bytes"] / bw if bw and self.plain(flops, a) else 0.0

    @staticmethod
    def weights_read(flops: float, a: dict) -> float:
        """Bytes of weights a matmul part reads: the layer's (its dense working copy when compressed)."""
        return a.get("w_work_bytes", a["w_bytes"]) if flops else 0.0

    def streamed_s(self, flops: float, a: dict) -> float:
        """A fitted profile's weight-streaming term of a prefill matmul (absent otherwise)."""
        bw = self.p.get(f"device_mm_bw_{self.dtype}")
        if not (flops and bw and self.p.get("calibrated")):
            return 0.0
        return a.get("w_work_bytes", a["w_bytes"]) / bw

    def attention_bw(self, where: str, batch: int = 64, hidden: int = 4096) -> float:
        """Decode attention in cache bytes/s; on the host with FlexGen's fitted factor for small
        GPU batches and hidden sizes (cpu_attn_c1..c3, when the profile has them)."""
        if where != "host":
            return self.rate(f"device_attn_bw_{self.dtype}", "device_attn_bw")
        bw = self.rate(f"cpu_attn_bw_{self.dtype}", "cpu_attn_bw")
        c = [self.p.get(f"cpu_attn_c{i}") for i in (1, 2, 3)]
        if None in c:
            return bw
        x, y = max(0.0, math.log2(64 / batch)), max(0.0, math.log2(4096 / hidden))
        return bw * max(0.1, 1 + c[0] * x * y - c[1] * x - c[2] * y)

    # --- transfers ----------------------------------------------------------------------------
    def link_s(self, src: str, dst: str, nbytes: int, cache: bool = False) -> float:
        """Seconds to move nbytes from tier src to tier dst (disk goes through the host)."""
        if not nbytes or src == dst:
            return 0.0
        t = 0.0
        if "disk" in (src, dst):
            t += nbytes / self.disk_bw(src == "disk", cache) + self.disk_latency(write=src != "disk")
        if "device" in (src, dst) and not self.same_memory:  # PCIe
            t += nbytes / (self.rate("h2d_bw") if dst == "device" else
                           self.rate("d2h_cache_bw", "d2h_bw") if cache else self.rate("d2h_bw"))
        return t

    def net_s(self, nbytes: int) -> float:
        """A message between pipeline stages: the interconnect's latency + bytes / bandwidth."""
        if not self.p.get("net_bw"):
            raise ValueError("a pipeline (parallel.stages > 1) needs hardware.profile.net_bw, the bytes/s between "
                             "stages (and optionally net_latency_s): set them for your interconnect, e.g. "
                             "+hardware.profile.net_bw=1.25e9 for 10 Gbit/s (docs/distributed.md)")
        return nbytes / float(self.p["net_bw"]) + self.opt("net_latency_s")

    def disk_bw(self, read: bool, cache: bool = False) -> float:
        """Disk bytes/s of reads or writes; the KV cache's at its own rate where the profile has one."""
        if read:
            return self.rate("disk_read_cache_bw", "disk_read_bw") if cache else self.rate("disk_read_bw")
        return self.rate("disk_write_cache_bw", "disk_write_bw") if cache else self.rate("disk_write_bw")

    def io_s(self, b: dict) -> float:
        """A load or store op: its link (compressed weights move compressed; the square that uses
        them first dequantises them, see compute_parts). A copy within RAM run inline on the
        compute stream (CPU: passes/insert_io.py) costs its dispatch (inline_io_s, when calibrated)
        and, for a store, the slice it writes at host_memcpy_bw; a load there hands over the
        tensor it finds, copying nothing."""
        if b.get("stream") == "compute":
            copied = b["bytes"] if b["op"] == "store" and self.opt("host_memcpy_bw") else 0
            return self.opt("inline_io_s") + copied / self.opt("host_memcpy_bw", 1.0)
        return self.link_s(b["src"], b["dst"], b["bytes"], cache=b["tensor"][0] == "kv")


def attention_flops(graph, a: dict) -> float:
    return attention_flops_of(graph.graph["spec"], graph.graph["shape"], a)


def attention_flops_of(spec, sh, a: dict) -> float:
    """q.k and p.v of one attention square (the rest of its FLOPs are matmuls)."""
    if a["kind"] != "attn":
        return 0.0
    return 4.0 * sh.batch * spec.num_heads * a["s"] * a["ctx"] * spec.head_dim


def square_parts(graph, model: CostModel, a: dict) -> Dict[str, float]:
    """The compute parts of one square, with what the model needs from the graph."""

    spec, sh = graph.graph["spec"], graph.graph["shape"]
    dense = kv_slice_bytes(spec, sh, a["ctx"]) if a["kind"] == "attn" else 0
    return model.compute_parts(a, attention_flops(graph, a), dense, sh.batch, spec.hidden_size)


class _Costs:
    """Per-op stream and seconds, and the totals a prediction reports."""

    def __init__(self, graph, A, model: CostModel):
        self.stream: Dict = {}
        self.dur: Dict = {}
        self.parts: Dict[str, float] = defaultdict(float)
        self.link_t: Dict[str, float] = defaultdict(float)
        self.link_b: Dict[str, int] = defaultdict(int)
        self.disk = set()  # loads and stores that cross the disk link
        self.slowed: Dict = {}  # compute op -> seconds added by disk I/O beside it (overlapped_ends)
        memo: Dict[Tuple, Dict[str, float]] = {}  # squares of one (step, layer) cost the same
        for m in graph.graph["ops"]:
            b = A[m]
            op = b.get("op", "compute")
            if op == "compute":
                key = (m[0], m[1], b.get("attn_device"), b["flops"], b["w_bytes"])
                if key not in memo:
                    memo[key] = square_parts(graph, model, b)
                for part, t in memo[key].items():
                    self.parts[part] += t
                self.stream[m], self.dur[m] = "compute", sum(memo[key].values())
            elif op in STREAM_OF:  # a send occupies its stage's comm stream; its receive waits for it
                link = f"{b['src']}->{b['dst']}"
                self.stream[m], self.dur[m] = STREAM_OF[op], model.net_s(b["bytes"]) if op == "send" else 0.0
                if op == "send":
                    self.link_t[link] += self.dur[m]
                    self.link_b[link] += b["bytes"]
            else:
                link = f"{b['src']}->{b['dst']}"
                self.stream[m], self.dur[m] = stream_of(b), model.io_s(b)
                self.link_t[link] += self.dur[m]
                self.link_b[link] += b["bytes"]
                if "disk" in (b["src"], b["dst"]) and self.dur[m]:
                    self.disk.add(m)

    def busy(self) -> Dict[str, float]:
        out = dict.fromkeys(STREAMS, 0.0)
        for m, t in self.dur.items():
            out[self.stream[m]] += t
        out["compute"] += sum(self.slowed.values())
        if "comm" not in self.stream.values():
            del out["comm"]
        return out

    def stage_busy(self, A, n_stages: int) -> List[Dict[str, float]]:
        out = [dict.fromkeys(STREAMS, 0.0) for _ in range(n_stages)]
        for m, t in self.dur.items():
            out[A[m].get("stage", 0)][self.stream[m]] += t + self.slowed.get(m, 0.0)
        return out


def overlapped_ends(graph, ops: List, c: _Costs, contention: float = 0.0) -> Dict:
    """End time of every op under the async executor's rules (its own dependency plan). With
    `contention`, a compute op takes that many seconds longer per second of disk I/O already
    placed beside it (c.slowed records the extra seconds)."""

    A = graph.nodes
    by_stage: Dict[int, List] = defaultdict(list)  # pipeline stages: each its own streams
    for m in ops:
        by_stage[A[m].get("stage", 0)].append(m)
    waits = {}
    for stage_ops in by_stage.values():
        waits.update(plan_streams(graph, stage_ops).waits)
    ends: Dict[Tuple[int, str], List[float]] = defaultdict(list)
    disk: Dict[Tuple[int, str], List[Tuple[float, float]]] = defaultdict(list)  # per stream: in time order
    first: Dict[Tuple[int, str], int] = defaultdict(int)  # per stream: the first interval that may still overlap
    end = {}
    for m in ops:
        st, stream = A[m].get("stage", 0), c.stream[m]
        mine = ends[(st, stream)]
        start = mine[-1] if mine else 0.0
        for s, need in zip(STREAMS, waits[m]):
            if need:
                start = max(start, ends[(st, s)][need - 1])
        if stream == "comm" and m[0] == "recv":  # the message arrives when its send has gone
            start = max(start, end[("send",) + m[1:]])
        dur = c.dur[m]
        if stream == "compute" and contention and dur:
            beside = 0.0
            for s, iv in ((k, v) for k, v in disk.items() if k[0] == st):
                while first[s] < len(iv) and iv[first[s]][1] <= start:
                    first[s] += 1
                for a, b in iv[first[s]:]:
                    if a >= start + dur:
                        break
                    beside += min(start + dur, b) - max(start, a)
            if beside:
                c.slowed[m] = contention * beside
                dur += c.slowed[m]
        elif contention and m in c.disk:
            disk[(st, stream)].append((start, start + dur))
        mine.append(start + dur)
        end[m] = mine[-1]
    return end


def simulate(graph, model: CostModel, overlap: bool = True) -> Prediction:
    """'Run' the compiled schedule on the cost model; overlap=False: the reference executor."""
    A = dict(graph.nodes(data=True))
    ops = graph.graph["ops"]
    c = _Costs(graph, A, model)
    spent = {"prefill": 0.0, "decode": 0.0}
    n_stages = graph.graph.get("num_stages", 1)
    if overlap and n_stages > 1:  # stages run side by side: prefill until its last square, decode after
        end = overlapped_ends(graph, ops, c, model.opt("compute_io_contention"))
        spent["prefill"] = max((t for m, t in end.items() if A[A[m].get("square", m)]["step_kind"] == "prefill"),
                               default=0.0)
        spent["decode"] = max(end.values(), default=0.0) - spent["prefill"]
    elif overlap:  # as the async executor: wall time up to each compute end goes to its step kind
        end, prev, kind = overlapped_ends(graph, ops, c, model.opt("compute_io_contention")), 0.0, "prefill"
        if c.slowed:
            c.parts["disk I/O beside"] = sum(c.slowed.values())
        for m in ops:
            if c.stream[m] == "compute":  # a square, or a CPU copy within RAM (passes/insert_io.py)
                kind = A[A[m].get("square", m)]["step_kind"]
                spent[kind] += end[m] - prev
                prev = end[m]
        spent[kind] += max(end.values(), default=0.0) - prev  # the last stores
    else:  # as the reference executor: each op's own time goes to its square's step kind
        for m in ops:
            spent[A[A[m].get("square", m)]["step_kind"]] += c.dur[m]
    sh, nb = graph.graph["shape"], graph.graph["num_batches"]
    return Prediction(spent["prefill"], spent["decode"], sh.batch * nb * sh.gen_len,
                      sh.batch * nb * sh.prompt_len, c.busy(), dict(c.link_t), dict(c.link_b),
                      dict(c.parts), overlap, c.stage_busy(A, n_stages) if n_stages > 1 else [])
