"""Compression (passes/compress.py, executors/compressed.py): bytes planned compressed, budgets
that fit only compressed, identical runs whatever the schedule / placement / CPU attention /
executor, and accuracy against the uncompressed run (teacher-forced, graphgen/accuracy.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from executors import EXECUTORS
from executors.quant import dequantize, quantize
from graphgen.quant_format import quantized_nbytes
from graphgen import LLM
from graphgen.perf.accuracy import agreement, forced_logits
from graphgen.build import build_graph
from graphgen.config import compose
from graphgen.costs import is_compressed
from graphgen.models import build_spec, hf_config_from_arch
from passes import PassError, run_pipeline

from ..conftest import left_padded_batch, make_opt
from .graphs import TINY, compiled as compiled_cfg

W4 = "policy.compress_weight.bits=4"
C8 = "policy.compress_cache.bits=8"
ALL_HOST = "policy.percent=[0,100,0,100,100,0]"
DEQUANT = "executor.packed_weights=false"  # FlexGen's path: a dense working copy per layer run


def compiled(overrides=(), names=None):
    """The pass tests' tiny graph, configured by CLI-style overrides (the compress keys' names)."""
    return compiled_cfg(compose(list(overrides)), names)


def layer_bytes(layer, bits, itemsize=4):
    return sum(quantized_nbytes(w.shape, bits) if is_compressed(w) else w.numel * itemsize
               for w in layer.weights)


# --- the pass ------------------------------------------------------------------------------------

def test_off_records_no_compression_and_keeps_sizes():
    plain, _ = compiled(names=["order", "place_tensors"])
    g, _ = compiled(names=["order", "place_tensors", "compress"])
    assert g.graph["compression"] == {"weight": None, "cache": None}
    for n in ((0, 1, 0), (2, 1, 3), (1, 2, 1)):
        a, b = g.nodes[n], plain.nodes[n]
        assert a["w_compressed"] is None and a["w_bytes"] == b["w_bytes"] and "w_work_bytes" not in a
    assert g.nodes[(2, 1, 0)]["kv_read"] == plain.nodes[(2, 1, 0)]["kv_read"]


def test_planned_bytes_of_a_compressed_layer_equal_quantized_nbytes():
    g, _ = compiled([W4, C8, ALL_HOST, DEQUANT])  # tiny OPT: B=2, prompt 4, 3 tokens, float32
    spec, sh = g.graph["spec"], g.graph["shape"]
    for layer in spec.layers:
        a = g.nodes[(0, layer.index, 0)]
        assert a["w_compressed"] == (4, 64, -1)
        assert a["w_bytes"] == layer_bytes(layer, 4) < a["w_work_bytes"] == layer.numel * 4
        dense = [w for w in layer.weights if not is_compressed(w)]
        assert all(len(w.shape) == 1 for w in dense)  # biases and norms stay dense
        assert dense or layer.kind == "embed"
    cache = lambda n: quantized_nbytes((2, n, sh.batch, spec.num_kv_heads, spec.head_dim), 8)  # noqa: E731
    a = g.nodes[(2, 1, 0)]  # decode step 2: 5 positions cached, 1 written, 4 + 3 in all
    assert a["kv_compressed"] == (8, 64, -1)
    assert (a["kv_bytes"], a["kv_read"], a["kv_write"]) == (cache(7), cache(5), cache(1))
    # links carry compressed bytes; the device holds the dequantised working copy
    load = g.nodes[("load", "w", 2, g.nodes[(0, 2, 0)]["order"])]
    assert (load["bytes"], load["held"]) == (layer_bytes(spec.layers[2], 4), spec.layers[2].numel * 4)
    assert g.graph["peak_bytes"]["host"] == sum(layer_bytes(layer, 4) for layer in spec.layers) + 4 * cache(7)
    c = g.graph["compression"]["weight"]
    assert c["bytes"] == sum(layer_bytes(layer, 4) for layer in spec.layers) and c["ratio"] < 1


def test_device_weights_stay_compressed_and_dequantise_once_per_run():
    g, _ = compiled([W4, "schedule=zigzag", "policy.percent=[100,0,100,0,100,0]", DEQUANT])
    loads = [g.nodes[m] for m in g.graph["ops"] if g.nodes[m].get("op") == "load"]
    assert len(loads) == 3 * 4  # tokens x layers, not per GPU batch
    assert all(b["src"] == "device" and b["bytes"] == 0 for b in loads)  # nothing moves; dequantise


def test_first_square_of_each_run_dequantises_and_the_cost_model_prices_it_there():
    # zig-zag: a run is one layer over the GPU batches; a GPU machine's plan (on a CPU the host ->
    # device loads are copies within RAM, run inline: passes/insert_io.py)
    g, _ = compiled([W4, "schedule=zigzag", ALL_HOST, DEQUANT, "hardware.device=cuda"])
    squares = [n for n in g.graph["ops"] if "kind" in g.nodes[n]]
    first = {}
    for n in squares:  # schedule order: the first square reading each working copy
        first.setdefault(g.nodes[n]["w_buf"], n)
    assert {n for n in squares if g.nodes[n].get("w_dequant")} == set(first.values())
    for n in first.values():
        assert g.nodes[n]["w_dequant"] == g.nodes[n]["w_work_bytes"]
    from graphgen.perf.costmodel import CostModel

    model = CostModel({"dequant_bw": 1e9, "device_flops_float32": 1e12, "h2d_bw": 1e10, "d2h_bw": 1e10,
                       "device_is_host": 0.0}, "float32", "cuda")
    n = next(iter(first.values()))
    load = next(g.nodes[m] for m in g.predecessors(n) if g.nodes[m].get("op") == "load")
    assert model.io_s(load) == pytest.approx(load["bytes"] / 1e10)  # the link only: moved compressed
    parts = model.compute_parts(g.nodes[n], 0.0)
    assert parts["dequant"] == pytest.approx(g.nodes[n]["w_work_bytes"] / 1e9)
    later = next(m for m in squares if g.nodes[m]["w_buf"] == g.nodes[n]["w_buf"] and m != n)
    assert "dequant" not in model.compute_parts(g.nodes[later], 0.0)


def test_packed_layers_are_computed_on_as_stored():
    """CPU, executor.packed_weights (default): layers the kernels take never dequantise; on the
    device they are read where they live (no load, no working copy)."""
    g, _ = compiled([W4, "schedule=zigzag", "policy.percent=[100,0,100,0,100,0]"])
    embed = g.nodes[(0, 0, 0)]  # tiny OPT: only the embedding (row lookups) fits; its matrices 16 wide
    assert embed["w_packed"] and embed["w_work_bytes"] == embed["w_bytes"] and embed["w_buf"] is None
    assert not any(g.nodes[n].get("w_dequant") for n in g.graph["ops"] if g.nodes[n].get("w_packed"))
    other = g.nodes[(0, 1, 0)]  # 16-wide rows do not fill the kernel's groups: dequantised as before
    assert not other["w_packed"] and other["w_buf"] is not None
    g, _ = compiled([W4, "schedule=zigzag", ALL_HOST, "hardware=cuda"])  # a GPU dequantises
    assert not any(g.nodes[n].get("w_packed") for n in g.graph["ops"])


def wide(overrides):
    """A tiny OPT whose rows fill 64-value groups, bfloat16: weights shrink to ~28%."""
    cfg = compose(list(overrides))
    spec = build_spec(hf_config_from_arch(dict(TINY, hidden_size=128, ffn_dim=512, word_embed_proj_dim=128)))
    g = build_graph(spec, batch=2, num_batches=2, prompt_len=8, gen_len=4, dtype="bfloat16")
    return run_pipeline(g, cfg)


@pytest.mark.parametrize("dtype,batch,packed", [("bfloat16", 2, (True, True)), ("float32", 2, (False, False)),
                                                 ("bfloat16", 64, (True, False))])
def test_checkpoint_compression_on_the_kernels(dtype, batch, packed):
    """Layers a checkpoint stores compressed (a GGUF's Q4_1 layer, a Q8_0 head) run on the int4 kernel
    in bfloat16; float32 keeps the exact dequantising path; the Q8_0 head (its rows: the batch) only
    up to STORED8_KERNEL_ROWS, and as two int4 halves it counts their bytes (1.25 per weight)."""
    spec = build_spec(hf_config_from_arch(dict(TINY, hidden_size=128, ffn_dim=512, word_embed_proj_dim=128)))
    attn, head = spec.layers[1], spec.layers[-1]
    attn.stored, head.stored = (4, 32, -1), (8, 32, -1)
    g = build_graph(spec, batch=batch, num_batches=1, prompt_len=8, gen_len=2, dtype=dtype)
    g = run_pipeline(g, compose([f"model.dtype={dtype}", f"policy.gpu_batch_size={batch}"]))
    a, h = g.nodes[(0, 1, 0)], g.nodes[(0, len(spec.layers) - 1, 0)]
    assert (a["w_compressed"], h["w_compressed"]) == (attn.stored, head.stored)
    assert (a["w_packed"], h["w_packed"]) == packed
    (N, K), = [w.shape for w in head.weights if is_compressed(w)]
    head_bytes = h["w_bytes"] - sum(w.numel * g.graph["shape"].itemsize for w in head.weights if not is_compressed(w))
    assert head_bytes == (N * K * 5 // 4 if packed[1] else quantized_nbytes((N, K), 8, 32))


def test_plan_that_fits_only_compressed():
    need = wide([ALL_HOST]).graph["peak_bytes"]["host"]
    squeezed = [ALL_HOST, f"hardware.host_mem={need // 2}"]
    with pytest.raises(PassError, match="hardware.host_mem"):
        wide(squeezed)
    g = wide(squeezed + [W4])
    assert g.graph["peak_bytes"]["host"] <= need // 2
    assert 0.27 < g.graph["compression"]["weight"]["ratio"] < 0.3


def test_bad_settings_name_the_key():
    with pytest.raises(PassError, match="policy.compress_weight.bits=3"):
        compiled(["policy.compress_weight.bits=3"])
    with pytest.raises(PassError, match="policy.compress_cache.group_dim=1"):
        compiled(["policy.compress_cache.bits=4", "policy.compress_cache.group_dim=1"])
    with pytest.raises(PassError, match="no 'compress' pass"):
        compiled([W4], names=["order", "place_tensors", "delegate_cpu_attention", "insert_io"])


# --- the engine ----------------------------------------------------------------------------------

RUNS = [  # (schedule, percent, cpu_attention)
    ("row", "[0,100,0,100,100,0]", False),
    ("zigzag", "[0,0,0,0,0,0]", True),
    ("row", "[30,30,40,30,20,50]", True),
    ("zigzag", "[30,30,40,30,20,50]", False),
]


def generate(path, offload_dir, *overrides, n=5, gen=5):
    ids, mask = left_padded_batch(n)
    llm = LLM(str(path), ["model.dtype=float32", "policy.gpu_batch_size=2", "policy.num_gpu_batches=3",
                          f"hardware.offload_dir={offload_dir}", *overrides])
    with llm:
        return llm.generate(ids, attention_mask=mask, max_new_tokens=gen), llm


def test_compressed_runs_are_identical_everywhere(opt_ckpt, offload_dir):
    path, _ = opt_ckpt
    comp = ["policy.compress_weight.bits=4", "policy.compress_cache.bits=4"]
    want, _ = generate(path, offload_dir, *comp, "schedule=zigzag", "policy.percent=[100,0,100,0,100,0]")
    runs = [(s, p, c, "reference") for s, p, c in RUNS] + [("zigzag", RUNS[2][1], True, e)
                                                            for e in EXECUTORS if e != "reference"]
    for schedule, percent, cpu_attn, executor in runs:
        out, llm = generate(path, offload_dir, *comp, f"schedule={schedule}", f"policy.percent={percent}",
                            f"policy.cpu_attention={str(cpu_attn).lower()}", f"executor.name={executor}")
        assert torch.equal(out, want), (schedule, percent, cpu_attn, executor)
        assert llm.last_stats["compression"]["cache"]["bits"] == 4


def test_tiers_hold_and_move_what_the_plan_says(opt_ckpt, offload_dir):
    path, _ = opt_ckpt
    ids, mask = left_padded_batch(5)
    with LLM(str(path), ["model.dtype=float32", "policy.gpu_batch_size=2", "policy.num_gpu_batches=1",
                         f"hardware.offload_dir={offload_dir}", W4, C8, ALL_HOST]) as llm:
        llm.generate(ids, attention_mask=mask, max_new_tokens=3)
        g, tier = llm.graph, llm.executor.tiers["host"]
        for j in range(g.graph["num_layers"]):
            assert tier.sizes[("w", j)] == g.nodes[(0, j, 0)]["w_bytes"]  # quantised once, counted compressed
        weights = sum(g.nodes[(0, j, 0)]["w_bytes"] for j in range(g.graph["num_layers"]))
        assert llm.last_stats["measured_peak_bytes"]["host"] == g.graph["peak_bytes"]["host"] > weights
        loads = sum(g.nodes[m]["bytes"] for m in g.graph["ops"] if g.nodes[m].get("op") == "load")
        assert llm.last_stats["bytes_moved"]["host->device"] == 3 * loads  # three blocks of the plan


@pytest.fixture(scope="module")
def peaked_ckpt(tmp_path_factory):
    """A random OPT wide enough for 64-value groups, with peakier next-token distributions."""
    path = tmp_path_factory.mktemp("opt-acc")
    make_opt(path, vocab_size=512, hidden_size=64, ffn_dim=128, word_embed_proj_dim=64, init_std=0.1)
    return path


def hf_model(path):
    from transformers import OPTForCausalLM

    return OPTForCausalLM.from_pretrained(str(path)).eval()


def test_accuracy_against_the_uncompressed_run(peaked_ckpt, offload_dir):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 512, (16, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, :4] = 0
    base = ["model.dtype=float32", "policy.gpu_batch_size=8", "policy.num_gpu_batches=2",
            f"hardware.offload_dir={offload_dir}", ALL_HOST, "policy.cpu_attention=true"]
    with LLM(str(peaked_ckpt), base) as llm:
        ref, tokens = forced_logits(llm, ids, mask, 6)
    got = {}
    for name, extra in {"w8c8": ["policy.compress_weight.bits=8", C8], "w4": [W4],
                        "c4": ["policy.compress_cache.bits=4"]}.items():
        with LLM(str(peaked_ckpt), base + extra) as llm:
            got[name] = agreement(ref, forced_logits(llm, ids, mask, 6, forced=tokens)[0])
    assert got["w8c8"]["top1"] >= 0.9 and got["w8c8"]["kl"] < 1e-3  # near lossless
    assert got["w4"]["top1"] >= 0.5 and got["w4"]["kl"] < 0.05
    assert got["c4"]["top1"] >= 0.8 and got["c4"]["kl"] < 5e-3
    assert got["w8c8"]["kl"] < got["w4"]["kl"]


@pytest.mark.parametrize("bits,group_dim", [(4, -1), (8, 0)])
def test_compressed_weights_match_hf_with_dequantised_weights(peaked_ckpt, offload_dir, bits, group_dim):
    """The engine's weight path is exactly quantise-once, dequantise-before-use: HF with every
    matrix replaced by dequantize(quantize(w)) generates the same tokens (float32, greedy)."""
    model = hf_model(peaked_ckpt)
    fake = copy.deepcopy(model)
    with torch.no_grad():
        for p in fake.parameters():
            if p.dim() >= 2:
                p.copy_(dequantize(quantize(p, bits, 64, group_dim)))
    ids, mask = left_padded_batch(6)
    with torch.no_grad():
        want = fake.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    out, _ = generate(peaked_ckpt, offload_dir, f"policy.compress_weight.bits={bits}", ALL_HOST,
                      f"policy.compress_weight.group_dim={group_dim}", "executor.packed_weights=false", n=6, gen=8)
    assert torch.equal(out, want)
    assert not torch.equal(plain, want)


def fake_quant_cache(bits):
    """An HF cache that keeps quantise-dequantise(K/V) and attends with the new slice dense, as
    graphgen does (groups along head_dim: the same groups as graphgen's [2, s, B, nkv, d])."""
    from transformers import DynamicCache

    class FakeQuantCache(DynamicCache):
        def update(self, k, v, layer_idx, *args, **kwargs):
            fq = lambda t: dequantize(quantize(t, bits, 64, -1))  # noqa: E731
            K, V = super().update(fq(k), fq(v), layer_idx, *args, **kwargs)
            s = k.shape[2]
            return torch.cat([K[:, :, :-s], k], 2), torch.cat([V[:, :, :-s], v], 2)

    return FakeQuantCache()


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_cache_matches_hf_with_a_fake_quantised_cache(peaked_ckpt, offload_dir, bits):
    """The cache path: stored quantised, the new slice attended dense (FlexGen's semantics)."""
    model = hf_model(peaked_ckpt)
    ids, mask = left_padded_batch(6)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              past_key_values=fake_quant_cache(bits))
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    out, _ = generate(peaked_ckpt, offload_dir, f"policy.compress_cache.bits={bits}", ALL_HOST,
                      "policy.cpu_attention=true", n=6, gen=8)
    assert torch.equal(out, want)
    assert not torch.equal(plain, want)  # the cache's rounding shows: the check has teeth


def test_report_says_what_is_compressed():
    from graphgen.report.text import compression_line

    c = wide([W4]).graph["compression"]
    want = f"weights 4-bit g64 ({c['weight']['bytes'] / 1e6:.2f} MB, {c['weight']['ratio']:.0%} of dense)"  # < 10 MB
    assert compression_line(c) == ["compression   " + want] and c["cache"] is None
    assert compression_line({"weight": None, "cache": None}) == []
