"""Group-wise quantisation kernels: error bounds, exact sizes, layouts, bytes, KV cache slices."""
import json

import numpy as np
import pytest
import torch

from executors import quant as Q
from executors.quant import QTensor, dequantize, load_prefix, qempty, quantize, store_slice
from graphgen.quant_format import quantized_nbytes

CASES = [  # shape, group_dim
    ((64, 128), -1),
    ((64, 128), 0),
    ((37, 100), -1),  # 100 not a multiple of 64: padded
    ((37, 100), 0),  # 37 < 64: one padded group
    ((3, 130, 5), 1),  # middle group dim
]


def _group_scale(q: QTensor) -> torch.Tensor:
    """Each element's group scale, shaped like the original tensor."""
    gd, G = q.group_dim, q.group_size
    s = q.scales.float().expand(*q.data.shape[:gd + 1], G, *q.data.shape[gd + 2:])
    s = s.reshape(*s.shape[:gd], -1, *s.shape[gd + 2:])
    return s.narrow(gd, 0, q.shape[gd])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,gd", CASES)
def test_round_trip_error_within_half_scale(bits, shape, gd):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    q = quantize(x, bits, 64, gd)
    y = dequantize(q, dtype=torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    bound = _group_scale(q) / 2 + 1e-6 * x.abs().max()
    assert ((y - x).abs() <= bound).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_stored_min_and_scale_cover_each_group(bits):
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    q = quantize(x, bits)
    xg = x.view(16, 4, 64)
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    mn, sc = q.mins.float(), q.scales.float()
    assert (mn <= lo).all() and (mn + sc * (2 ** bits - 1) >= hi).all()


def test_eight_bits_beats_four_bits():
    x = torch.randn(128, 256, generator=torch.Generator().manual_seed(2))
    err = {b: (dequantize(quantize(x, b), torch.float32) - x).abs().mean() for b in (4, 8)}
    assert err[8] < err[4] / 10


def test_constant_and_zero_groups_are_exact():
    x = torch.cat([torch.zeros(4, 64), torch.full((4, 64), 0.75), torch.full((4, 64), -2.0)])
    for bits in (4, 8):
        y = dequantize(quantize(x, bits), torch.float32)
        assert torch.equal(y, x)


def test_bf16_output_is_float32_result_rounded():
    x = torch.randn(64, 192, generator=torch.Generator().manual_seed(3)).bfloat16()
    q = quantize(x, 4)
    assert q.dtype == torch.bfloat16
    y = dequantize(q)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, dequantize(q, torch.float32).bfloat16())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,gd", CASES + [((2, 9, 3, 2, 80), -1)])
@pytest.mark.parametrize("meta", [torch.bfloat16, torch.float16, torch.float32])
def test_nbytes_matches_size_only_formula(bits, shape, gd, meta):
    q = quantize(torch.randn(shape), bits, 64, gd, meta_dtype=meta)
    assert q.nbytes == quantized_nbytes(shape, bits, 64, gd, meta)
    assert q.data.dtype == torch.uint8 and q.mins.dtype == meta


def test_four_bit_weights_take_under_30_percent_of_bf16():
    for shape in [(4096, 4096), (12288, 49152), (256, 512)]:
        bf16 = 2 * shape[0] * shape[1]
        assert quantized_nbytes(shape, 4, 64) <= 0.30 * bf16
    x = torch.randn(256, 512).bfloat16()
    assert quantize(x, 4).nbytes <= 0.30 * x.numel() * x.element_size()
    assert quantize(x, 8).nbytes <= 0.55 * x.numel() * x.element_size()


def test_group_dim_changes_layout():
    x = torch.randn(128, 192)
    q_last, q_first = quantize(x, 4, 64, -1), quantize(x, 4, 64, 0)
    assert q_last.data.shape == (128, 3, 32) and q_last.mins.shape == (128, 3, 1)
    assert q_first.data.shape == (2, 32, 192) and q_first.mins.shape == (2, 1, 192)
    assert q_last.group_dim == 1 and q_first.group_dim == 0


@pytest.mark.parametrize("bits", [4, 8])
def test_serialise_round_trip_through_a_file(bits, tmp_path):
    x = torch.randn(3, 70, 5).bfloat16()
    q = quantize(x, bits, 64, 1, meta_dtype=torch.float16)
    buf, header = q.to_bytes()
    assert buf.dtype == torch.uint8 and buf.dim() == 1 and buf.numel() == q.nbytes
    path = tmp_path / "w.bin"
    buf.numpy().tofile(path)
    header = json.loads(json.dumps(header))
    r = QTensor.from_bytes(torch.from_numpy(np.fromfile(path, dtype=np.uint8)), header)
    for a, b in ((r.data, q.data), (r.mins, q.mins), (r.scales, q.scales)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert (r.shape, r.dtype, r.bits, r.group_dim) == (q.shape, q.dtype, q.bits, q.group_dim)
    assert torch.equal(dequantize(r), dequantize(q))


def test_from_bytes_rejects_truncated_buffer():
    buf, header = quantize(torch.randn(8, 64), 4).to_bytes()
    with pytest.raises(ValueError, match="truncated"):
        QTensor.from_bytes(buf[:-1], header)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d", [64, 80])
def test_cache_append_equals_quantising_the_whole(bits, d):
    # KV cache [2, S_max, B, nkv, d], grouped along head_dim; prefill 5 then decode 1 at a time
    s_max, prompt = 12, 5
    kv = torch.randn(2, s_max, 3, 2, d).bfloat16()
    cache = qempty(kv.shape, bits, 64, -1, dtype=torch.bfloat16)
    store_slice(cache, kv[:, :prompt], start=0)
    for p in range(prompt, s_max):
        store_slice(cache, kv[:, p:p + 1], start=p)
        got = load_prefix(cache, p + 1)
        want = dequantize(quantize(kv[:, :p + 1], bits, 64, -1))
        assert got.shape == (2, p + 1, 3, 2, d) and torch.equal(got, want)
    assert cache.nbytes == quantized_nbytes(kv.shape, bits, 64, -1)


def test_cache_store_out_of_range_says_what_to_do():
    cache = qempty((2, 4, 1, 1, 64), 4)
    with pytest.raises(ValueError, match="prompt_len"):
        store_slice(cache, torch.randn(2, 2, 1, 1, 64), start=3)


def test_blocked_kernels_match_single_block(monkeypatch):
    x = torch.randn(2, 33, 3, 4, 80).bfloat16()
    whole = {gd: quantize(x, 4, 64, gd) for gd in (-1, 1)}
    monkeypatch.setattr(Q, "CHUNK_NUMEL", 500)  # forces many blocks, some cut inside a dim
    for gd, qw in whole.items():  # gd=-1 is cut inside head_dim at group boundaries
        qb = quantize(x, 4, 64, gd)
        assert torch.equal(qb.data, qw.data) and torch.equal(qb.scales, qw.scales)
        assert torch.equal(dequantize(qb), dequantize(qw))
        narrowed = qw.narrow(0, 1, 1).narrow(3, 1, 2)  # non-contiguous view
        want = dequantize(quantize(x[1:2, :, :, 1:3], 4, 64, gd))
        assert torch.equal(dequantize(narrowed), want)
    w = torch.randn(200, 96).bfloat16()  # group dim 0 cut at group boundaries, padded tail
    monkeypatch.setattr(Q, "CHUNK_NUMEL", 1 << 20)
    qw = quantize(w, 4, 64, 0)
    monkeypatch.setattr(Q, "CHUNK_NUMEL", 300)
    qb = quantize(w, 4, 64, 0)
    assert torch.equal(qb.data, qw.data) and torch.equal(qb.mins, qw.mins)
    assert torch.equal(dequantize(qb), dequantize(qw))


def test_to_moves_all_parts():
    q = quantize(torch.randn(4, 64), 8).to("cpu", non_blocking=True)
    assert q.device.type == "cpu" and q.mins.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dequantize_on_gpu_matches_cpu():
    x = torch.randn(256, 320).bfloat16()
    q = quantize(x, 4)
    got = dequantize(q.pin_memory(), device="cuda")
    assert got.device.type == "cuda" and torch.equal(got.cpu(), dequantize(q))
    assert torch.equal(quantize(x.cuda(), 4).data.cpu(), q.data)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "4 or 8"),
    (dict(bits=4, group_size=63), "even"),
    (dict(bits=8, group_size=0), "positive"),
    (dict(bits=4, group_dim=2), "out of range"),
])
def test_bad_arguments_are_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(8, 64), **kwargs)


def test_group_dim_is_cut_only_at_group_boundaries():
    x = torch.randn(8, 150)
    q = quantize(x, 4, group_size=64, group_dim=-1)
    assert torch.equal(dequantize(q.narrow(1, 64, 86)), dequantize(q)[:, 64:])
    for start, length in [(0, 32), (32, 64), (64, 70)]:
        with pytest.raises(ValueError, match="group dim"):
            q.narrow(1, start, length)
    with pytest.raises(ValueError, match="outside"):
        q.narrow(0, 4, 5)
