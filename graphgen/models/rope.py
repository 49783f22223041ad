"""Rotary position embeddings, with transformers' own frequency functions so every
rope_type (default, linear, llama3, yarn, dynamic, longrope) matches HF exactly.

k is stored in the KV cache *after* rotation, as HF does, so a cached key never
needs its position again.
"""
from __future__ import annotations

from typing import Tuple

import torch

STATIC_TYPES = ("default", "linear", "llama3", "yarn")
SEQ_DEPENDENT_TYPES = ("dynamic", "longrope")  # frequencies depend on the longest sequence


def rope_parameters(hf_config) -> dict:
    """The config's rope dict in transformers v5 form (rope_type, rope_theta, ...)."""
    rp = getattr(hf_config, "rope_parameters", None)
    if not rp:
        raise ValueError(f"{hf_config.model_type} config has no rope_parameters; "
                         "set model.arch.rope_parameters={rope_type: default, rope_theta: 10000.0}")
    if any(isinstance(v, dict) for v in rp.values()):
        raise NotImplementedError("per-layer-type rope_parameters are not supported")
    return rp


class Rotary:
    """cos/sin tables for positions [B, s]; rotates the first `dim` features of each head."""

    def __init__(self, hf_config, head_dim: int):
        self.config = hf_config
        rp = rope_parameters(hf_config)
        self.type = rp.get("rope_type", "default")
        if self.type not in STATIC_TYPES + SEQ_DEPENDENT_TYPES:
            known = ", ".join(STATIC_TYPES + SEQ_DEPENDENT_TYPES)
            raise NotImplementedError(f"rope_type {self.type!r} is not supported; supported: {known}")
        self.dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))  # rotated features per head
        self.theta = rp["rope_theta"]
        self.max_positions = hf_config.max_position_embeddings
        self.orig_max = rp.get("original_max_position_embeddings", self.max_positions)
        self.inv_freq, self.scaling = self._init(None)  # (dim/2,), float
        self._last: dict = {}  # (ptr, shape, strides, device, dtype) -> (positions, its version, (cos, sin))
        self._storage = None  # the storage of the positions the kept tables are slices of

    def _init(self, seq_len) -> Tuple[torch.Tensor, float]:
        if self.type == "default":
            # as HF's compute_default_rope_parameters (arange in float, not int64)
            return 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim)), 1.0
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, scale = ROPE_INIT_FUNCTIONS[self.type](self.config, None, seq_len=seq_len)
        return inv.float(), float(scale)

    def _freqs_for(self, positions: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """HF's dynamic_rope_update, stateless: the longest sequence in the batch picks the table."""
        if self.type not in SEQ_DEPENDENT_TYPES:
            return self.inv_freq, self.scaling
        seq_len = int(positions.max()) + 1
        if self.type == "dynamic" and seq_len > self.max_positions:
            return self._init(seq_len)
        if self.type == "longrope" and seq_len > self.orig_max:
            return self._init(seq_len)[0], self.scaling
        return self.inv_freq, self.scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [B, s] -> cos, sin [B, 1, s, dim] in dtype. The tables of the latest positions
        tensor and its slices are kept: the executor passes one positions tensor to every layer of
        a step, sliced the same way for each chunk of sequences (models.base.in_row_chunks)."""
        storage = positions.untyped_storage().data_ptr()
        if storage != self._storage:  # another step's (or GPU batch's) positions: drop the old tables
            self._last.clear()
            self._storage = storage
        key = (positions.data_ptr(), positions.shape, positions.stride(), positions.device, dtype)
        hit = self._last.get(key)
        if hit is not None and hit[0]._version == hit[1]:  # hit[0] keeps the memory from being reused
            return hit[2]
        out = self._cos_sin(positions, dtype)
        self._last[key] = (positions, positions._version, out)
        return out

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """-> cos, and sin with its first half negated (what apply() multiplies the swapped halves by)."""
        inv, scale = self._freqs_for(positions)
        freqs = positions[..., None].float() * inv.to(positions.device)  # (B, s, dim/2)
        cos, sin = (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)
        return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, n, s, d] -> x with its first `dim` features rotated (GPT-NeoX style halves), given
        cos_sin()'s tables. HF's x * cos + rotate_half(x) * sin, bit for bit: rotate_half(x) * sin
        = [-x2, x1] * [s1, s2] = [x2, x1] * [-s1, s2] (negation is exact), so the halves are only
        joined, not negated: one op fewer per call (SmolLM2 q/k, bf16, 2 threads: 512 tokens 120 us
        against 134, batch 16 decode 13.5 against 15.3; a flip instead of the join took 185 us)."""
        if self.dim == x.shape[-1]:
            return x * cos + _swap_halves(x) * sin
        rot, rest = x[..., :self.dim], x[..., self.dim:]
        return torch.cat((rot * cos + _swap_halves(rot) * sin, rest), dim=-1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [x2, x1] along the last dim."""
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], x[..., :h]), dim=-1)
