"""GGUF checkpoints: transformers' GGUF loader is the oracle (same config, same dequantised
weights, same greedy tokens); Q4_0 / Q4_1 / Q8_0 matrices stay compressed, bit-exact."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graphgen import LLM
from graphgen.models.gguf import GGUFError, GGUFWeights, load
from graphgen.perf.accuracy import agreement, forced_logits

from ..conftest import left_padded_batch
from .gguf_files import tiny_model, write_gguf

ROOT = Path(__file__).resolve().parents[2]
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


@pytest.fixture(scope="module")
def models():
    return {f: tiny_model(f) for f in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    """(family, type) -> GGUF path, written lazily."""
    root, made = tmp_path_factory.mktemp("gguf"), {}

    def get(family, qtype):
        if (family, qtype) not in made:
            made[family, qtype] = write_gguf(models[family], root / f"{family}-{qtype}.gguf", qtype, family)
            if family == "mistral":  # the same weights in a file transformers reads as llama: see hf_gguf
                write_gguf(models[family], root / f"{family}-{qtype}-twin.gguf", qtype, "llama")
        return made[family, qtype]
    return get


def hf_gguf(path):
    """transformers' model from the GGUF file. Its loader reads a llama-architecture file named
    "mistral" as Mistral but then finds no "mistral" in the gguf package's tensor names, so for
    Mistral the weights come from the twin file (read as llama: same tensors, same un-permutation)
    and the model is transformers' Mistral with the file's config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not path.name.startswith("mistral"):
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    twin = path.with_name(path.stem + "-twin.gguf")
    weights = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=twin.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name),
                                             dtype=torch.float32)
    assert model.config.model_type == "mistral"
    model.load_state_dict(weights.state_dict())
    return model.eval()


def hf_greedy(model, ids, mask, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=1)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("qtype", TYPES)
def test_weights_equal_transformers_dequantised(files, family, qtype):
    """Every tensor, read dense or as the compressed parts it is stored in, equals what
    transformers' GGUF loader puts in its model (names mapped, q/k un-permuted)."""
    from executors.compressed import join
    from executors.quant import dequantize

    path = files(family, qtype)
    spec, src, _ = load(path, "tiny")
    assert spec.family == family
    ref = hf_gguf(path).state_dict()
    for layer in spec.layers:
        for w in layer.weights:
            assert torch.equal(src.get(w, torch.float32), ref[w.source]), w.source
            if layer.stored and w.compressible and len(w.shape) == 2:
                q = join(src.stored(w, layer.stored), w.shape, torch.float32, layer.stored)
                assert torch.equal(dequantize(q), ref[w.source]), w.source
    expect = {"Q4_0": (4, 32, -1), "Q4_1": (4, 32, -1), "Q8_0": (8, 32, -1)}.get(qtype)
    assert [layer.stored for layer in spec.layers] == [expect] * len(spec.layers)


@pytest.mark.parametrize("family,qtype,keep", [("llama", "Q4_1", True), ("llama", "Q4_1", False),
                                               ("mistral", "Q8_0", True), ("qwen2", "Q4_0", True),
                                               ("qwen2", "F16", True), ("llama", "BF16", True)])
def test_greedy_tokens_equal_transformers_gguf_loader(files, family, qtype, keep):
    path = files(family, qtype)
    ids, mask = left_padded_batch(4, 7)
    ref = hf_greedy(hf_gguf(path), ids, mask, 6)
    with LLM(str(path), ["model.dtype=float32", f"model.keep_quantized={str(keep).lower()}",
                         "policy.gpu_batch_size=2", "policy.num_gpu_batches=2"]) as llm:
        out = llm.generate(ids, mask, max_new_tokens=6)
        assert llm.source.kind == "gguf"
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family,qtype", [("llama", "Q4_1"), ("qwen2", "Q4_0"), ("mistral", "Q8_0")])
def test_bf16_computes_on_the_stored_blocks(files, family, qtype):
    """In bfloat16 the stored Q4_0 / Q4_1 / Q8_0 layers run on the int4 kernel as they are (no layer
    dequantised: executors/packed.py), as close to the exact float32 run as bfloat16 on the
    dequantised weights is (teacher-forced next-token distributions)."""
    path = files(family, qtype)
    ids, mask = left_padded_batch(4, 7)
    base = [f"policy.gpu_batch_size=4", "policy.num_gpu_batches=1"]
    with LLM(str(path), ["model.dtype=float32", *base]) as llm:
        ref, tokens = forced_logits(llm, ids, mask, 6)
    got = {}
    for on in ("true", "false"):
        with LLM(str(path), ["model.dtype=bfloat16", f"executor.packed_weights={on}", *base]) as llm:
            got[on] = agreement(ref, forced_logits(llm, ids, mask, 6, forced=tokens)[0])
            ex = llm.executor
            assert len(ex.packed_layers) == (len(llm.spec.layers) if on == "true" else 0)
            assert ("dequantize_s" in ex.stats) == (on == "false")
    assert got["true"]["kl"] <= 2 * got["false"]["kl"] + 1e-5 and got["true"]["top1"] >= got["false"]["top1"] - 0.05


def test_q4_1_costs_its_file_size_in_the_tiers_and_on_disk(files, tmp_path):
    """Kept compressed, a Q4_1 matrix takes 5 bits a weight (4-bit codes + float16 scale and min
    per 32), the bytes the file stores it in: planned, in the disk tier, over the links."""
    path = files("llama", "Q4_1")
    reader = GGUFWeights(path)
    file_bytes = sum(int(t.n_bytes) for t in reader.tensors.values() if len(t.shape) == 2)
    off = tmp_path / "off"
    with LLM(str(path), ["model.dtype=bfloat16", "policy.percent=[0,0,100,0,100,0]", "policy.gpu_batch_size=2",
                         "policy.num_gpu_batches=1", f"hardware.offload_dir={off}"]) as llm:
        llm.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), max_new_tokens=2)
        comp = llm.last_stats["compression"]["weight"]
        norms = sum(w.numel * 2 for layer in llm.spec.layers for w in layer.weights if len(w.shape) == 1)
        assert (comp["bits"], comp["group_size"]) == (4, 32)
        assert comp["bytes"] == file_bytes + norms
        assert llm.executor.tiers["disk"].used >= file_bytes  # weights live on disk compressed
        assert llm.executor.tiers["disk"].used < 0.4 * comp["dense_bytes"]
    numel = sum(math.prod(t.shape) for t in reader.tensors.values() if len(t.shape) == 2)
    assert file_bytes * 8 / numel == 5.0


def test_other_quant_types_dequantised_once_with_a_notice(models, tmp_path, capsys):
    """A layer whose matrices are not all Q4_0/Q4_1/Q8_0 alike (here one Q5_0) is dequantised at load."""
    path = write_gguf(models["llama"], tmp_path / "mixed.gguf", "Q4_1", types={"blk.0.attn_v.weight": "Q5_0"})
    spec, src, notice = load(path, "mixed")
    assert "1 Q5_0" in notice and "3 Q4_1" in notice and "mixed.gguf" in notice
    stored = [layer.stored for layer in spec.layers]
    assert stored[1] is None and stored[2] == (4, 32, -1)  # block 0's attention layer: dense
    ref = hf_gguf(path)
    ids, mask = left_padded_batch(2, 5)
    with LLM(str(path), ["model.dtype=float32", "policy.gpu_batch_size=2"]) as llm:
        assert torch.equal(llm.generate(ids, mask, max_new_tokens=4), hf_greedy(ref, ids, mask, 4))
    assert "dequantising" in capsys.readouterr().err


def _bad_files(models, files, tmp_path):
    good = files("llama", "Q4_1").read_bytes()
    out = {}
    for name, data in {"truncated": good[: len(good) // 2], "header-only": good[:300],
                       "not-gguf": b"<html>404 Not Found</html>\n" * 20, "empty": b""}.items():
        (tmp_path / f"{name}.gguf").write_bytes(data)
        out[name] = (tmp_path / f"{name}.gguf", "truncated or corrupt")
    out["int-matrix"] = (write_gguf(models["llama"], tmp_path / "int-matrix.gguf", "Q4_1",
                                    types={"blk.1.ffn_up.weight": "I32"}), "type I32")
    out["unknown-arch"] = (write_gguf(models["llama"], tmp_path / "unknown-arch.gguf", arch="rwkv6"),
                           "not supported")
    out["gpt2-arch"] = (write_gguf(models["llama"], tmp_path / "gpt2-arch.gguf", arch="phi3"), "phi3")
    return out


def test_bad_gguf_files_give_clear_errors_and_leave_nothing(models, files, tmp_path):
    off = tmp_path / "off"
    for name, (path, words) in _bad_files(models, files, tmp_path).items():
        with pytest.raises(GGUFError) as e:
            LLM(str(path), [f"hardware.offload_dir={off}", "policy.percent=[0,0,100,0,100,0]"])
        assert path.name in str(e.value) and words in str(e.value), (name, str(e.value))
    assert not off.exists() or not any(off.iterdir())


def test_cli_reports_a_bad_gguf_in_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 40)
    r = subprocess.run([sys.executable, "-m", "graphgen", f"model.path={bad}", f"hydra.run.dir={tmp_path}/run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "graphgen: error:" in r.stderr and "model.gguf" in r.stderr and "Traceback" not in r.stderr


def test_missing_gguf_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf download"):
        LLM(str(tmp_path / "nowhere.gguf"), ["model.weights=hf"])
