"""BLOOM: ALiBi position bias (no position embeddings), LayerNorm after the word
embeddings, fused query_key_value laid out per head as [q_h, k_h, v_h], tanh-GELU MLP,
LM head tied to the word embeddings.

Limit: pretraining_tp > 1 with slow_but_exact=true (a summation order used in training)
is computed as one matmul, as HF does when slow_but_exact is false.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F

from .base import ModelSpec, WeightSpec, causal_padding_bias


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """ALiBi slope per head (geometric; interleaved extra heads when num_heads is not a power of 2)."""
    p2 = 2 ** math.floor(math.log2(num_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(p2) - 3))), device=device, dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + p2, device=device, dtype=torch.int32))
    if p2 != num_heads:
        extra = torch.full((), 2 ** (-(2 ** -(math.log2(2 * p2) - 3))), device=device, dtype=torch.float32)
        n = min(p2, num_heads - p2)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * n, 2, device=device, dtype=torch.int32))])
    return slopes


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh GELU with BLOOM's constants (HF's bloom_gelu_forward)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomSpec(ModelSpec):
    family = "bloom"

    def __init__(self, hf_config, name=""):
        c = hf_config
        self.eps = c.layer_norm_epsilon
        self.post_ln_residual = bool(c.apply_residual_connection_post_layernorm)
        self.tied = bool(getattr(c, "tie_word_embeddings", True))
        super().__init__(hf_config, name)

    # --- weights -------------------------------------------------------------
    def _linear(self, local, src, out_dim, in_dim) -> List[WeightSpec]:
        return [WeightSpec(f"{local}.weight", f"{src}.weight", (out_dim, in_dim)),
                WeightSpec(f"{local}.bias", f"{src}.bias", (out_dim,), "zeros", False)]

    def _norm(self, local, src) -> List[WeightSpec]:
        H = self.hidden_size
        return [WeightSpec(f"{local}.weight", f"{src}.weight", (H,), "ones", False),
                WeightSpec(f"{local}.bias", f"{src}.bias", (H,), "zeros", False)]

    def embed_weights(self):
        t = "transformer"
        emb = WeightSpec("word_embeddings.weight", f"{t}.word_embeddings.weight", (self.vocab_size, self.hidden_size))
        return [emb] + self._norm("ln", f"{t}.word_embeddings_layernorm")

    def attn_weights(self, block):
        p, H = f"transformer.h.{block}", self.hidden_size
        return (self._norm("ln", f"{p}.input_layernorm")
                + self._linear("query_key_value", f"{p}.self_attention.query_key_value", 3 * H, H)
                + self._linear("dense", f"{p}.self_attention.dense", H, H))

    def mlp_weights(self, block):
        p, H = f"transformer.h.{block}", self.hidden_size
        return (self._norm("ln", f"{p}.post_attention_layernorm")
                + self._linear("dense_h_to_4h", f"{p}.mlp.dense_h_to_4h", self.ffn_dim, H)
                + self._linear("dense_4h_to_h", f"{p}.mlp.dense_4h_to_h", H, self.ffn_dim))

    def head_weights(self):
        src = "transformer.word_embeddings.weight" if self.tied else "lm_head.weight"
        return (self._norm("ln", "transformer.ln_f")
                + [WeightSpec("lm_head.weight", src, (self.vocab_size, self.hidden_size))])

    # --- compute ---------------------------------------------------------------
    def _ln(self, w, h):
        return F.layer_norm(h, (self.hidden_size,), w["ln.weight"], w["ln.bias"], self.eps)

    def embed(self, w, tokens, positions):
        return self._ln(w, F.embedding(tokens, w["word_embeddings.weight"]))  # positions: ALiBi, in attn_bias

    def attn_qkv(self, w, h, positions):
        x = self._ln(w, h)
        b, s, _ = x.shape
        fused = F.linear(x, w["query_key_value.weight"], w["query_key_value.bias"])
        fused = fused.view(b, s, self.num_heads, 3, self.head_dim)  # per head: q, k, v
        return tuple(fused[..., i, :].transpose(1, 2) for i in range(3))  # (B, nh, s, d) each

    def attn_out(self, w, ctx, residual):
        if self.post_ln_residual:
            residual = self._ln(w, residual)
        return residual + F.linear(ctx, w["dense.weight"], w["dense.bias"])

    def mlp(self, w, h):
        x = self._ln(w, h)
        residual = x if self.post_ln_residual else h
        x = bloom_gelu(F.linear(x, w["dense_h_to_4h.weight"], w["dense_h_to_4h.bias"]))
        return residual + F.linear(x, w["dense_4h_to_h.weight"], w["dense_4h_to_h.bias"])

    def head(self, w, h):
        return F.linear(self._ln(w, h), w["lm_head.weight"])

    def attn_bias(self, mask, s, dtype):
        """mask [B, L] -> [B, nh, s, L]: ALiBi (slope x key position among real tokens) + causal/padding."""
        key_pos = (mask.long().cumsum(-1) - 1) * mask  # (B, L); padding at 0, as HF's build_alibi_tensor
        alibi = (alibi_slopes(self.num_heads, mask.device)[None, :, None] * key_pos[:, None, :]).to(dtype)
        return alibi[:, :, None, :] + causal_padding_bias(mask, s, dtype)  # (B, nh, s, L)
