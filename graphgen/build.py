"""The graph: one networkx.DiGraph of (token i, layer j, batch k) squares per block.

Node (i, j, k): layer j of the model for GPU batch k at generation step i (0 = prefill).
Node attributes set here:
    kind        embed | attn | mlp | head
    step_kind   prefill | decode
    s, ctx      new tokens this step, context length after it
    flops       matmul + attention FLOPs
    w_bytes     bytes of layer j's weights        act_bytes  bytes of the square's output
    kv_bytes    whole KV cache of (j, k) (attn)   kv_read / kv_write  cache prefix read, slice written
    workspace   transient bytes while computing
Edge attributes: dep = act | kv | token (bytes are on the producing node).
Graph attributes: spec, shape (costs.Shape), num_tokens, num_layers, num_batches, dtype.
Passes add decisions (order, homes, attention device, I/O nodes) as more attributes.
"""
from __future__ import annotations

import networkx as nx

from . import costs
from .costs import Shape
from .models.base import ModelSpec


def layer_attrs(spec: ModelSpec, sh: Shape, i: int) -> list:
    """Per-layer attribute dicts for step i (shared shape, copied per batch)."""
    out = []
    for layer in spec.layers:
        a = {"kind": layer.kind, "step_kind": "prefill" if i == 0 else "decode",
             "s": sh.new_tokens(i), "ctx": sh.context(i),
             "flops": costs.flops(spec, layer, sh, i),
             "w_bytes": costs.weight_bytes(layer, sh.itemsize),
             "act_bytes": costs.act_bytes(spec, layer, sh, i),
             "workspace": costs.workspace_bytes(spec, layer, sh, i)}
        if layer.kind == "attn":
            a["kv_bytes"] = costs.kv_cache_bytes(spec, sh)
            a["kv_read"] = costs.kv_slice_bytes(spec, sh, sh.context(i) - sh.new_tokens(i))
            a["kv_write"] = costs.kv_slice_bytes(spec, sh, sh.new_tokens(i))
        out.append(a)
    return out


def build_graph(spec: ModelSpec, *, batch: int, num_batches: int, prompt_len: int,
                gen_len: int, dtype: str = "float32", past_len: int = 0, cache_len: int = 0,
                score: bool = False) -> nx.DiGraph:
    """All squares of one block (num_batches GPU batches of `batch` sequences) and their deps.
    past_len > 0: a chat turn whose first past_len tokens are already in a cache of cache_len.
    score: the prefill head also scores every prompt position (log-likelihood; gen_len=1 for prefill only)."""
    if gen_len < 1 or prompt_len < 1:
        raise ValueError(f"workload needs prompt_len >= 1 and gen_len >= 1 (got {prompt_len}, {gen_len})")
    total = past_len + prompt_len + (gen_len - 1 if score else gen_len)  # scoring feeds nothing back
    if total > spec.max_positions:
        raise ValueError(f"prompt_len + gen_len = {total} exceeds the model's "
                         f"{spec.max_positions} positions: lower workload.prompt_len or workload.gen_len")
    if cache_len and total > cache_len:
        raise ValueError(f"{total} tokens do not fit the session's KV cache of {cache_len}")
    itemsize = costs.dtype_of(dtype).itemsize
    sh = Shape(batch, prompt_len, gen_len, itemsize, past_len, cache_len, score)
    n_layers = len(spec.layers)
    attn = [j for j, layer in enumerate(spec.layers) if layer.kind == "attn"]
    g = nx.DiGraph(spec=spec, shape=sh, num_tokens=gen_len, num_layers=n_layers,
                   num_batches=num_batches, dtype=dtype)
    for i in range(gen_len):
        attrs = layer_attrs(spec, sh, i)
        g.add_nodes_from(((i, j, k), dict(attrs[j])) for j in range(n_layers) for k in range(num_batches))
    for i in range(gen_len):
        for k in range(num_batches):
            g.add_edges_from((((i, j - 1, k), (i, j, k)) for j in range(1, n_layers)), dep="act")
            if i > 0:
                g.add_edges_from((((i - 1, j, k), (i, j, k)) for j in attn), dep="kv")
                g.add_edge((i - 1, n_layers - 1, k), (i, 0, k), dep="token")
    return g


def squares(g: nx.DiGraph):
    """The (i, j, k) square nodes (passes add I/O nodes beside them)."""
    return (n for n, a in g.nodes(data=True) if "kind" in a)
