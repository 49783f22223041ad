"""Compressed weights computed on by packed kernels (executors/packed.py)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from executors.packed import PackedWeight, _layout_known, packable, pack, prepack, wrap
from graphgen.quant_format import STORED8_KERNEL_ROWS
from executors.quant import dequantize, quantize
from graphgen import LLM
from graphgen.models.base import ModelSpec

from ..conftest import left_padded_batch
from ..models.test_model_families import _llama, make_checkpoint


def matrix(name="w", shape=(48, 64), kind="mlp", stored=None):
    w = SimpleNamespace(name=name, shape=shape, compressible=True)
    return SimpleNamespace(kind=kind, weights=[w], stored=stored), w


def packed(bits, x, kind="mlp", group=32, dtype=torch.float32) -> PackedWeight:
    layer, w = matrix(shape=tuple(x.shape), kind=kind)
    comp = (bits, group, -1)
    return wrap(layer, pack(layer, w, x, comp), comp, dtype)["w"]


def packed_stored(q, kind="mlp", dtype=torch.bfloat16) -> PackedWeight:
    """A matrix kept in a checkpoint's exact compression (its parts q, as a GGUF's Q4_x / Q8_0 are)."""
    comp = (q.bits, q.group_size, -1)
    layer, w = matrix(shape=q.shape, kind=kind, stored=comp)
    parts = {"data": q.data, "mins": q.mins.half(), "scales": q.scales.half()}  # GGUF: float16 d and m
    return wrap(layer, pack(layer, w, None, comp, parts), comp, dtype)["w"]


def test_packable_needs_kernel_shapes():
    comp = (4, 32, -1)
    assert packable(matrix(shape=(48, 64))[0], comp)
    assert not packable(matrix(shape=(40, 64))[0], comp)  # int4 kernel: N a multiple of 16
    assert not packable(matrix(shape=(48, 48))[0], comp)  # groups must divide the input dim
    assert not packable(matrix(shape=(48, 64))[0], (4, 16, -1))  # group size the kernel lacks
    assert not packable(matrix(shape=(48, 64))[0], (4, 32, 0))  # groups along the output dim
    assert packable(matrix(shape=(40, 48))[0], (8, 64, -1))  # int8: per channel, any shape
    assert packable(matrix(shape=(40, 48), kind="embed")[0], (4, 16, -1))  # rows: graphgen's format
    assert not packable(matrix()[0], None)


def test_stored_layers_go_on_the_kernels_in_bf16_only():
    """A checkpoint's exact Q4_x / Q8_0 layers: int4 kernel in bf16 (8-bit up to STORED8_KERNEL_ROWS
    rows, the head's batch), float32 keeps the exact dequantising path; row lookups are exact in both."""
    bf, f32 = torch.bfloat16, torch.float32
    q4, q8 = (4, 32, -1), (8, 32, -1)
    assert packable(matrix(stored=q4)[0], q4, bf) and not packable(matrix(stored=q4)[0], q4, f32)
    assert packable(matrix(stored=q8)[0], q8, bf, rows=STORED8_KERNEL_ROWS)
    assert not packable(matrix(stored=q8)[0], q8, bf, rows=STORED8_KERNEL_ROWS + 1)
    assert not packable(matrix(shape=(40, 64), stored=q8)[0], q8, bf)  # two int4 halves: int4's shapes
    assert packable(matrix(kind="embed", stored=q8)[0], q8, f32, rows=1000)


@pytest.mark.parametrize("bits", [4, 8])
def test_stored_parts_on_the_kernel_equal_the_checkpoints_values(bits):
    """Q4_1 (min + d * code) on the int4 kernel, Q8_0 as two int4 halves (code = 16 hi + lo): the
    kernel's weights are the stored values up to bfloat16 rounding of d and min + 8d, and its
    products those of that matrix (the values as a GGUF stores them: float16 d and m)."""
    x = torch.randn(48, 64)
    q = quantize(x, bits, 32, -1)
    q.mins, q.scales = q.mins.half(), q.scales.half()
    W = packed_stored(q)
    assert W.kind == ("int4" if bits == 4 else "int4x2")
    want = dequantize(q, torch.float32)
    assert (W.dense().float() - want).abs().max() <= 2 ** -7 * want.abs().max()
    for rows in (3, 1100):  # the kernel; above INT4_KERNEL_ROWS the dense copy and one GEMM
        inp = torch.randn(rows, 64).bfloat16()
        torch.testing.assert_close(F.linear(inp, W).float(), F.linear(inp, W.dense()).float(), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("bits,rows", [(4, 192), (8, 128), (4, 48)])
def test_dense_reads_the_packed_codes_as_the_kernel_does(bits, rows):
    """dense() (prefill's dense copy) unpacks the kernel's layout (rows a multiple of 64; otherwise
    it runs the kernel on an identity): bit for bit what the kernel computes with."""
    q = quantize(torch.randn(rows, 64), bits, 32, -1)
    for dtype in (torch.float32, torch.bfloat16):
        W = packed_stored(q, dtype=dtype)
        assert _layout_known(*W.a.shape) == (rows % 64 == 0)
        assert torch.equal(W.dense(), W._int4(torch.eye(64, dtype=dtype)).t())


def test_stored_embedding_keeps_the_exact_parts():
    q = quantize(torch.randn(96, 64), 8, 32, -1)
    q.mins, q.scales = q.mins.half(), q.scales.half()
    E = packed_stored(q, kind="embed", dtype=torch.float32)
    ids = torch.tensor([[3, 95]])
    assert torch.equal(F.embedding(ids, E), dequantize(q, torch.float32)[ids])


def test_int4_is_graphgens_group_scheme_on_the_kernel():
    x = torch.randn(48, 64)
    W = packed(4, x)
    want = dequantize(quantize(x, 4, 32, -1), torch.float32)
    # the kernel's zero point (min + 8 scale) is rounded to bfloat16 once: within that rounding
    assert (W.dense() - want).abs().max() <= 2 ** -8 * x.abs().max()
    for rows in (3, 400):  # the kernel; above INT4_KERNEL_ROWS the dense copy and one GEMM
        inp = torch.randn(5, rows, 64)
        torch.testing.assert_close(F.linear(inp, W), F.linear(inp, W.dense()), rtol=1e-5, atol=1e-5)


def test_int8_is_per_channel_symmetric_within_half_a_step():
    x = torch.randn(40, 48)
    W = packed(8, x, group=64)
    step = x.abs().amax(1, keepdim=True) / 127
    assert ((W.dense() - x).abs() <= step * 0.5 * 1.01).all()
    bias = torch.randn(40)
    for rows in (7, 100):  # the kernel; above INT8_KERNEL_ROWS dequantised into one GEMM
        inp = torch.randn(rows, 48)
        torch.testing.assert_close(F.linear(inp, W, bias), F.linear(inp, W.dense(), bias), rtol=1e-5, atol=1e-5)


def test_bf16_inputs_use_the_kernels_in_bf16():
    x = torch.randn(48, 64)
    W = packed(4, x, dtype=torch.bfloat16)
    out = F.linear(torch.randn(2, 64).bfloat16(), W)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 48)


def test_embedding_dequantises_only_the_rows_looked_up(monkeypatch):
    x = torch.randn(96, 64)
    E = packed(4, x, kind="embed")
    monkeypatch.setattr(PackedWeight, "dense", lambda self: pytest.fail("the whole table was dequantised"))
    ids = torch.tensor([[3, 95], [0, 3]])
    want = dequantize(quantize(x, 4, 32, -1), torch.float32)[ids]
    assert torch.equal(F.embedding(ids, E), want)


@pytest.fixture(scope="module")
def llama16(tmp_path_factory):
    """A tiny GQA Llama whose matrices fit the int4 kernel (multiples of 16, groups of 32)."""
    path = tmp_path_factory.mktemp("llama16")
    return path, make_checkpoint(_llama(hidden_size=64, intermediate_size=128, num_key_value_heads=2), path)


def run(path, *overrides, executor="reference"):
    ids, mask = left_padded_batch(5)
    with LLM(str(path), ["model.dtype=float32", "policy.gpu_batch_size=5", "policy.num_gpu_batches=1",
                         "policy.compress_weight.group_size=32", f"executor.name={executor}", *overrides]) as llm:
        out = llm.generate(ids, attention_mask=mask, max_new_tokens=6)
        return out, llm.executor, ids, mask


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_run_matches_hf_with_the_kernels_weights(llama16, bits):
    """The engine computes on the packed weights: HF with every compressed matrix replaced by the
    kernel's effective weights generates the same tokens (float32, greedy)."""
    path, model = llama16
    out, ex, ids, mask = run(path, f"policy.compress_weight.bits={bits}")
    assert len(ex.packed_layers) == len(ex.spec.layers) and "dequantize_s" not in ex.stats
    fake = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in fake.named_parameters():
            if p.dim() >= 2:
                kind = "embed" if "embed" in name else "mlp"
                p.copy_(packed(bits, p.detach().clone(), kind=kind).dense())
        want = fake.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, want)


def test_async_identical_and_false_switch_dequantises(llama16):
    path, _ = llama16
    ref, _, _, _ = run(path, "policy.compress_weight.bits=4")
    out, _, _, _ = run(path, "policy.compress_weight.bits=4", executor="async")
    assert torch.equal(out, ref)
    _, ex, _, _ = run(path, "policy.compress_weight.bits=4", "executor.packed_weights=false")
    assert not ex.packed_layers and ex.stats["dequantize_s"] > 0


def test_a_fused_group_is_one_matrix_split_like_separate_linears():
    """prepack joins a group of linears on one input (a missing bias counts as zeros); the model's
    linears() runs it as one GEMM and splits the output as the separate linears would give it."""
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (32, 16), "k": (16, 16), "v": (16, 16)}
    layer = SimpleNamespace(kind="attn", weights=[SimpleNamespace(name=f"{n}.weight", shape=sh, compressible=True)
                                                  for n, sh in shapes.items()])
    value = {f"{n}.weight": torch.randn(*sh, generator=g).bfloat16() for n, sh in shapes.items()}
    value["q.bias"], value["v.bias"] = torch.randn(32).bfloat16(), torch.randn(16).bfloat16()
    w = wrap(layer, prepack(layer, value, 4, [("q", "k", "v")]), None, torch.bfloat16)
    assert set(w) == {"q+k+v.weight", "q+k+v.bias"} and w["q+k+v.weight"].parts == [32, 16, 16]
    x = torch.randn(4, 16, generator=g).bfloat16()
    got = ModelSpec.linears(None, w, x, "q", "k", "v")
    want = [F.linear(x, value[f"{n}.weight"], value.get(f"{n}.bias")) for n in shapes]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert ModelSpec.linears(None, value, x, "q", "k", "v")[1].shape == (4, 16)  # unfused: one linear each


def test_prepacked_bf16_layers_fuse_their_linears_and_keep_the_tokens(llama16):
    """Dense bf16 weights on the device are reordered once for oneDNN, q/k/v and gate/up each as
    one matrix; the generated tokens do not change."""
    path, _ = llama16
    ids, mask = left_padded_batch(5)
    outs = []
    for on in ("true", "false"):
        with LLM(str(path), ["model.dtype=bfloat16", "policy.gpu_batch_size=5", "policy.num_gpu_batches=1",
                             f"executor.packed_weights={on}"]) as llm:
            outs.append(llm.generate(ids, attention_mask=mask, max_new_tokens=6))
            layers = llm.executor.packed_layers
            assert layers == (set(range(1, len(llm.spec.layers))) if on == "true" else set())  # not the embedding
            names = set(llm.executor.tiers["device"].get(("w", 1))) | set(llm.executor.tiers["device"].get(("w", 2)))
            fused = {"q_proj+k_proj+v_proj.weight", "gate_proj+up_proj.weight"}
            assert fused <= names if on == "true" else not fused & names
    assert torch.equal(*outs)


def test_reuse_dense_makes_one_dense_copy_per_matrix_in_its_scope(monkeypatch):
    """A prefill computed in chunks of sequences unpacks each int4 matrix once per square."""
    import executors.packed as packed_mod

    W = packed(4, torch.randn(48, 64), dtype=torch.bfloat16)
    made = []
    real = PackedWeight.dense
    monkeypatch.setattr(PackedWeight, "dense", lambda self: made.append(1) or real(self))
    x = torch.randn(packed_mod.INT4_KERNEL_ROWS + 2, 64, dtype=torch.bfloat16)
    y0 = F.linear(x, W)
    with packed_mod.reuse_dense():
        y1, y2 = F.linear(x, W), F.linear(x[:-1], W)
    F.linear(x, W)
    assert len(made) == 3  # outside, once in the scope, outside again
    assert torch.equal(y0, y1) and torch.equal(y1[:-1], y2)
