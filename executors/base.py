"""Interpreter over the compiled schedule (graph.graph["ops"]): load / compute / store.

The executor API every runtime implements:
    ex = Executor(spec, weights, cfg)      # tiers, budgets, offload dir
    tokens = ex.run_block(graph, inputs)   # [num_batches, B, gen_len] new token ids
    ex.stats                               # timings, bytes moved, peaks of the last block
    ex.close()                             # frees tiers, removes offload files
Subclasses decide *when* ops run (reference: one by one; async: overlapped streams);
what each op does lives here, so results cannot differ between them. The jobs beside the
interpreter are mixed in from their own modules: weights (executors/weights.py), KV cache
lifetime (kv_cache.py), the output head's sampling and scoring (heads.py), attention
(attention.py).
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from graphgen.config import Config, tier_budgets
from graphgen.costs import dtype_of
from graphgen.models.base import ModelSpec, in_row_chunks, positions_from_mask
from graphgen.models.weights import WeightSource
from graphgen.sampling import Sampling

from . import compressed as cq
from . import attention, memory, packed
from .disk import DiskTier
from .disk_io import ALIGN, CHUNK
from .heads import Heads
from .kv_cache import CacheLifetime
from .tiers import Tier
from .quant import temp_nbytes
from .trace import Trace
from .weights import WeightPlacement


@dataclass
class BlockInputs:
    input_ids: torch.Tensor  # [nb, B, S] left-padded
    attention_mask: torch.Tensor  # [nb, B, S]
    sampling: Sampling = field(default_factory=Sampling)
    block: int = 0  # index of this block in the job (seeds sampling)
    row_seeds: Optional[torch.Tensor] = None  # [nb, B]: one seed per sequence, independent of its block
    return_logprobs: bool = False  # record log p(chosen token) per step
    score_targets: Optional[torch.Tensor] = None  # [nb, B, S]: next token at each position to score, -1: not


@dataclass
class BlockState:
    inputs: BlockInputs
    mask: torch.Tensor  # [nb, B, S + gen] on the device: prompt mask, then ones
    tokens: List[List[torch.Tensor]]  # [k][i] -> [B] ids
    logprobs: List[List[torch.Tensor]] = field(default_factory=list)  # [k][i] -> [B] float32
    scores: Dict[int, tuple] = field(default_factory=dict)  # k -> (log p [B, S] float32, is greedy [B, S])


class Executor(WeightPlacement, CacheLifetime, Heads):
    name = "base"

    def __init__(self, spec: ModelSpec, weights: WeightSource, cfg: Config):
        self.spec, self.source, self.cfg = spec, weights, cfg
        self.device = compute_device(cfg.hardware.device)
        self.dtype = dtype_of(cfg.model.dtype)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("model.dtype=float16 on the CPU is hundreds of times slower than bfloat16: "
                             "use model.dtype=bfloat16 or float32")
        if self.device.type == "cpu" and cfg.executor.keep_freed_memory:
            memory.keep_freed_memory()
        self.rss_base = memory.rss()  # the process before any weights: what the plan does not count
        b, ex = tier_budgets(cfg.hardware), cfg.executor
        self.tiers: Dict[str, Tier] = {"device": Tier("device", b["device"], self.device),
                                       "host": Tier("host", b["host"], torch.device("cpu")),
                                       "disk": DiskTier(b["disk"], cfg.hardware.offload_dir, ex.io_threads,
                                                        ex.direct_io)}
        self.w_homes: Optional[List[str]] = None
        self.w_comps: Optional[List] = None  # per layer: (w_compressed, w_packed) of the graph when placed
        # CPU: compressed layers computed on by packed kernels, never dequantised (executors/packed.py)
        self.packed_ok = self.device.type == "cpu" and cfg.executor.packed_weights
        self.packed_layers: set = set()
        self._wrapped: Dict[int, tuple] = {}  # layer -> (its stored parts, wrapped): see wrapped()
        # CPU: dequantised weights reuse freed buffers (at most one layer's worth kept free)
        self.work = cq.WorkBuffers(max(layer.numel for layer in spec.layers) * self.dtype.itemsize, self.device) \
            if self.device.type == "cpu" else None
        self.trace = Trace() if cfg.executor.trace else None
        self.keep_cache = False  # chat sessions keep the KV cache between blocks (turns)
        self.on_compute: Optional[Callable] = None  # called with each square after it ran (progress bars)
        self.stats: Dict = {}

    # --- setup ------------------------------------------------------------------
    def runs_layer(self, graph, j: int) -> bool:
        """Whether this process runs layer j (a pipeline stage runs only its own: executors/pipeline.py)."""
        return True

    def homes(self, graph) -> List[Optional[str]]:
        """Each layer's weight home; None for layers this process does not run."""
        return [graph.nodes[(0, j, 0)]["w_home"] if self.runs_layer(graph, j) else None
                for j in range(graph.graph["num_layers"])]

    def planned_peaks(self, graph) -> Dict[str, int]:
        """The memory plan's peaks per tier for what this process runs."""
        return graph.graph.get("peak_bytes", {})

    # --- running ------------------------------------------------------------------
    def run_block(self, graph, inputs: BlockInputs) -> torch.Tensor:
        """Run one compiled block; returns new tokens [num_batches, B, gen_len]."""
        check_runnable(graph, self.cfg.pipeline)
        self.check_disk(graph)
        with memory.PeakMemory(self.device) as mem:
            tokens = self._run_block(graph, inputs)
        self.stats["measured"] = dict(mem.result(), rss_start=self.rss_base,
                                      overhead=self.stated_overhead(graph))
        return tokens

    def stated_overhead(self, graph) -> int:
        """What a run may use beyond its plan (see executors/memory.py): weight placement, I/O staging."""
        biggest = max(w.numel for layer in self.spec.layers for w in layer.weights)
        extra = biggest * (8 + self.dtype.itemsize)  # dummy weights: randn and its scaled copy in float32
        sh = graph.graph["shape"]  # the attention scratch, kept across squares: [2, B, nkv, S_max, d]
        extra += 2 * sh.batch * self.spec.kv_dim * sh.max_len * self.dtype.itemsize
        extra += attention.TEMP_BYTES  # float32 K/V of a decode attention chunk
        if self.cfg.policy.compress_weight.bits or self.cfg.policy.compress_cache.bits:
            extra += temp_nbytes(self.device.type)  # quantise / dequantise scratch, one block at a time
        if self.cfg.policy.compress_weight.bits and self.work is not None:
            extra += self.work.cap  # free dequantisation buffers kept for reuse
        if self.planned_peaks(graph).get("disk", 0):
            extra += self.cfg.executor.io_threads * CHUNK
        if self.device.type == "cpu":  # free buffers of weights read from disk, `keep` per layer size
            first = [graph.nodes[(0, j, 0)] for j in range(graph.graph["num_layers"])]  # as place_weights
            sizes = {a["w_bytes"] for j, a in enumerate(first) if a["w_home"] == "disk" and a["w_bytes"]
                     and self.runs_layer(graph, j)}
            extra += self.tiers["disk"].buffers.keep * sum(n + 2 * ALIGN for n in sizes)
        return memory.stated_overhead(planned_ram(self.planned_peaks(graph), self.device), extra)

    def _run_block(self, graph, inputs: BlockInputs) -> torch.Tensor:
        self.place_weights(graph)
        for tier in self.tiers.values():
            tier.peak = tier.used
        nb, B, S = inputs.input_ids.shape
        gen = graph.graph["num_tokens"]
        mask = torch.cat([inputs.attention_mask, torch.ones(nb, B, gen, dtype=torch.long)], -1)
        self.state = BlockState(inputs, mask.to(self.device), [[] for _ in range(nb)], [[] for _ in range(nb)])
        self.A = dict(graph.nodes(data=True))
        self.max_len = graph.graph["shape"].max_len
        self.attn = attention.AttentionGlue(self.spec, self.max_len)
        self._pos: Dict = {}  # GPU batch -> ((L, s), positions, mask of its current step), shared by its layers
        self.alloc_caches(graph)
        if self.device.type == "cpu":  # weights read from disk reuse freed buffers (stated_overhead)
            dev = self.tiers["device"]
            self.tiers["disk"].buffers.room = lambda: dev.budget - dev.used
        self.stats = {"time": defaultdict(float), "bytes": defaultdict(int)}
        try:
            self.run_ops(graph.graph["ops"])
        finally:
            self.free_block(graph)
        self.stats["peak_bytes"] = {name: t.peak for name, t in self.tiers.items()}
        lp = self.state.logprobs
        self.logprobs = torch.stack([torch.stack(t, -1) for t in lp]) if inputs.return_logprobs else None
        sc = self.state.scores
        self.scores = None if inputs.score_targets is None else \
            tuple(torch.stack([sc[k][m] for k in range(nb)]) for m in (0, 1))  # [nb, B, S] each
        return torch.stack([torch.stack(t, -1) for t in self.state.tokens])

    def run_ops(self, ops) -> None:
        raise NotImplementedError(f"{type(self).__name__} must say when ops run")

    def execute(self, node) -> None:
        """Run one op of the schedule and account its time to prefill or decode."""
        b = self.A[node]
        op = b.get("op", "compute")
        t0 = time.perf_counter()
        getattr(self, op)(node, b)
        self.record(node, b, op, t0, time.perf_counter())

    def record(self, node, b, op: str, t0: float, t1: float) -> None:
        """Account a finished op: time to prefill or decode, bytes to its link, a trace event."""
        sq = self.A[b["square"]] if "square" in b else b
        self.stats["time"][sq["step_kind"]] += t1 - t0
        if op != "compute":
            self.stats["bytes"][f"{b['src']}->{b['dst']}"] += b["bytes"]
        if self.trace is not None:
            link = f"{b['src']}->{b['dst']}" if op != "compute" else ""
            self.trace.add(op, node, t0, t1, b.get("bytes", 0), self.tier_usage(), link)
        if op == "compute" and self.on_compute is not None:
            self.on_compute(node)

    def tier_usage(self) -> Dict[str, int]:
        return {name: t.used for name, t in self.tiers.items()}

    # --- ops ------------------------------------------------------------------------
    def load(self, node, b) -> None:
        src, dst = self.tiers[b["src"]], self.tiers[b["dst"]]
        kind = b["tensor"][0]
        if kind == "w":  # compressed weights arrive compressed: the first square using them dequantises
            value = src.get_to(b["tensor"], dst.device)
        elif kind == "kv":
            sq = self.A[b["square"]]
            value = cq.read_prefix(src, b["tensor"], sq["ctx"] - sq["s"], sq.get("kv_compressed"))
            value = cq.move(value, dst.device, non_blocking=True)
        else:  # an activation is consumed once: move it
            value = src.pop(b["tensor"]).to(dst.device, non_blocking=True)
        dst.put(b["buf"], value)

    def store(self, node, b) -> None:
        self.put_stored(b, self.tiers[b["src"]].pop(b["buf"]))

    def put_stored(self, b, value) -> None:
        """Second half of a store: the value taken from its source tier lands at its home."""
        dst = self.tiers[b["dst"]]
        # to the CPU: blocking, as the value is used (written to disk, read by CPU attention) next
        value = cq.move(value, dst.device, non_blocking=dst.device.type != "cpu")
        if b["tensor"][0] == "kv":
            sq = self.A[b["square"]]
            cq.write_slice(dst, b["tensor"], sq["ctx"] - sq["s"], value)
        else:
            dst.put(b["tensor"], value)

    def compute(self, n, a) -> None:
        i, j, k = n
        dev = self.tiers["device"]
        w = dev.get(a["w_buf"]) if a["w_buf"] else self.tiers[a["w_home"]].get(("w", j))
        if j in self.packed_layers:  # the kernels compute on the compressed parts as they are
            with packed.reuse_dense():  # (a prefill's chunks share one dense copy per matrix)
                return self.compute_with(n, a, self.wrapped(j, w, a))
        if a.get("w_dequant"):  # the first square of a run of the layer: one dense copy serves the run
            w = self.dequantize_weights(a["w_buf"], j, a["w_compressed"])
        return self.compute_with(n, a, w)

    def compute_with(self, n, a, w) -> None:
        """compute() of square n with its weights w as the family's hooks take them."""
        i, j, k = n
        dev = self.tiers["device"]
        L, s = a["ctx"], a["s"]
        pos = self.positions(k, L, s)
        kind = a["kind"]
        if kind == "embed":
            st = self.state
            toks = st.inputs.input_ids[k] if i == 0 else st.tokens[k][i - 1][:, None]
            out = self.spec.embed(w, toks.to(self.device), pos)
        elif kind == "attn":
            out = self.attn.square(self.tiers, n, a, w, dev.get(a["act_in"]), pos, self._pos[k][2], self.device)
        elif kind == "mlp":
            out = in_row_chunks(functools.partial(self.spec.mlp, w), dev.get(a["act_in"]))
        else:
            out, h = None, dev.get(a["act_in"])
            if i == 0 and self.state.inputs.score_targets is not None:
                self.state.scores[k] = self.score(w, h, self.state.inputs.score_targets[k])
            self.sample(n, self.spec.head(w, h[:, -1]))
        if out is not None:
            dev.put(("act",) + n, out)
        for buf, tier, kind, _ in a["frees"]:
            value = self.tiers[tier].pop(buf)
            if kind == "w":
                self.recycle_weights(j, a, value)

    def wrapped(self, j: int, w, a) -> dict:
        """Layer j's packed parts as the model's weights; wrapped once while they stay at home on
        the device (a per-square rewrap costs Python time at every decode step)."""
        if a["w_buf"] is not None:  # a working copy: freed after its run, so never kept here
            return packed.wrap(self.spec.layers[j], w, a["w_compressed"], self.dtype)
        hit = self._wrapped.get(j)
        if hit is None or hit[0] is not w:
            hit = self._wrapped[j] = (w, packed.wrap(self.spec.layers[j], w, a["w_compressed"], self.dtype))
        return hit[1]

    def positions(self, k: int, L: int, s: int) -> torch.Tensor:
        """Position ids [B, s] of GPU batch k at this step: one tensor for all its layers (the
        rotary tables are built once per tensor, models/rope.py). Its mask [B, L] is kept beside."""
        if self._pos.get(k, (None,))[0] != (L, s):
            mask = self.state.mask[k][:, :L]
            self._pos[k] = ((L, s), positions_from_mask(mask)[:, L - s:], mask)
        return self._pos[k][1]

    def close(self) -> None:
        self._wrapped.clear()
        for t in self.tiers.values():
            t.close()
        self.source.close()


def compute_device(name: str) -> torch.device:
    """hardware.device as a torch device this process can compute on; errors say what to set."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"hardware.device={name!r} is not a device: use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"hardware.device={name!r} but this torch ({torch.__version__}) sees no CUDA GPU: "
                         "use hardware=cpu (or hardware.device=cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"hardware.device={name!r}: graphgen computes on cpu or cuda")
    return dev


RUNNABLE = ("order", "w_home", "kv_home", "act_home", "attn_device", "slot")  # square attributes the ops read


def check_runnable(graph, pipeline) -> None:
    """The compiled graph carries what the executor reads: a pipeline that skipped a pass is named."""
    missing = [a for a in RUNNABLE if a not in graph.graph.get("provided", ())]
    if missing or "ops" not in graph.graph or "peak_bytes" not in graph.graph:
        raise ValueError(f"pipeline={list(pipeline)} leaves the graph unrunnable (missing "
                        f"{missing or ['ops / peak_bytes']}): keep order, place_tensors, delegate_cpu_attention, "
                        "insert_io and plan_memory in it")


def planned_ram(peaks: Dict[str, int], device: torch.device) -> int:
    """Planned peak of what lives in this process's RAM: host (+ device when it is the CPU)."""
    return peaks.get("host", 0) + (peaks.get("device", 0) if device.type == "cpu" else 0)
