"""CPU attention delegation: decode attention runs where the KV cache lives (host)
when moving q/k/v and the output moves fewer bytes than bringing the cache to the device.

requires: kv_home    provides: attn_device (device | host) on attention squares
"""
from __future__ import annotations

from graphgen.build import squares

from . import register


@register("delegate_cpu_attention", requires=("kv_home",), provides=("attn_device",))
def delegate_cpu_attention(graph, cfg):
    spec, sh = graph.graph["spec"], graph.graph["shape"]
    for n in squares(graph):
        a = graph.nodes[n]
        if a["kind"] != "attn":
            continue
        a["attn_device"] = "device"
        if not cfg.policy.cpu_attention or a["step_kind"] == "prefill" or a["kv_home"] == "device":
            continue
        # q, k, v go to the host and the context comes back: [B, s, H + 2*kv_dim + H]
        moved = sh.batch * a["s"] * (2 * spec.hidden_size + 2 * spec.kv_dim) * sh.itemsize
        if moved < a["kv_read"]:
            a["attn_device"] = "host"
    return graph
