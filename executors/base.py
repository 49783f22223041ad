"""Interpreter over the compiled schedule (graph.graph["ops"]): load / compute / store.

The executor API every runtime implements:
    ex = Executor(spec, weights, cfg)      # tiers, budgets, offload dir
    tokens = ex.run_block(graph, inputs)   # [num_batches, B, gen_len] new token ids
    ex.stats                               # timings, bytes moved, peaks of the last block
    ex.close()                             # frees tiers, removes offload files
Subclasses decide *when* ops run (reference: one by one; async: overlapped streams);
what each op does lives here, so results cannot differ between them.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from graphgen.config import Config, tier_budgets
from graphgen.costs import dtype_of, score_chunk
from graphgen.models.base import ModelSpec, positions_from_mask
from graphgen.models.weights import WeightSource
from graphgen.sampling import Sampling, select_tokens, step_generator, token_logprobs

from . import compressed as cq
from . import attention, memory, packed
from .disk import DiskTier, Extent
from .disk_io import ALIGN, CHUNK
from .tiers import Tier
from .quant import temp_nbytes
from .trace import Trace


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


class Executor:
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
        # CPU: dequantised weights reuse freed buffers (at most one layer's worth kept free)
        self.work = cq.WorkBuffers(max(layer.numel for layer in spec.layers) * self.dtype.itemsize, self.device) \
            if self.device.type == "cpu" else None
        self.trace = Trace() if cfg.executor.trace else None
        self.keep_cache = False  # chat sessions keep the KV cache between blocks (turns)
        self.on_compute: Optional[Callable] = None  # called with each square after it ran (progress bars)
        self.stats: Dict = {}

    # --- setup ------------------------------------------------------------------
    def place_weights(self, graph) -> None:
        """Read each layer's weights once (tensor by tensor) into its home tier."""
        homes = self.homes(graph)
        comps = [(graph.nodes[(0, j, 0)].get("w_compressed"), bool(graph.nodes[(0, j, 0)].get("w_packed")))
                 for j in range(graph.graph["num_layers"])]  # (setting, computed on packed kernels)
        if homes == self.w_homes and comps == self.w_comps:  # placed (and quantised) once per run
            return
        for j in range(len(self.w_homes or [])):
            if self.w_homes[j] is not None:
                self.tiers[self.w_homes[j]].pop(("w", j))
        self.packed_layers.clear()
        for j, layer in enumerate(self.spec.layers):
            if homes[j] is None:  # another pipeline stage's layer
                continue
            tier = self.tiers[homes[j]]
            comp, kernel = comps[j]
            extents = self.in_place(layer) if homes[j] == "disk" and not comp else None
            if extents is not None:  # already on disk in the checkpoint: read from there, not copied
                tier.put_external(("w", j), extents, self.dtype)
            elif comp:  # quantised once here; loads move the compressed bytes
                tier.put(("w", j), {name: self.to_tier(t, tier) for name, t in cq.quantize_layer(
                    layer, self.source, comp, self.dtype, self.device, kernel).items()})
                if kernel:
                    self.packed_layers.add(j)
            else:
                value = {w.name: self.to_tier(self.source.get(w, self.dtype), tier) for w in layer.weights}
                if self.packed_ok and homes[j] == "device" and packed.can_prepack(layer, self.dtype):
                    value = packed.prepack(layer, value, graph.graph["shape"].batch)
                    self.packed_layers.add(j)
                tier.put(("w", j), value)
        self.w_homes, self.w_comps = homes, comps
        self.source.close()  # unmap the checkpoint files read (reopened if weights move again)

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

    def to_tier(self, t: torch.Tensor, tier: Tier) -> torch.Tensor:
        """A weight tensor moved to the tier's memory (host weights pinned on a GPU machine)."""
        if tier.name == "host" and self.device.type == "cuda" and self.cfg.executor.pin_weight:
            return t.pin_memory()
        return t.to(tier.device)

    def in_place(self, layer) -> Optional[List[Extent]]:
        """Where a layer's weights lie raw in the checkpoint, if all do with the run's item size
        (and they are not compressed): then the disk tier reads them there."""
        if self.cfg.policy.compress_weight.bits:
            return None
        out = []
        for w in layer.weights:
            loc = self.source.locate(w)
            if loc is None or loc[2].itemsize != self.dtype.itemsize or not loc[2].is_floating_point:
                return None
            out.append(Extent(w.name, loc[0], loc[1], loc[2], tuple(w.shape)))
        return out

    def check_disk(self, graph) -> None:
        """Before anything is written: the offload dir must hold what the plan puts there."""
        disk = self.tiers["disk"]
        planned = self.planned_peaks(graph).get("disk", 0)
        if planned == 0:
            return
        homes = self.homes(graph)
        in_place = 0
        if homes != self.w_homes:  # weights about to be placed: those read in place need no space
            in_place = sum(nbytes_of(layer, self.dtype) for layer, h in zip(self.spec.layers, homes)
                           if h == "disk" and self.in_place(layer) is not None)
        disk.check_space(planned - disk.used - in_place)

    def alloc_caches(self, graph) -> None:
        sh, spec = graph.graph["shape"], self.spec
        shape = (2, sh.max_len, sh.batch, spec.num_kv_heads, spec.head_dim)
        for k in range(graph.graph["num_batches"]):
            for layer in spec.layers:
                if layer.kind == "attn" and self.runs_layer(graph, layer.index):
                    a = graph.nodes[(0, layer.index, k)]
                    key, comp, tier = ("kv", layer.index, k), a.get("kv_compressed"), self.tiers[a["kv_home"]]
                    if cq.cache_key(key, comp) not in tier:  # a session's cache persists
                        cq.alloc_cache(tier, key, shape, self.dtype, comp)

    def free_block(self, graph) -> None:
        keep = ("w", "kv") if self.keep_cache else ("w",)
        for tier in self.tiers.values():
            for key in [key for key in tier.values if key[0] not in keep]:
                tier.pop(key)
        self.tiers["disk"].buffers.clear()

    def drop_cache(self) -> None:
        """End a session: free the KV caches kept across blocks."""
        for tier in self.tiers.values():
            for key in [key for key in tier.values if key[0] == "kv"]:
                tier.pop(key)

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
        self._pos: Dict = {}  # GPU batch -> ((L, s), positions of its current step), shared by its layers
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
            w = packed.wrap(self.spec.layers[j], w, a["w_compressed"], self.dtype)
        elif a.get("w_dequant"):  # the first square of a run of the layer: one dense copy serves the run
            w = self.dequantize_weights(a["w_buf"], j, a["w_compressed"])
        L, s = a["ctx"], a["s"]
        pos = self.positions(k, L, s)
        kind = a["kind"]
        if kind == "embed":
            st = self.state
            toks = st.inputs.input_ids[k] if i == 0 else st.tokens[k][i - 1][:, None]
            out = self.spec.embed(w, toks.to(self.device), pos)
        elif kind == "attn":
            out = self.attn.square(self.tiers, n, a, w, dev.get(a["act_in"]), pos, self.state.mask[k][:, :L],
                                   self.device)
        elif kind == "mlp":
            out = self.spec.mlp(w, dev.get(a["act_in"]))
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

    def positions(self, k: int, L: int, s: int) -> torch.Tensor:
        """Position ids [B, s] of GPU batch k at this step: one tensor for all its layers (the
        rotary tables are built once per tensor, models/rope.py)."""
        if self._pos.get(k, (None,))[0] != (L, s):
            self._pos[k] = ((L, s), positions_from_mask(self.state.mask[k][:, :L])[:, L - s:])
        return self._pos[k][1]

    def recycle_weights(self, j: int, a, value) -> None:
        """A layer's working copy after its last square: its buffers serve the next loads (CPU)."""
        work = []
        if a.get("w_compressed") and self.work is not None and j not in self.packed_layers:  # dequantised copy
            work = cq.dequantized(self.spec.layers[j], value)
            self.work.give(work)
        if a["w_home"] == "disk" and self.device.type == "cpu":  # read from disk: nobody else holds it
            ids = {id(t) for t in work}
            self.tiers["disk"].buffers.give({n: t for n, t in value.items() if id(t) not in ids}
                                            if isinstance(value, dict) else value)

    def dequantize_weights(self, buf, j: int, comp) -> dict:
        """The compressed layer j in the device tier's w_buf -> its dense working copy, in place of
        it. On the compute stream, just before use: the load stream meanwhile reads the next layer."""
        t0 = time.perf_counter()
        dev = self.tiers["device"]
        dense = cq.dequantize_layer(self.spec.layers[j], dev.get(buf), comp, self.dtype, self.work)
        dev.put(buf, dense)  # replaces the compressed parts
        self.stats["dequantize_s"] = self.stats.get("dequantize_s", 0.0) + time.perf_counter() - t0
        return dense

    def score(self, w, h: torch.Tensor, targets: torch.Tensor):
        """Hidden states [B, S, H] -> (log p(target) [B, S], target is the argmax [B, S]) on the CPU, for
        the positions with a target (>= 0; others 0 / True). Logits are made a chunk of positions at a
        time (costs.score_chunk), so memory does not grow with vocabulary x length."""
        B, S = targets.shape
        lp, greedy = torch.zeros(B, S), torch.ones(B, S, dtype=torch.bool)
        cols = (targets >= 0).any(0).nonzero()
        if len(cols) == 0:
            return lp, greedy
        first = int(cols[0])
        step = score_chunk(B, self.spec.vocab_size, S - first)
        for c0 in range(first, S, step):
            t = targets[:, c0:c0 + step].to(h.device)
            logits = self.spec.head(w, h[:, c0:c0 + step]).float()  # [B, C, V] on the device
            got = logits.gather(-1, t.clamp(min=0)[..., None])[..., 0]
            lp[:, c0:c0 + step] = (got - torch.logsumexp(logits, -1)).cpu()
            greedy[:, c0:c0 + step] = ((logits.argmax(-1) == t) | (t < 0)).cpu()
        return lp.masked_fill_(targets < 0, 0.0), greedy

    def sample(self, n, logits: torch.Tensor) -> None:
        i, _, k = n
        st, s = self.state, self.state.inputs.sampling
        logits = logits.cpu()
        if st.inputs.row_seeds is not None and s.do_sample:  # each row its own stream of randomness
            seeds = st.inputs.row_seeds[k].tolist()
            toks = torch.cat([select_tokens(logits[r:r + 1], s, step_generator(seed, 0, 0, i))
                              for r, seed in enumerate(seeds)])
        else:
            toks = select_tokens(logits, s, step_generator(s.seed, st.inputs.block, k, i))
        st.tokens[k].append(toks)
        if st.inputs.return_logprobs:
            st.logprobs[k].append(token_logprobs(logits, toks, s))

    def close(self) -> None:
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


def nbytes_of(layer, dtype: torch.dtype) -> int:
    return layer.numel * dtype.itemsize


def planned_ram(peaks: Dict[str, int], device: torch.device) -> int:
    """Planned peak of what lives in this process's RAM: host (+ device when it is the CPU)."""
    return peaks.get("host", 0) + (peaks.get("device", 0) if device.type == "cpu" else 0)
