"""GPT-NeoX (Pythia): LayerNorm, partial rotary (rotary_pct of each head), fused
query_key_value laid out per head as [q_h, k_h, v_h], GELU MLP, untied embed_out.

Parallel residual (use_parallel_residual, every Pythia model):
    out = x + attn(ln1(x)) + mlp(ln2(x))      -- both branches read the block input x
The graph passes one tensor between layers, so the attn layer outputs the pair
[attn(ln1(x)), x] concatenated on the last dim, [B, s, 2H], and the mlp layer
consumes it and returns [B, s, H]. act_dim("attn") reports 2H so byte counts stay right.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .base import ModelSpec, WeightSpec
from .llama import act_fn
from .rope import SEQ_DEPENDENT_TYPES, Rotary


class GPTNeoXSpec(ModelSpec):
    family = "gpt_neox"

    def __init__(self, hf_config, name=""):
        c = hf_config
        self.eps = c.layer_norm_eps
        self.parallel = bool(c.use_parallel_residual)
        self.bias = bool(getattr(c, "attention_bias", True))
        self.tied = bool(getattr(c, "tie_word_embeddings", False))
        self.act_fn = act_fn(c.hidden_act)
        super().__init__(hf_config, name)
        self.head_dim = self.hidden_size // self.num_heads  # NeoX ignores any head_dim field
        self.rotary = Rotary(c, self.head_dim)
        self.batch_wide = self.rotary.type in SEQ_DEPENDENT_TYPES

    def act_dim(self, kind: str) -> int:
        return 2 * self.hidden_size if (kind == "attn" and self.parallel) else self.hidden_size

    # --- weights -------------------------------------------------------------
    def _linear(self, local, src, out_dim, in_dim, bias=True) -> List[WeightSpec]:
        ws = [WeightSpec(f"{local}.weight", f"{src}.weight", (out_dim, in_dim))]
        if bias:
            ws.append(WeightSpec(f"{local}.bias", f"{src}.bias", (out_dim,), "zeros", False))
        return ws

    def _norm(self, src) -> List[WeightSpec]:
        H = self.hidden_size
        return [WeightSpec("ln.weight", f"{src}.weight", (H,), "ones", False),
                WeightSpec("ln.bias", f"{src}.bias", (H,), "zeros", False)]

    def embed_weights(self):
        return [WeightSpec("embed_in.weight", "gpt_neox.embed_in.weight", (self.vocab_size, self.hidden_size))]

    def attn_weights(self, block):
        p, H = f"gpt_neox.layers.{block}", self.hidden_size
        return (self._norm(f"{p}.input_layernorm")
                + self._linear("query_key_value", f"{p}.attention.query_key_value", 3 * H, H, self.bias)
                + self._linear("dense", f"{p}.attention.dense", H, H, self.bias))

    def mlp_weights(self, block):
        p, H = f"gpt_neox.layers.{block}", self.hidden_size
        return (self._norm(f"{p}.post_attention_layernorm")
                + self._linear("dense_h_to_4h", f"{p}.mlp.dense_h_to_4h", self.ffn_dim, H)
                + self._linear("dense_4h_to_h", f"{p}.mlp.dense_4h_to_h", H, self.ffn_dim))

    def head_weights(self):
        src = "gpt_neox.embed_in.weight" if self.tied else "embed_out.weight"
        return (self._norm("gpt_neox.final_layer_norm")
                + [WeightSpec("embed_out.weight", src, (self.vocab_size, self.hidden_size))])

    # --- compute ---------------------------------------------------------------
    def _ln(self, w, h):
        return F.layer_norm(h, (self.hidden_size,), w["ln.weight"], w["ln.bias"], self.eps)

    def embed(self, w, tokens, positions):
        return F.embedding(tokens, w["embed_in.weight"])  # (B, s, H); positions enter via rotary

    def attn_qkv(self, w, h, positions):
        x = self._ln(w, h)
        b, s, _ = x.shape
        fused = F.linear(x, w["query_key_value.weight"], w.get("query_key_value.bias"))
        fused = fused.view(b, s, self.num_heads, 3 * self.head_dim).transpose(1, 2)  # (B, nh, s, 3d)
        q, k, v = fused.chunk(3, dim=-1)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        return self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin), v

    def attn_out(self, w, ctx, residual):
        """residual [B, s, H] -> [B, s, 2H] = [attn, x] (parallel) or [B, s, H] = x + attn."""
        attn = F.linear(ctx, w["dense.weight"], w.get("dense.bias"))
        return torch.cat((attn, residual), dim=-1) if self.parallel else residual + attn

    def mlp(self, w, h):
        """h [B, s, act_dim('attn')] -> [B, s, H]."""
        if self.parallel:
            attn, x = h.split(self.hidden_size, dim=-1)
            return self._mlp(w, x) + attn + x  # HF's summation order
        return self._mlp(w, h) + h

    def _mlp(self, w, x):
        x = self.act_fn(F.linear(self._ln(w, x), w["dense_h_to_4h.weight"], w["dense_h_to_4h.bias"]))
        return F.linear(x, w["dense_4h_to_h.weight"], w["dense_4h_to_h.bias"])

    def head(self, w, h):
        return F.linear(self._ln(w, h), w["embed_out.weight"])
