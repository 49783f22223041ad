"""The executor's weights: each layer read once into its home tier (compressed, packed for the CPU
kernels, or read in place from the checkpoint on disk), the disk space checked first, working
copies dequantised just before use and their buffers recycled after a layer's last square."""
from __future__ import annotations

import time
from typing import List, Optional

import torch

from . import compressed as cq
from . import packed
from .disk import Extent
from .tiers import Tier


class WeightPlacement:
    """Mixed into Executor (executors/base.py), whose attributes it uses."""

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
        self._wrapped.clear()
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
                    value = packed.prepack(layer, value, graph.graph["shape"].batch, self.spec.fused_linears)
                    self.packed_layers.add(j)
                tier.put(("w", j), value)
        self.w_homes, self.w_comps = homes, comps
        self.source.close()  # unmap the checkpoint files read (reopened if weights move again)


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



def nbytes_of(layer, dtype: torch.dtype) -> int:
    return layer.numel * dtype.itemsize
