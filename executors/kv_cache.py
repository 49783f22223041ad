"""The executor's KV caches: allocated per (attention layer, GPU batch) in the tier the plan puts
them, kept across blocks for a chat session, freed at its end."""
from __future__ import annotations

from . import compressed as cq


class CacheLifetime:
    """Mixed into Executor (executors/base.py), whose attributes it uses."""

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
