"""Small GGUF files for tests, written as llama.cpp's converter would: its tensor names, Q/K rows
permuted for llama-architecture files, matrices quantised by the gguf package's own quantiser."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import gguf

# (HF config class, GGUF architecture, general.name): llama.cpp writes Mistral as "llama"
FAMILIES = {"llama": ("LlamaConfig", "llama", "tiny llama"),
            "mistral": ("MistralConfig", "llama", "mistral"),  # transformers: general.name == "mistral"
            "qwen2": ("Qwen2Config", "qwen2", "tiny qwen2")}


def tiny_model(family: str, **overrides):
    """A random small HF model of the family, hidden and FFN widths multiples of 32 (GGUF blocks)."""
    import transformers

    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=2, pad_token_id=1)
    kw.update(overrides)
    cfg = getattr(transformers, FAMILIES[family][0])(**kw)
    torch.manual_seed(0)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[family]
    model = cls(cfg).eval()
    with torch.no_grad():  # wider weights than the 0.02 init: clear argmaxes, real quantisation error
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rotary halves -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, qtype: str = "Q4_1", family: str = "llama", arch: str = None,
               types: dict = None) -> Path:
    """model's weights as a GGUF file; matrices in qtype (types: GGUF tensor name -> type, to mix)."""
    c = model.config
    arch = arch or FAMILIES[family][1]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(FAMILIES.get(family, (None, None, family))[2])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == FAMILIES[family][1]),
                                     c.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        a = t.float().numpy()
        if FAMILIES[family][1] == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            a = _permute(a, c.num_attention_heads if "attn_q" in name else c.num_key_value_heads)
        kind = (types or {}).get(name, qtype if a.ndim == 2 else "F32")
        if kind == "I32":
            w.add_tensor(name, a.astype(np.int32))
        elif kind == "F32":
            w.add_tensor(name, np.ascontiguousarray(a))
        else:
            qt = getattr(gguf.GGMLQuantizationType, kind)
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
