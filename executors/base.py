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
from typing import Dict, List, Optional

import torch

from graphgen.config import Config, tier_budgets
from graphgen.costs import dtype_of
from graphgen.models.base import ModelSpec, positions_from_mask
from graphgen.models.weights import WeightSource
from graphgen.sampling import Sampling, select_tokens, step_generator

from .tiers import DiskTier, Tier
from .trace import Trace


@dataclass
class BlockInputs:
    input_ids: torch.Tensor  # [nb, B, S] left-padded
    attention_mask: torch.Tensor  # [nb, B, S]
    sampling: Sampling = field(default_factory=Sampling)
    block: int = 0  # index of this block in the job (seeds sampling)


@dataclass
class BlockState:
    inputs: BlockInputs
    mask: torch.Tensor  # [nb, B, S + gen] on the device: prompt mask, then ones
    tokens: List[List[torch.Tensor]]  # [k][i] -> [B] ids


class Executor:
    name = "base"

    def __init__(self, spec: ModelSpec, weights: WeightSource, cfg: Config):
        self.spec, self.source, self.cfg = spec, weights, cfg
        self.device = torch.device(cfg.hardware.device)
        self.dtype = dtype_of(cfg.model.dtype)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("model.dtype=float16 on the CPU is hundreds of times slower than bfloat16: "
                             "use model.dtype=bfloat16 or float32")
        b = tier_budgets(cfg.hardware)
        self.tiers: Dict[str, Tier] = {"device": Tier("device", b["device"], self.device),
                                       "host": Tier("host", b["host"], torch.device("cpu")),
                                       "disk": DiskTier(b["disk"], cfg.hardware.offload_dir)}
        self.w_homes: Optional[List[str]] = None
        self.trace = Trace() if cfg.executor.trace else None
        self.stats: Dict = {}

    # --- setup ------------------------------------------------------------------
    def place_weights(self, graph) -> None:
        """Read each layer's weights once (tensor by tensor) into its home tier."""
        homes = [graph.nodes[(0, j, 0)]["w_home"] for j in range(graph.graph["num_layers"])]
        if homes == self.w_homes:
            return
        for j in range(len(self.w_homes or [])):
            self.tiers[self.w_homes[j]].pop(("w", j))
        for j, layer in enumerate(self.spec.layers):
            tier = self.tiers[homes[j]]
            tier.put(("w", j), {w.name: self.source.get(w, self.dtype).to(tier.device) for w in layer.weights})
        self.w_homes = homes

    def alloc_caches(self, graph) -> None:
        sh, spec = graph.graph["shape"], self.spec
        shape = (2, sh.max_len, sh.batch, spec.num_kv_heads, spec.head_dim)
        for k in range(graph.graph["num_batches"]):
            for layer in spec.layers:
                if layer.kind == "attn":
                    home = graph.nodes[(0, layer.index, k)]["kv_home"]
                    self.tiers[home].alloc(("kv", layer.index, k), shape, self.dtype)

    def free_block(self, graph) -> None:
        for tier in self.tiers.values():
            for key in [key for key in tier.values if key[0] != "w"]:
                tier.pop(key)

    # --- running ------------------------------------------------------------------
    def run_block(self, graph, inputs: BlockInputs) -> torch.Tensor:
        """Run one compiled block; returns new tokens [num_batches, B, gen_len]."""
        self.place_weights(graph)
        for tier in self.tiers.values():
            tier.peak = tier.used
        nb, B, S = inputs.input_ids.shape
        gen = graph.graph["num_tokens"]
        mask = torch.cat([inputs.attention_mask, torch.ones(nb, B, gen, dtype=torch.long)], -1)
        self.state = BlockState(inputs, mask.to(self.device), [[] for _ in range(nb)])
        self.A = dict(graph.nodes(data=True))
        self.alloc_caches(graph)
        self.stats = {"time": defaultdict(float), "bytes": defaultdict(int)}
        try:
            self.run_ops(graph.graph["ops"])
        finally:
            self.free_block(graph)
        self.stats["peak_bytes"] = {name: t.peak for name, t in self.tiers.items()}
        return torch.stack([torch.stack(t, -1) for t in self.state.tokens])

    def run_ops(self, ops) -> None:
        raise NotImplementedError(f"{type(self).__name__} must say when ops run")

    def execute(self, node) -> None:
        """Run one op of the schedule and account its time to prefill or decode."""
        b = self.A[node]
        op = b.get("op", "compute")
        t0 = time.perf_counter()
        getattr(self, op)(node, b)
        t1 = time.perf_counter()
        sq = self.A[b["square"]] if "square" in b else b
        self.stats["time"][sq["step_kind"]] += t1 - t0
        if op != "compute":
            self.stats["bytes"][f"{b['src']}->{b['dst']}"] += b["bytes"]
        if self.trace is not None:
            self.trace.add(op, node, t0, t1, b.get("bytes", 0), self.tier_usage())

    def tier_usage(self) -> Dict[str, int]:
        return {name: t.used for name, t in self.tiers.items()}

    # --- ops ------------------------------------------------------------------------
    def load(self, node, b) -> None:
        src, dst = self.tiers[b["src"]], self.tiers[b["dst"]]
        kind = b["tensor"][0]
        if kind == "w":
            value = {name: t.to(dst.device, non_blocking=True) for name, t in src.get(b["tensor"]).items()}
        elif kind == "kv":
            sq = self.A[b["square"]]
            value = src.read_prefix(b["tensor"], sq["ctx"] - sq["s"]).to(dst.device, non_blocking=True)
        else:  # an activation is consumed once: move it
            value = src.pop(b["tensor"]).to(dst.device, non_blocking=True)
        dst.put(b["buf"], value)

    def store(self, node, b) -> None:
        src, dst = self.tiers[b["src"]], self.tiers[b["dst"]]
        value = src.pop(b["buf"]).to(dst.device, non_blocking=True)
        if b["tensor"][0] == "kv":
            sq = self.A[b["square"]]
            dst.write_slice(b["tensor"], sq["ctx"] - sq["s"], value)
        else:
            dst.put(b["tensor"], value)

    def compute(self, n, a) -> None:
        i, j, k = n
        dev = self.tiers["device"]
        w = dev.get(a["w_buf"]) if a["w_buf"] else self.tiers[a["w_home"]].get(("w", j))
        L, s = a["ctx"], a["s"]
        pos = positions_from_mask(self.state.mask[k][:, :L])[:, L - s:]
        kind = a["kind"]
        if kind == "embed":
            st = self.state
            toks = st.inputs.input_ids[k] if i == 0 else st.tokens[k][i - 1][:, None]
            out = self.spec.embed(w, toks.to(self.device), pos)
        elif kind == "attn":
            out = self.attention(n, a, w, dev.get(a["act_in"]), pos)
        elif kind == "mlp":
            out = self.spec.mlp(w, dev.get(a["act_in"]))
        else:
            out = None
            self.sample(n, self.spec.head(w, dev.get(a["act_in"])[:, -1]))
        if out is not None:
            dev.put(("act",) + n, out)
        for buf, tier, _, _ in a["frees"]:
            self.tiers[tier].pop(buf)

    def attention(self, n, a, w, h, pos) -> torch.Tensor:
        """Projections on the device; the core where the cache is read (device or host)."""
        i, j, k = n
        L, s = a["ctx"], a["s"]
        q, k_new, v_new = self.spec.attn_qkv(w, h, pos)  # q [B,nh,s,d], k/v [B,nkv,s,d]
        where = self.tiers[a["attn_device"]]
        new = torch.stack([k_new, v_new]).permute(0, 3, 1, 2, 4).to(where.device)  # [2, s, B, nkv, d]
        if i == 0:
            full = new
        else:
            prefix = where.get(a["kv_buf"]) if a["kv_buf"] else where.read_prefix(("kv", j, k), L - s)
            full = torch.cat([prefix, new], 1)  # [2, L, B, nkv, d]
        kv = full.permute(0, 2, 3, 1, 4)  # [2, B, nkv, L, d]
        mask = self.state.mask[k][:, :L].to(where.device)
        ctx = self.spec.attn_core(q.to(where.device), kv[0], kv[1], mask)
        where.put(("kvnew", j, k, i), new)
        return self.spec.attn_out(w, ctx.to(self.device), h)

    def sample(self, n, logits: torch.Tensor) -> None:
        i, _, k = n
        st = self.state
        gen = step_generator(st.inputs.sampling.seed, st.inputs.block, k, i)
        st.tokens[k].append(select_tokens(logits.cpu(), st.inputs.sampling, gen))

    def close(self) -> None:
        for t in self.tiers.values():
            t.close()
        self.source.close()
