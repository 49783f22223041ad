"""Compression: group-wise 4/8-bit quantisation of weights and/or the KV cache (FlexGen's scheme).

requires: w_home    provides: w_compressed, kv_compressed ((bits, group_size, group_dim) or None), w_packed
Rewrites the byte attributes later passes, the planner, the cost model and the report read, to
the compressed sizes (executors.quant.quantized_nbytes): w_bytes (home and every link),
kv_bytes, kv_read, kv_write. Adds w_work_bytes: the dequantised working copy a layer run uses on
the device (insert_io loads into it; plan_memory counts it), and w_packed: on a CPU device with
executor.packed_weights, layers whose matrices fit torch's packed kernels are computed on as
stored (executors/packed.py): no dequantisation, w_work_bytes = w_bytes (a checkpoint's Q4_0 / Q4_1
/ Q8_0 layers too, in bfloat16: quant_format.kernel_packable). Only matrices are quantised
(costs.is_compressed); biases and norms stay dense. The KV cache [2, S_max, B, nkv, d] is grouped
along a dim other than the sequence (default -1, head_dim), so prefixes and slices stay cheap.
graph.graph["compression"]: {"weight": summary | None, "cache": summary | None} for reports.
With both bits unset it only records "no compression".
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

from graphgen.quant_format import BITS, kernel_packable, packed_nbytes, quantized_nbytes, stored_split
from graphgen.build import squares
from graphgen.costs import Shape, dtype_of, is_compressed

from . import PassError, register

Comp = Optional[Tuple[int, int, int]]  # (bits, group_size, group_dim)


def settings(c, key: str) -> Comp:
    """CompressionConfig -> (bits, group_size, group_dim), None when off; bad values name the key."""
    if c.bits is None:
        return None
    if c.bits not in BITS:
        raise PassError(f"{key}.bits={c.bits} is not supported: use 4 or 8 (or leave it unset for no compression)")
    if c.group_size < 1 or (c.bits == 4 and c.group_size % 2):
        raise PassError(f"{key}.group_size={c.group_size} must be a positive"
                        f"{' even' if c.bits == 4 else ''} integer; 64 is the usual choice")
    return (int(c.bits), int(c.group_size), int(c.group_dim))


def weight_nbytes(layer, itemsize: int, comp: Comp, split: bool = False) -> int:
    """Bytes of a layer's weights at home and over links: quantised matrices + dense the rest
    (split: a checkpoint's 8-bit matrices as two int4 halves, quant_format.stored_split)."""
    if comp is None:
        return layer.numel * itemsize
    return sum(packed_nbytes(w.shape, comp, split) if is_compressed(w) else w.numel * itemsize
               for w in layer.weights)


def cache_shape(spec, sh: Shape, n_pos: int) -> Tuple[int, ...]:
    """n_pos positions of one attention layer's cache for one GPU batch: [2, n, B, nkv, d]."""
    return (2, n_pos, sh.batch, spec.num_kv_heads, spec.head_dim)


def kv_nbytes(spec, sh: Shape, n_pos: int, comp: Comp) -> int:
    shape = cache_shape(spec, sh, n_pos)
    if comp is None:
        return _prod(shape) * sh.itemsize
    return quantized_nbytes(shape, *comp) if n_pos else 0


def check_weight_groups(spec, comp: Comp) -> None:
    for layer in spec.layers:
        for w in layer.weights:
            if is_compressed(w) and not -len(w.shape) <= comp[2] < len(w.shape):
                raise PassError(f"policy.compress_weight.group_dim={comp[2]} is out of range for {w.name} "
                                f"of shape {list(w.shape)}: use -1 (along rows) or 0 (along columns)")


def check_cache_groups(comp: Comp) -> None:
    if not -3 <= comp[2] <= 4 or comp[2] % 5 < 2:
        raise PassError(f"policy.compress_cache.group_dim={comp[2]}: the cache is [2, seq, batch, kv_heads, "
                        "head_dim] and grows along seq, so groups must run along batch, kv_heads or head_dim: "
                        "use -1 (head_dim, the default), -2 or -3")


def stored_setting(lay) -> Comp:
    """The setting that holds the most weight bytes among layers kept as the checkpoint stores them."""
    by: Dict[Tuple, int] = {}
    for c, _, dense, _ in lay:
        if c:
            by[c] = by.get(c, 0) + dense
    return max(by, key=by.get) if by else None


def summary(comp: Comp, nbytes: int, dense: int) -> Optional[Dict]:
    if comp is None:
        return None
    bits, gs, gd = comp
    return {"bits": bits, "group_size": gs, "group_dim": gd, "bytes": nbytes, "dense_bytes": dense,
            "ratio": nbytes / dense if dense else 1.0}


@register("compress", requires=("w_home",), provides=("w_compressed", "kv_compressed"))
def compress(graph, cfg):
    p = cfg.policy
    wc = settings(p.compress_weight, "policy.compress_weight")
    cc = settings(p.compress_cache, "policy.compress_cache")
    spec, sh, nb = graph.graph["spec"], graph.graph["shape"], graph.graph["num_batches"]
    if wc:
        check_weight_groups(spec, wc)
    if cc:
        check_cache_groups(cc)
    # per layer: (setting, compressed bytes, dense bytes); a layer with no matrix stays dense
    lay = []
    on_kernels = cfg.hardware.device == "cpu" and cfg.executor.packed_weights  # executors/packed.py
    dtype = dtype_of(cfg.model.dtype)
    for layer in spec.layers:
        c = wc if wc and any(is_compressed(w) for w in layer.weights) else None
        c = c or (layer.stored if not wc else None)  # unset: keep what the checkpoint stores (GGUF)
        # a checkpoint's exact compression goes on the kernels in bf16 only (quant_format.kernel_packable)
        packed = bool(c) and on_kernels and kernel_packable(layer, c, dtype, sh.batch)
        wq = weight_nbytes(layer, sh.itemsize, c, packed and stored_split(layer, c))
        lay.append((c, wq, layer.numel * sh.itemsize, packed))
    attn = sum(layer.kind == "attn" for layer in spec.layers)
    kv_total = attn * nb * kv_nbytes(spec, sh, sh.max_len, cc)
    graph.graph["compression"] = {
        "weight": summary(wc or stored_setting(lay), sum(x[1] for x in lay), sum(x[2] for x in lay)),
        "cache": summary(cc, kv_total, attn * nb * kv_nbytes(spec, sh, sh.max_len, None))}
    kv = {}  # step -> (kv_bytes, kv_read, kv_write): computed once per step, not per square
    for n in squares(graph):
        a = graph.nodes[n]
        c, wq, dense, packed = lay[n[1]]
        a["w_compressed"] = c
        if c:  # packed: computed on as stored, no dense working copy
            a["w_bytes"], a["w_work_bytes"], a["w_packed"] = wq, wq if packed else dense, packed
        if a["kind"] != "attn":
            continue
        a["kv_compressed"] = cc
        if cc:
            if n[0] not in kv:
                past = a["ctx"] - a["s"]
                kv[n[0]] = (kv_nbytes(spec, sh, sh.max_len, cc), kv_nbytes(spec, sh, past, cc),
                            kv_nbytes(spec, sh, a["s"], cc))
            a["kv_bytes"], a["kv_read"], a["kv_write"] = kv[n[0]]
    return graph


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
