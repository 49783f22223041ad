"""OPT (all sizes): learned positions, pre- or post-LayerNorm (opt-350m), ReLU MLP,
optional embedding projections when word_embed_proj_dim != hidden_size."""
from __future__ import annotations

from typing import List

import torch.nn.functional as F

from .base import ModelSpec, WeightSpec

POS_OFFSET = 2  # OPT's learned positional embedding is offset by 2


class OPTSpec(ModelSpec):
    family = "opt"
    fused_linears = (("q_proj", "k_proj", "v_proj"),)

    def __init__(self, hf_config, name=""):
        c = hf_config
        self.proj_dim = getattr(c, "word_embed_proj_dim", None) or c.hidden_size
        self.pre_ln = bool(getattr(c, "do_layer_norm_before", True))
        self.final_ln = self.pre_ln and not getattr(c, "_remove_final_layer_norm", False)
        self.bias = bool(getattr(c, "enable_bias", True))
        self.ln_affine = bool(getattr(c, "layer_norm_elementwise_affine", True))
        self.act = getattr(c, "activation_function", "relu")
        super().__init__(hf_config, name)

    # --- weights -------------------------------------------------------------
    def _linear(self, local, src, out_dim, in_dim, bias=None) -> List[WeightSpec]:
        ws = [WeightSpec(f"{local}.weight", f"{src}.weight", (out_dim, in_dim))]
        if self.bias if bias is None else bias:
            ws.append(WeightSpec(f"{local}.bias", f"{src}.bias", (out_dim,), "zeros", False))
        return ws

    def _norm(self, local, src) -> List[WeightSpec]:
        if not self.ln_affine:
            return []
        H = self.hidden_size
        return [WeightSpec(f"{local}.weight", f"{src}.weight", (H,), "ones", False),
                WeightSpec(f"{local}.bias", f"{src}.bias", (H,), "zeros", False)]

    def embed_weights(self):
        d = "model.decoder"
        ws = [WeightSpec("embed_tokens.weight", f"{d}.embed_tokens.weight", (self.vocab_size, self.proj_dim)),
              WeightSpec("embed_positions.weight", f"{d}.embed_positions.weight",
                         (self.max_positions + POS_OFFSET, self.hidden_size))]
        if self.proj_dim != self.hidden_size:
            ws += self._linear("project_in", f"{d}.project_in", self.hidden_size, self.proj_dim, bias=False)
        return ws

    def attn_weights(self, block):
        p, H = f"model.decoder.layers.{block}", self.hidden_size
        ws = self._norm("ln", f"{p}.self_attn_layer_norm")
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            ws += self._linear(name, f"{p}.self_attn.{name}", H, H)
        return ws

    def mlp_weights(self, block):
        p, H = f"model.decoder.layers.{block}", self.hidden_size
        return (self._norm("ln", f"{p}.final_layer_norm")
                + self._linear("fc1", f"{p}.fc1", self.ffn_dim, H)
                + self._linear("fc2", f"{p}.fc2", H, self.ffn_dim))

    def head_weights(self):
        d = "model.decoder"
        ws = self._norm("ln", f"{d}.final_layer_norm") if self.final_ln else []
        if self.proj_dim != self.hidden_size:
            ws += self._linear("project_out", f"{d}.project_out", self.proj_dim, self.hidden_size, bias=False)
        # tied to the input embedding, as in every OPT checkpoint
        ws.append(WeightSpec("lm_head.weight", f"{d}.embed_tokens.weight", (self.vocab_size, self.proj_dim)))
        return ws

    # --- compute ---------------------------------------------------------------
    def _ln(self, w, h):
        return F.layer_norm(h, (self.hidden_size,), w.get("ln.weight"), w.get("ln.bias"), 1e-5)

    def embed(self, w, tokens, positions):
        h = F.embedding(tokens, w["embed_tokens.weight"])  # (B, s, proj_dim)
        if "project_in.weight" in w:
            h = F.linear(h, w["project_in.weight"])
        return h + F.embedding(positions + POS_OFFSET, w["embed_positions.weight"])

    def attn_qkv(self, w, h, positions):
        x = self._ln(w, h) if self.pre_ln else h
        b, s, _ = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q, k, v = self.linears(w, x, "q_proj", "k_proj", "v_proj")
        q = q * self.head_dim ** -0.5
        return tuple(t.reshape(shape).transpose(1, 2) for t in (q, k, v))

    attn_scale = 1.0  # q is pre-scaled, as in HF's OPT

    def attn_out(self, w, ctx, residual):
        h = residual + F.linear(ctx, w["out_proj.weight"], w.get("out_proj.bias"))
        return h if self.pre_ln else self._ln(w, h)

    def mlp(self, w, h):
        x = self._ln(w, h) if self.pre_ln else h
        x = F.linear(x, w["fc1.weight"], w.get("fc1.bias"))
        x = F.relu_(x) if self.act == "relu" else F.gelu(x)  # in place: x is fc1's fresh output
        h = h + F.linear(x, w["fc2.weight"], w.get("fc2.bias"))
        return h if self.pre_ln else self._ln(w, h)

    def head(self, w, h):
        if self.final_ln:
            h = self._ln(w, h)
        if "project_out.weight" in w:
            h = F.linear(h, w["project_out.weight"])
        return F.linear(h, w["lm_head.weight"])
