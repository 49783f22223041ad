"""Model families beyond OPT: specs driven layer by layer must reproduce HF greedy generation.

Tiny random checkpoints (float32) are saved with transformers, loaded back through
graphgen's registry and CheckpointWeights, and decoded with a hand-written loop that
does what the executor does (k/v caches concatenated on the sequence dim).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from graphgen.models import FAMILIES, build_spec, hf_config_from_arch, hf_config_from_dir, positions_from_mask
from graphgen.models.weights import CheckpointWeights

CONF_MODEL = Path(__file__).resolve().parent.parent.parent / "conf" / "model"
TINY = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16)


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, "intermediate_size": 64, **kw})


def _configs():
    from transformers import BloomConfig, GPTNeoXConfig, MistralConfig, Qwen2Config

    bloom = {k: v for k, v in TINY.items() if k != "max_position_embeddings"}  # ALiBi: no position limit
    return {
        "llama": lambda: _llama(),
        "llama-gqa-tied": lambda: _llama(num_key_value_heads=2, tie_word_embeddings=True),
        "llama3-rope": lambda: _llama(num_key_value_heads=2, rope_parameters=dict(LLAMA3_ROPE)),
        "llama-linear-rope": lambda: _llama(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
        # sequences grow past 10 (dynamic) or 12 (longrope) positions while decoding: the table switches mid-run
        "llama-dynamic-rope": lambda: _llama(max_position_embeddings=10, rope_parameters=dict(
            rope_type="dynamic", rope_theta=10000.0, factor=4.0)),
        "llama-longrope": lambda: _llama(rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=12,
            short_factor=[1.0, 1.1, 1.3, 1.7], long_factor=[1.0, 2.0, 4.0, 8.0])),
        "mistral-window": lambda: MistralConfig(**{**TINY, "intermediate_size": 64, "num_key_value_heads": 2,
                                                   "sliding_window": 5}),
        "qwen2": lambda: Qwen2Config(**{**TINY, "intermediate_size": 64, "num_key_value_heads": 2}),
        "bloom": lambda: BloomConfig(**bloom),
        # 6 heads: ALiBi slopes for a head count that is not a power of two
        "bloom-6heads-postln": lambda: BloomConfig(**{**bloom, "hidden_size": 48, "num_attention_heads": 6},
                                                   apply_residual_connection_post_layernorm=True),
        "gpt_neox-parallel": lambda: GPTNeoXConfig(**TINY, intermediate_size=64, rotary_pct=0.5,
                                                   use_parallel_residual=True),
        "gpt_neox-serial": lambda: GPTNeoXConfig(**TINY, intermediate_size=64, rotary_pct=0.25,
                                                 use_parallel_residual=False),
    }


def make_checkpoint(cfg, path: Path):
    """Random model from an HF config, saved as a checkpoint directory; returns the HF model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # HF's init is tiny (std 0.02): widen it so tokens are not all ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model


def prompts(batch_lens=(7, 4, 9), vocab=96):
    """Left-padded batch of different prompt lengths: ids [B, S], mask [B, S]."""
    g = torch.Generator().manual_seed(1)
    S = max(batch_lens)
    ids = torch.zeros(len(batch_lens), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(batch_lens):
        ids[b, S - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, S - n:] = 1
    return ids, mask


@torch.no_grad()
def spec_generate(spec, src, ids, mask, gen: int) -> torch.Tensor:
    """Greedy decoding through the spec's layer hooks, as the executor runs them."""
    W = [{w.name: src.get(w, torch.float32) for w in L.weights} for L in spec.layers]
    B, S = ids.shape
    full = torch.cat([mask, torch.ones(B, gen, dtype=mask.dtype)], dim=1)
    caches, toks, out = {}, ids, []
    for i in range(gen):
        L = S + i
        s = S if i == 0 else 1
        pos = positions_from_mask(full[:, :L])[:, L - s:]
        h = spec.embed(W[0], toks, pos)
        for lay in spec.layers[1:-1]:
            w = W[lay.index]
            if lay.kind == "attn":
                q, k, v = spec.attn_qkv(w, h, pos)
                if lay.index in caches:
                    k = torch.cat([caches[lay.index][0], k], dim=2)
                    v = torch.cat([caches[lay.index][1], v], dim=2)
                caches[lay.index] = (k, v)
                h = spec.attn_out(w, spec.attn_core(q, k, v, full[:, :L]), h)
                assert h.shape[-1] == spec.act_dim("attn")
            else:
                h = spec.mlp(w, h)
                assert h.shape[-1] == spec.act_dim("mlp")
        toks = spec.head(W[-1], h[:, -1]).argmax(-1)[:, None]
        out.append(toks)
    return torch.cat(out, dim=1)


def hf_generate(model, ids, mask, gen: int) -> torch.Tensor:
    """HF greedy tokens [B, <=gen]: pad (0) after a row's eos; stops early once every row has ended."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=gen, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


def assert_same_tokens(ours, ref, eos, case):
    """Equal up to each row's first eos (HF pads after it and may stop early)."""
    ours = ours[:, :ref.shape[1]]
    ended = ((ref == eos).long().cumsum(1) - (ref == eos).long()) > 0  # strictly after the first eos
    assert torch.equal(ours.masked_fill(ended, 0), ref.masked_fill(ended, 0)), \
        f"{case}: graphgen {ours.tolist()} != HF {ref.tolist()}"


@pytest.mark.parametrize("case", list(_configs()))
def test_family_matches_hf_greedy(case, tmp_path):
    cfg = _configs()[case]()
    model = make_checkpoint(cfg, tmp_path)
    spec = build_spec(hf_config_from_dir(tmp_path))
    assert spec.family == cfg.model_type
    ids, mask = prompts(vocab=cfg.vocab_size)
    gen = 6
    src = CheckpointWeights(tmp_path)
    ours = spec_generate(spec, src, ids, mask, gen)
    assert_same_tokens(ours, hf_generate(model, ids, mask, gen), cfg.eos_token_id, case)


def test_spec_weights_cover_checkpoint(tmp_path):
    """Every checkpoint tensor is named by some layer (nothing silently ignored)."""
    for case in ("llama-gqa-tied", "qwen2", "bloom", "gpt_neox-parallel"):
        d = tmp_path / case
        make_checkpoint(_configs()[case](), d)
        spec = build_spec(hf_config_from_dir(d))
        src = CheckpointWeights(d)
        used = {src.resolve(w.source) for L in spec.layers for w in L.weights}
        assert None not in used
        assert set(src._where) - used == set(), case


def test_unsupported_model_type_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(ValueError) as e:
        build_spec(GPT2Config(n_layer=1))
    msg = str(e.value)
    assert "gpt2" in msg
    for mt in ("opt", "llama", "mistral", "qwen2", "bloom", "gpt_neox"):
        assert mt in msg


def test_qwen2_sliding_window_refused():
    from transformers import Qwen2Config

    cfg = Qwen2Config(**{**TINY, "intermediate_size": 64}, use_sliding_window=True, sliding_window=8,
                      max_window_layers=1)
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        build_spec(cfg)


def test_unsupported_rope_type_refused():
    cfg = _llama(rope_parameters=dict(rope_type="proportional", rope_theta=10000.0, factor=2.0))
    with pytest.raises(NotImplementedError, match="rope_type"):
        build_spec(cfg)


YAMLS = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "llama-3.1-8b",
         "mistral-7b", "qwen2-7b", "qwen2-72b", "bloom-7b1", "bloom-176b", "pythia-6.9b", "pythia-12b"]
# published parameter counts, in billions (loose bounds: names round)
PARAMS_B = {"llama-2-7b": 6.74, "llama-2-13b": 13.0, "llama-2-70b": 69.0, "llama-3-8b": 8.03,
            "llama-3-70b": 70.6, "llama-3.1-8b": 8.03, "mistral-7b": 7.24, "qwen2-7b": 7.6,
            "qwen2-72b": 72.7, "bloom-7b1": 7.07, "bloom-176b": 176.2, "pythia-6.9b": 6.86,
            "pythia-12b": 11.85}


@pytest.mark.parametrize("name", YAMLS)
def test_model_yaml_builds_spec(name):
    conf = yaml.safe_load((CONF_MODEL / f"{name}.yaml").read_text())
    assert conf["name"] == name and conf["hf_id"]
    spec = build_spec(hf_config_from_arch(conf["arch"]), name)
    assert spec.family in FAMILIES
    # count each distinct checkpoint tensor once (tied embeddings appear in embed and head)
    unique = {w.source: w.numel for L in spec.layers for w in L.weights}
    billions = sum(unique.values()) / 1e9
    assert abs(billions - PARAMS_B[name]) / PARAMS_B[name] < 0.02, f"{name}: {billions:.2f}B parameters"


# --- end to end through the public API: schedules x placements x CPU attention ---------------
POLICIES = {
    "row-host-cpuattn": ["schedule=row", "policy.percent=[0,100,0,100,100,0]", "policy.cpu_attention=true"],
    "zigzag-disk": ["schedule=zigzag", "policy.percent=[0,0,0,0,100,0]", "policy.cpu_attention=false",
                    "policy.gpu_batch_size=2", "policy.num_gpu_batches=2"],
    # activations on host: GPT-NeoX's [B, s, 2H] attn output travels through a tier
    "zigzag-host-acts": ["schedule=zigzag", "policy.percent=[0,100,0,100,0,100]", "policy.cpu_attention=true",
                         "policy.gpu_batch_size=2", "policy.num_gpu_batches=2"],
}
E2E = [("llama3-rope", "row-host-cpuattn"), ("mistral-window", "zigzag-disk"), ("qwen2", "zigzag-host-acts"),
       ("bloom", "row-host-cpuattn"), ("bloom", "zigzag-disk"), ("gpt_neox-parallel", "zigzag-host-acts"),
       ("gpt_neox-parallel", "zigzag-disk")]


@pytest.mark.parametrize("case,policy", E2E)
def test_llm_generate_matches_hf(case, policy, tmp_path):
    from graphgen.api import LLM

    cfg = _configs()[case]()
    model = make_checkpoint(cfg, tmp_path / "ckpt")
    ids, mask = prompts(vocab=cfg.vocab_size)
    gen = 5
    overrides = ["model.dtype=float32", f"hardware.offload_dir={tmp_path / 'offload'}"] + POLICIES[policy]
    with LLM(str(tmp_path / "ckpt"), overrides=overrides) as llm:
        out = llm.generate(ids, attention_mask=mask, max_new_tokens=gen)
    ref = hf_generate(model, ids, mask, gen)
    assert torch.equal(out[:, ids.shape[1]:ids.shape[1] + ref.shape[1]], ref), f"{case} {policy}"


def _longrope6():
    """longrope switching tables at 6 positions: prompts() straddle it (lengths 7, 4, 9), and the
    batch's longest sequence picks the table for all, as in HF."""
    return _llama(rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=6,
                                       short_factor=[1.0, 1.1, 1.3, 1.7], long_factor=[1.0, 2.0, 4.0, 8.0]))


def test_batch_wide_rotary_is_not_split(monkeypatch):
    from graphgen.models import base

    spec = build_spec(_longrope6())
    assert spec.batch_wide and not build_spec(_configs()["llama3-rope"]()).batch_wide
    w = {x.name: torch.randn(x.shape) for x in spec.layers[1].weights}
    ids, mask = prompts()
    h, pos = torch.randn(3, ids.shape[1], spec.hidden_size), positions_from_mask(mask)
    whole = spec.attn_qkv(w, h, pos)
    kept = base.in_row_chunks(lambda *a: spec.attn_qkv(w, *a), h, pos, rows=1, whole=spec.batch_wide)
    split = base.in_row_chunks(lambda *a: spec.attn_qkv(w, *a), h, pos, rows=1)
    assert all(torch.equal(a, b) for a, b in zip(kept, whole))
    assert not torch.allclose(split[0][1], whole[0][1])  # the 4-token sequence alone would take the short table


@pytest.mark.parametrize("case", ["llama3-rope", "bloom", "llama-longrope-6"])
def test_row_chunks_match_hf(case, tmp_path, monkeypatch):
    """The row-wise parts of each layer in chunks of one sequence (ROW_CHUNK_TOKENS lowered so the
    small prompts split): the same greedy tokens as transformers."""
    import executors.attention
    import executors.base
    from graphgen.api import LLM
    from graphgen.models import base

    monkeypatch.setattr(base, "ROW_CHUNK_TOKENS", 4)
    seen = []  # sequences per call of the family's hooks

    def chunks(fn, h, *rest, **kw):
        return base.in_row_chunks(lambda x, *r: seen.append(x.shape[0]) or fn(x, *r), h, *rest, **kw)
    for mod in (executors.attention, executors.base):
        monkeypatch.setattr(mod, "in_row_chunks", chunks)
    cfg = _longrope6() if case == "llama-longrope-6" else _configs()[case]()
    model = make_checkpoint(cfg, tmp_path / "ckpt")
    ids, mask = prompts(vocab=cfg.vocab_size)
    with LLM(str(tmp_path / "ckpt"), overrides=["model.dtype=float32"]) as llm:
        out = llm.generate(ids, attention_mask=mask, max_new_tokens=5)
    ref = hf_generate(model, ids, mask, 5)
    assert torch.equal(out[:, ids.shape[1]:ids.shape[1] + ref.shape[1]], ref)
    assert 1 in seen and ids.shape[0] in seen  # prefill in chunks of one sequence, decode whole
