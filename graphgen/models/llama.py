"""Llama family: Llama 2/3 (model_type llama), Mistral, Qwen2.

RMSNorm, rotary positions (every HF rope_type, incl. Llama 3's "llama3" scaling),
SwiGLU MLP, grouped KV heads (num_key_value_heads), optional tied embeddings.
    attn layer: h + o_proj(attn(rope(q, k), v))  on input_layernorm(h)
    mlp  layer: h + down(act(gate(x)) * up(x))    on x = post_attention_layernorm(h)
Family differences are flags: Qwen2 has q/k/v biases; Mistral a sliding window.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .base import ModelSpec, WeightSpec, causal_padding_bias, fused_name
from .rope import SEQ_DEPENDENT_TYPES, Rotary


def act_fn(name: str):
    """HF's activation by config name (hidden_act), so variants like gelu_new match exactly."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"hidden_act {name!r} is unknown to transformers; known: {', '.join(sorted(ACT2FN))}")
    return ACT2FN[name]


QKV = ("q_proj", "k_proj", "v_proj")


class LlamaSpec(ModelSpec):
    family = "llama"
    mlp_buffers = 3  # gate, up and their product
    fused_linears = (QKV, ("gate_proj", "up_proj"))

    def __init__(self, hf_config, name=""):
        c = hf_config
        self.eps = c.rms_norm_eps
        self.act_fn = act_fn(c.hidden_act)
        self.tied = bool(getattr(c, "tie_word_embeddings", False))
        self.read_flags(c)
        super().__init__(hf_config, name)
        self.rotary = Rotary(c, self.head_dim)
        self.batch_wide = self.rotary.type in SEQ_DEPENDENT_TYPES

    def read_flags(self, c) -> None:
        """Family differences: biases and sliding window (subclasses override)."""
        self.qkv_bias = self.o_bias = bool(getattr(c, "attention_bias", False))
        self.mlp_bias = bool(getattr(c, "mlp_bias", False))
        self.sliding_window = None

    # --- weights -------------------------------------------------------------
    def _linear(self, local, src, out_dim, in_dim, bias) -> List[WeightSpec]:
        ws = [WeightSpec(f"{local}.weight", f"{src}.weight", (out_dim, in_dim))]
        if bias:
            ws.append(WeightSpec(f"{local}.bias", f"{src}.bias", (out_dim,), "zeros", False))
        return ws

    def _norm(self, src) -> List[WeightSpec]:
        return [WeightSpec("ln.weight", f"{src}.weight", (self.hidden_size,), "ones", False)]

    def embed_weights(self):
        return [WeightSpec("embed_tokens.weight", "model.embed_tokens.weight", (self.vocab_size, self.hidden_size))]

    def attn_weights(self, block):
        p, H, qd = f"model.layers.{block}", self.hidden_size, self.num_heads * self.head_dim
        return (self._norm(f"{p}.input_layernorm")
                + self._linear("q_proj", f"{p}.self_attn.q_proj", qd, H, self.qkv_bias)
                + self._linear("k_proj", f"{p}.self_attn.k_proj", self.kv_dim, H, self.qkv_bias)
                + self._linear("v_proj", f"{p}.self_attn.v_proj", self.kv_dim, H, self.qkv_bias)
                + self._linear("o_proj", f"{p}.self_attn.o_proj", H, qd, self.o_bias))

    def mlp_weights(self, block):
        p, H, Fd = f"model.layers.{block}", self.hidden_size, self.ffn_dim
        return (self._norm(f"{p}.post_attention_layernorm")
                + self._linear("gate_proj", f"{p}.mlp.gate_proj", Fd, H, self.mlp_bias)
                + self._linear("up_proj", f"{p}.mlp.up_proj", Fd, H, self.mlp_bias)
                + self._linear("down_proj", f"{p}.mlp.down_proj", H, Fd, self.mlp_bias))

    def head_weights(self):
        src = "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        return self._norm("model.norm") + [WeightSpec("lm_head.weight", src, (self.vocab_size, self.hidden_size))]

    # --- compute ---------------------------------------------------------------
    def _rms(self, w, h):
        # as HF's LlamaRMSNorm: statistics in float32, scale in the input dtype. F.rms_norm runs the
        # same ops (pow, mean, + eps, rsqrt, mul: bit-identical) in one call from Python
        return w["ln.weight"] * F.rms_norm(h.float(), (h.shape[-1],), None, self.eps).to(h.dtype)

    def embed(self, w, tokens, positions):
        return F.embedding(tokens, w["embed_tokens.weight"])  # (B, s, H); positions enter via rotary

    def attn_qkv(self, w, h, positions):
        x = self._rms(w, h)
        b, s, _ = x.shape
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        fused = w.get(fused_name(QKV))
        if fused is not None:  # one GEMM (executors/packed.py), then q and k rotated in one pass
            qkv = F.linear(x, fused, w.get(fused_name(QKV, "bias"))).view(b, s, nh + 2 * nkv, d).transpose(1, 2)
            qk = self.rotary.apply(qkv[:, :nh + nkv], cos, sin)
            return qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]
        q, k, v = self.linears(w, x, *QKV)
        q = q.reshape(b, s, nh, d).transpose(1, 2)  # (B, n, s, d)
        k = k.reshape(b, s, nkv, d).transpose(1, 2)
        v = v.reshape(b, s, nkv, d).transpose(1, 2)
        return self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin), v

    def attn_out(self, w, ctx, residual):
        return residual + F.linear(ctx, w["o_proj.weight"], w.get("o_proj.bias"))

    def mlp(self, w, h):
        x = self._rms(w, h)
        gate, up = self.linears(w, x, "gate_proj", "up_proj")
        return h + F.linear(self.act_fn(gate) * up, w["down_proj.weight"], w.get("down_proj.bias"))

    def head(self, w, h):
        return F.linear(self._rms(w, h), w["lm_head.weight"])

    def attn_bias(self, mask, s, dtype):
        """Causal + padding, and Mistral's sliding window: key index > query index - window."""
        L = mask.shape[1]
        if self.sliding_window is None or L <= self.sliding_window:
            return super().attn_bias(mask, s, dtype)  # None where plain causal will do
        bias = causal_padding_bias(mask, s, dtype)
        q_pos = torch.arange(L - s, L, device=mask.device)[:, None]
        k_pos = torch.arange(L, device=mask.device)[None, :]
        return bias.masked_fill_((k_pos <= q_pos - self.sliding_window)[None, None], torch.finfo(dtype).min)


class MistralSpec(LlamaSpec):
    """Mistral: Llama with GQA, no biases, and a sliding attention window on every layer."""

    family = "mistral"

    def read_flags(self, c) -> None:
        self.qkv_bias = self.o_bias = self.mlp_bias = False
        self.sliding_window = getattr(c, "sliding_window", None)


class Qwen2Spec(LlamaSpec):
    """Qwen2: Llama with biases on q/k/v (not o_proj) and a large vocabulary."""

    family = "qwen2"

    def __init__(self, hf_config, name=""):
        sliding = [t for t in (getattr(hf_config, "layer_types", None) or []) if t == "sliding_attention"]
        if sliding:
            raise NotImplementedError(
                "Qwen2 with use_sliding_window=true (a window on layers >= max_window_layers) is not supported: "
                "attention here is layer-independent. Set model.arch.use_sliding_window=false "
                "(as in every released Qwen2 checkpoint).")
        super().__init__(hf_config, name)

    def read_flags(self, c) -> None:
        self.qkv_bias, self.o_bias, self.mlp_bias = True, False, False
        self.sliding_window = None
