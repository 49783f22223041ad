"""Hardware profiler: measures the constants the cost model needs and caches them per host.

`measure()` times the primitives a FlexGen-style schedule is made of: matmuls shaped like
LLM layers (prefill: many tokens; decode: one token per sequence), attention, host<->device
copies and sequential disk I/O that bypasses the page cache. The result is a flat
`{key: float}` dict (keys and units in PROFILE_KEYS), the same shape as
`HardwareConfig.profile`, so a measured profile and a published one (conf/hardware/
t4-flexgen.yaml) are interchangeable. `load_or_measure()` caches it as JSON under
$GRAPHGEN_CACHE_DIR, else $XDG_CACHE_HOME/graphgen, else ~/.cache/graphgen.

    python -m graphgen.hardware_profile [--device cpu] [--offload-dir DIR] [--quick] [--refresh]
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

VERSION = 3  # bump when keys or methods change: cached profiles of another version are re-measured

PROFILE_KEYS: Dict[str, str] = {
    # matmul (B*s, H) x (H, 4H): one per dtype the device computes in
    "device_flops_<dtype>": "matmul throughput on the compute device, prefill shape (B*s, H) x (H, 4H) "
                            "(FLOP/s; FlexGen mm_flops_p)",
    "device_flops_decode_<dtype>": "matmul throughput on the compute device, decode shape (B, H) x (H, 4H), "
                                   "weight-bandwidth bound (FLOP/s; FlexGen mm_flops_g)",
    "device_bmm_flops_<dtype>": "prefill causal attention (SDPA with an additive mask) on the device, "
                                "counted as 4*B*heads*s*s*head_dim FLOPs (FLOP/s; FlexGen bmm_flops_p)",
    "cpu_flops_<dtype>": "matmul throughput on the host CPU, prefill shape (FLOP/s)",
    "cpu_flops_decode_<dtype>": "matmul throughput on the host CPU, decode shape (FLOP/s)",
    # decode attention: one query token against the whole KV cache. FlexGen charges it
    # 4*B*S*H FLOPs == the fp16 K+V bytes, so its bmm_flops_g / cpu_flops are these bandwidths
    "device_attn_bw_<dtype>": "decode attention (SDPA with an additive mask) on the device: bytes of "
                              "K+V cache processed per second (bytes/s)",
    "device_attn_bw": "device_attn_bw_<dtype> of the device's default dtype: float16 on CUDA, "
                      "bfloat16 on CPU (bytes/s; FlexGen bmm_flops_g)",
    "cpu_attn_bw_<dtype>": "decode attention on the host CPU (delegated attention) (bytes/s)",
    "cpu_attn_bw": "cpu_attn_bw_bfloat16 (bytes/s; FlexGen cpu_flops)",
    "host_memcpy_bw": "host RAM to host RAM copy of large tensors, bytes copied per second (bytes/s)",
    "h2d_bw": "host -> device copy from pinned memory; on a CPU-only machine device == host and this "
              "is host_memcpy_bw (bytes/s; FlexGen ctog_bdw)",
    "d2h_bw": "device -> host copy into pinned memory; CPU-only: host_memcpy_bw "
              "(bytes/s; FlexGen gtoc_bdw_hidden)",
    "disk_read_bw": "sequential read of a file in offload_dir, page cache bypassed, 4 threads x 4 MiB "
                    "requests (bytes/s; FlexGen dtoc_bdw)",
    "disk_write_bw": "sequential write of a new file in offload_dir incl. fsync, page cache bypassed "
                     "(bytes/s; FlexGen ctod_bdw_hidden_p / ctod_bdw_g)",
    "disk_o_direct": "1 if the disk figures used O_DIRECT, 0 if buffered I/O + fsync + "
                     "posix_fadvise(DONTNEED) (or no bypass at all where fadvise is missing) (flag)",
    "device_is_host": "1 if there is no separate device (CPU-only): h2d/d2h are memcpy (flag)",
    # executor-level costs (graphgen.costmodel treats each as absent = free)
    "device_mm_bw_<dtype>": "weight bytes/s a decode matmul (8, H) x (H, 4H) streams (8 sequences, one "
                            "token each), weights cycling over a set larger than the caches: the floor of a "
                            "decode layer's matmuls (bytes/s)",
    "compute_overhead_s": "seconds of one decode square of a tiny layer (H=64, B=1) through graphgen's layer "
                          "code, mean of attention and MLP: the fixed cost of a square's kernels (s)",
    "disk_latency_s": "seconds of one 4 KiB read from offload_dir, page cache bypassed, file opened and "
                      "closed as the disk tier does per request (s)",
    "dequant_bw": "dense bytes/s of dequantising 4-bit group-wise weights (executors.quant) on the "
                  "device, the compute dtype being the default one (bytes/s)",
    "attn_overhead_s": "optional, fitted by graphgen.calibrate: what an attention square costs beyond "
                       "compute_overhead_s and its FLOPs and bytes (s)",
    "calibrated": "optional: 1 when graphgen.calibrate fitted the executor-level keys to traced runs (flag)",
    "compute_io_contention": "optional, fitted by graphgen.calibrate: seconds a compute square runs longer "
                             "per second of disk I/O beside it (I/O threads taking cores from compute) (s/s)",
    # optional refinements, present in published profiles only; consumers fall back to the key in ()
    "d2h_cache_bw": "optional: device -> host copy of KV cache slices, slower than whole "
                    "activations (bytes/s; FlexGen gtoc_bdw_cache; else d2h_bw)",
    "disk_write_latency_s": "optional: seconds per disk write request, fitted by graphgen.calibrate "
                            "(the cache's slice writes are buffered; else disk_latency_s)",
    "disk_write_cache_bw": "optional: host -> disk write of prefill KV cache "
                           "(bytes/s; FlexGen ctod_bdw_cache_p; else disk_write_bw)",
    "cpu_attn_c1": "optional: FlexGen's fitted correction of cpu_attn_bw for small GPU batches gbs and "
                   "hidden sizes h: factor max(0.1, 1 + c1*a*b - c2*a - c3*b), a = max(0, log2(64/gbs)), "
                   "b = max(0, log2(4096/h)) (dimensionless)",
    "cpu_attn_c2": "optional: see cpu_attn_c1 (dimensionless)",
    "cpu_attn_c3": "optional: see cpu_attn_c1 (dimensionless)",
}


@dataclass(frozen=True)
class Shapes:
    """Problem sizes: LLM-layer-like, small enough to time in well under a minute."""
    mm: Tuple[int, int, int]  # prefill matmul (M=B*s, K=H, N=4H)
    mm_decode: Tuple[int, int, int]  # decode matmul (M=B, K=H, N=4H)
    bmm: Tuple[int, int, int, int]  # prefill attention (B, heads, s, head_dim)
    attn: Tuple[int, int, int, int]  # decode attention KV cache (B, heads, S, head_dim)
    copy_bytes: int
    disk_bytes: int


SHAPES = {
    # decode attention: a 33 MB cache per square, the size CPU runs have (a 268 MB one runs ~2x
    # slower per byte in bfloat16 SDPA and would misprice typical squares)
    ("cpu", False): Shapes((1024, 2048, 8192), (32, 2048, 8192), (4, 16, 512, 128),
                           (16, 16, 512, 64), 256 << 20, 512 << 20),
    ("cpu", True): Shapes((256, 1024, 4096), (32, 1024, 4096), (4, 8, 256, 64),
                          (8, 8, 512, 64), 32 << 20, 32 << 20),
    ("cuda", False): Shapes((4096, 4096, 16384), (64, 4096, 16384), (8, 32, 1024, 128),
                            (32, 32, 2048, 128), 1 << 30, 512 << 20),
    ("cuda", True): Shapes((1024, 2048, 8192), (32, 2048, 8192), (4, 16, 512, 128),
                           (8, 16, 1024, 128), 64 << 20, 32 << 20),
}

IO_THREADS = 4
IO_BLOCK = 4 << 20  # bytes per request: large, page-aligned (O_DIRECT needs alignment)


# ---------------------------------------------------------------- timing


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _bench(fn: Callable[[], object], sync: Callable[[], None], repeats: int = 5,
           min_time: float = 0.02, budget: float = 1.0) -> float:
    """Best seconds per call of fn after a warm-up call; short calls are looped to min_time,
    long ones get fewer repeats (at least 2) so one measurement takes about `budget` seconds.

    Best, not median: on a shared machine other processes only ever add time (timeit's advice).
    """
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    first = max(time.perf_counter() - t0, 1e-9)
    inner = max(1, math.ceil(min_time / first))
    times = [first] if inner == 1 else []
    for _ in range(max(2, min(repeats, int(budget / (first * inner))))):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def _filled(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of N(0,1)-like values; tiling a small random block is ~10x cheaper than randn."""
    n = math.prod(shape)
    base = torch.randn(min(n, 1 << 16), generator=torch.Generator().manual_seed(0))
    out = base.to(device=device, dtype=dtype).repeat(math.ceil(n / base.numel()))[:n]
    return out.view(shape)


# ---------------------------------------------------------------- compute


def matmul_flops(device: torch.device, dtype: torch.dtype, mkn: Tuple[int, int, int],
                 repeats: int = 5) -> float:
    """FLOP/s of (M, K) x (K, N), the shape of a linear layer on M tokens."""
    m, k, n = mkn
    a, b = _filled((m, k), dtype, device), _filled((k, n), dtype, device)
    return 2 * m * k * n / _bench(lambda: torch.mm(a, b), _sync_fn(device), repeats)


def _additive_bias(b: int, s: int, ctx: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[B, 1, s, ctx] causal bias (0 / dtype min), the attn_mask form graphgen's layers pass."""
    q_pos = torch.arange(ctx - s, ctx, device=device)[:, None]
    masked = torch.arange(ctx, device=device)[None, :] > q_pos  # (s, ctx)
    bias = torch.zeros((s, ctx), dtype=dtype, device=device).masked_fill_(masked, torch.finfo(dtype).min)
    return bias.expand(b, 1, s, ctx).contiguous()


def _sdpa_seconds(device: torch.device, dtype: torch.dtype, b: int, h: int, s: int, ctx: int,
                  d: int, repeats: int) -> float:
    """Seconds of SDPA with an additive mask, as graphgen.models.base.attn_core calls it."""
    q = _filled((b, h, s, d), dtype, device)
    k, v = _filled((b, h, ctx, d), dtype, device), _filled((b, h, ctx, d), dtype, device)
    bias = _additive_bias(b, s, ctx, dtype, device)
    attn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # noqa: E731
    return _bench(attn, _sync_fn(device), repeats)


def prefill_attention_flops(device: torch.device, dtype: torch.dtype,
                            shape: Tuple[int, int, int, int], repeats: int = 5) -> float:
    """FLOP/s of causal attention over (B, heads, s, d), counted as 4*B*heads*s*s*d (both
    matmuls over the full square, as graphgen.costmodel counts them)."""
    b, h, s, d = shape
    return 4 * b * h * s * s * d / _sdpa_seconds(device, dtype, b, h, s, s, d, repeats)


def decode_attention_bw(device: torch.device, dtype: torch.dtype,
                        shape: Tuple[int, int, int, int], repeats: int = 5) -> float:
    """Bytes of K+V cache (B, heads, S, d) per second, one new query token per sequence, as the
    executors run it: the cached prefix ([2, S-1, B, heads, d], graphgen's cache layout) joined
    with the new slice, permuted to [B, heads, S, d] and passed to SDPA with an additive mask."""
    b, h, ctx, d = shape
    kv_bytes = 2 * b * h * ctx * d * torch.finfo(dtype).bits // 8
    q = _filled((b, h, 1, d), dtype, device)
    prefix, new = _filled((2, ctx - 1, b, h, d), dtype, device), _filled((2, 1, b, h, d), dtype, device)
    bias = _additive_bias(b, 1, ctx, dtype, device)

    def attn():
        kv = torch.cat([prefix, new], 1).permute(0, 2, 3, 1, 4)  # [2, B, heads, S, d]
        return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias)

    return kv_bytes / _bench(attn, _sync_fn(device), repeats)


# ---------------------------------------------------------------- executor-level costs


def weight_stream_bw(device: torch.device, dtype: torch.dtype, kn: Tuple[int, int], total: int,
                     repeats: int = 5, m: int = 8) -> float:
    """Weight bytes/s of decode matmuls (m, K) x (K, N) over `total` bytes of distinct weights
    (more than the caches hold, as a decode step's layers are). m = 8, not 1: CPU libraries
    take a slower matrix-vector path for a single row."""
    k, n = kn
    count = max(2, total // (k * n * torch.finfo(dtype).bits // 8))
    ws = [_filled((n, k), dtype, device) for _ in range(count)]
    x = _filled((m, k), dtype, device)

    def run():
        for w in ws:
            F.linear(x, w)

    return sum(w.nbytes for w in ws) / _bench(run, _sync_fn(device), repeats)


def _tiny_layer(device: torch.device, dtype: torch.dtype):
    """A one-block OPT spec (H=64, 2 heads) and its attention and MLP weights on `device`."""
    from .models import build_spec, hf_config_from_arch

    arch = {"model_type": "opt", "hidden_size": 64, "num_attention_heads": 2, "ffn_dim": 256,
            "num_hidden_layers": 1, "vocab_size": 64, "word_embed_proj_dim": 64, "max_position_embeddings": 64}
    spec = build_spec(hf_config_from_arch(arch), "probe")
    weights = [{w.name: _filled(w.shape, dtype, device) * 0.02 for w in spec.layers[j].weights} for j in (1, 2)]
    return spec, weights


def square_overhead_s(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Seconds of a decode square of a tiny layer (B=1, 8 positions) through graphgen's layer code,
    mean of attention and MLP: what a square costs beyond its FLOPs and bytes."""
    from .models.base import positions_from_mask

    spec, (wa, wm) = _tiny_layer(device, dtype)
    h = _filled((1, 1, 64), dtype, device)
    mask = torch.ones(1, 8, dtype=torch.long, device=device)
    prefix = _filled((2, 7, 1, 2, 32), dtype, device)

    def attn():
        q, k, v = spec.attn_qkv(wa, h, positions_from_mask(mask)[:, 7:])
        new = torch.stack([k, v]).permute(0, 3, 1, 2, 4)
        kv = torch.cat([prefix, new], 1).permute(0, 2, 3, 1, 4)
        return spec.attn_out(wa, spec.attn_core(q, kv[0], kv[1], mask), h)

    sync, mlp = _sync_fn(device), (lambda: spec.mlp(wm, h))
    for _ in range(3):  # first calls of new shapes build kernels (oneDNN, cuBLAS): not per square
        attn(), mlp()
    return (_bench(attn, sync, repeats) + _bench(mlp, sync, repeats)) / 2


def dequant_bw(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Dense bytes/s of dequantising an (n, n) 4-bit group-wise (64) weight into `dtype`, into a
    reused buffer as the executors do (a fresh one would time the page faults of its allocation)."""
    from executors.quant import dequantize, quantize

    q = quantize(_filled((n, n), torch.float32, device), 4, 64, -1)
    out = torch.empty((n, n), dtype=dtype, device=device)
    return n * n * torch.finfo(dtype).bits // 8 / _bench(lambda: dequantize(q, out=out), _sync_fn(device), repeats)


def executor_profile(device: torch.device, shapes: Shapes, quick: bool, repeats: int) -> Dict[str, float]:
    _, k, n = shapes.mm_decode
    out = {f"device_mm_bw_{_dtype_name(dt)}": weight_stream_bw(device, dt, (k, n), (64 if quick else 256) << 20,
                                                              repeats) for dt in _dtypes(device)}
    default = torch.float16 if device.type == "cuda" else torch.bfloat16
    out["compute_overhead_s"] = square_overhead_s(device, default, repeats)
    out["dequant_bw"] = dequant_bw(device, default, 1024 if quick else 4096, repeats)
    return out


def disk_latency(offload_dir: str, repeats: int = 20) -> float:
    """Median seconds of open + one 4 KiB read + close at a random offset of a 64 MiB file,
    O_DIRECT where the filesystem takes it (else buffered after posix_fadvise(DONTNEED))."""
    import random

    os.makedirs(offload_dir, exist_ok=True)
    path = os.path.join(offload_dir, f"graphgen-latency-{os.getpid()}.bin")
    size, buf = 64 << 20, _aligned_buffer(4096)
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(1 << 20) * 64)
        direct = _o_direct_works(path + ".probe", buf)
        _drop_from_page_cache(path)
        rng, times = random.Random(0), []
        for _ in range(repeats):
            off = rng.randrange(size // 4096) * 4096
            t0 = time.perf_counter()
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            os.preadv(fd, [buf], off)
            os.close(fd)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        buf.close()
        if os.path.exists(path):
            os.unlink(path)


# ---------------------------------------------------------------- memory links


def copy_bw(dst: torch.Tensor, src: torch.Tensor, repeats: int = 5) -> float:
    """Bytes per second of dst.copy_(src) (host<->host, host<->device)."""
    dev = dst.device if dst.device.type == "cuda" else src.device
    return src.nbytes / _bench(lambda: dst.copy_(src, non_blocking=True), _sync_fn(dev), repeats)


def _host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    t.fill_(1)  # touch every page so first-touch faults are not timed
    return t


# ---------------------------------------------------------------- disk


def _aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous mmap: page-aligned, as O_DIRECT requires; random content defeats compression."""
    buf = mmap.mmap(-1, nbytes)
    buf.write(os.urandom(nbytes))
    return buf


def _file_io(path: str, flags: int, size: int, write: bool, bufs: List[mmap.mmap]) -> float:
    """Seconds to write (incl. fsync) or read `size` bytes with len(bufs) threads."""
    fd = os.open(path, flags, 0o600)
    try:
        offsets = range(0, size, len(bufs[0]))
        op = os.pwritev if write else os.preadv

        def worker(i: int) -> None:
            for off in offsets[i::len(bufs)]:
                if op(fd, [bufs[i]], off) != len(bufs[i]):
                    raise OSError(f"short {'write' if write else 'read'} on {path} at {off}")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(bufs)) as pool:
            list(pool.map(worker, range(len(bufs))))
        if write:
            os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _o_direct_works(path: str, buf: mmap.mmap) -> bool:
    """O_DIRECT is refused by tmpfs and some network/overlay filesystems (EINVAL)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        _file_io(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, len(buf), True, [buf])
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(path):
            os.unlink(path)


def disk_bw(offload_dir: str, size: int, repeats: int = 3) -> Dict[str, float]:
    """Sequential write/read bytes/s of a fresh file in offload_dir, bypassing the page cache.

    Median of repeats (not best): a disk's own variance (write caches, burst credits of cloud
    volumes) is part of what offloading will see.
    """
    os.makedirs(offload_dir, exist_ok=True)
    path = os.path.join(offload_dir, f"graphgen-profile-{os.getpid()}.bin")
    block = min(IO_BLOCK, size)
    size -= size % block
    bufs = [_aligned_buffer(block) for _ in range(IO_THREADS)]
    direct = _o_direct_works(path, bufs[0])
    odirect = os.O_DIRECT if direct else 0
    writes, reads = [], []
    try:
        for _ in range(repeats):
            if os.path.exists(path):
                os.unlink(path)  # a fresh file each time: block allocation is part of offloading
            writes.append(_file_io(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | odirect,
                                   size, True, bufs))
            if not direct and hasattr(os, "posix_fadvise"):
                _drop_from_page_cache(path)
            reads.append(_file_io(path, os.O_RDONLY | odirect, size, False, bufs))
    finally:
        if os.path.exists(path):
            os.unlink(path)
        for b in bufs:
            b.close()
    return {"disk_read_bw": size / statistics.median(reads),
            "disk_write_bw": size / statistics.median(writes),
            "disk_o_direct": float(direct)}


# ---------------------------------------------------------------- measure


def _dtypes(device: torch.device) -> List[torch.dtype]:
    """Dtypes worth computing in: no float16 on CPU (hundreds of times slower than bfloat16)."""
    if device.type == "cpu":
        return [torch.bfloat16, torch.float32]
    bf16 = [torch.bfloat16] if torch.cuda.is_bf16_supported() else []
    return [torch.float16] + bf16 + [torch.float32]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _compute_profile(prefix: str, device: torch.device, shapes: Shapes,
                     repeats: int) -> Dict[str, float]:
    out = {}
    for dt in _dtypes(device):
        name = _dtype_name(dt)
        out[f"{prefix}_flops_{name}"] = matmul_flops(device, dt, shapes.mm, repeats)
        out[f"{prefix}_flops_decode_{name}"] = matmul_flops(device, dt, shapes.mm_decode, repeats)
        if prefix == "device":
            out[f"device_bmm_flops_{name}"] = prefill_attention_flops(device, dt, shapes.bmm, repeats)
        out[f"{prefix}_attn_bw_{name}"] = decode_attention_bw(device, dt, shapes.attn, repeats)
    default = "float16" if device.type == "cuda" else "bfloat16"
    out[f"{prefix}_attn_bw"] = out[f"{prefix}_attn_bw_{default}"]
    return out


def _link_profile(device: torch.device, nbytes: int, repeats: int) -> Dict[str, float]:
    src, dst = _host_buffer(nbytes, False), _host_buffer(nbytes, False)
    out = {"host_memcpy_bw": copy_bw(dst, src, repeats)}
    del src, dst
    if device.type != "cuda":
        return {**out, "h2d_bw": out["host_memcpy_bw"], "d2h_bw": out["host_memcpy_bw"],
                "device_is_host": 1.0}
    pinned = _host_buffer(nbytes, True)
    on_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out["h2d_bw"] = copy_bw(on_dev, pinned, repeats)
    out["d2h_bw"] = copy_bw(pinned, on_dev, repeats)
    return {**out, "device_is_host": 0.0}


def _resolve(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"hardware.device={device!r} but no CUDA GPU is visible to torch "
                         f"{torch.__version__}: use hardware=cpu (or hardware=auto)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"hardware.device={device!r}: the profiler knows 'cpu' and 'cuda[:N]'")
    return dev


def detect_memory(device: str = "cpu", offload_dir: Optional[str] = None) -> Dict[str, int]:
    """Sizes in bytes: device (GPU total; 0 on CPU-only), host RAM total/available, free disk."""
    dev = _resolve(device)
    page = os.sysconf("SC_PAGE_SIZE")
    available = os.sysconf("SC_AVPHYS_PAGES") * page
    try:  # MemAvailable counts reclaimable page cache, SC_AVPHYS_PAGES does not
        with open("/proc/meminfo") as f:
            available = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    offload_dir = offload_dir or default_offload_dir()
    os.makedirs(offload_dir, exist_ok=True)
    return {"device_total": torch.cuda.mem_get_info(dev)[1] if dev.type == "cuda" else 0,
            "host_total": os.sysconf("SC_PHYS_PAGES") * page, "host_available": available,
            "disk_free": shutil.disk_usage(offload_dir).free}


def default_offload_dir() -> str:
    return os.environ.get("GRAPHGEN_OFFLOAD_DIR", "/tmp/graphgen-offload")


def measure(device: str = "cpu", offload_dir: Optional[str] = None,
            quick: bool = False) -> Dict[str, float]:
    """Measure every key of PROFILE_KEYS that this machine has (~15-20 s; quick: ~3 s)."""
    dev = _resolve(device)
    shapes = SHAPES[(dev.type, quick)]
    repeats = 3 if quick else 5
    out = _compute_profile("device", dev, shapes, repeats)
    if dev.type == "cpu":  # the host CPU *is* the device
        out.update({k.replace("device_", "cpu_", 1): v for k, v in out.items()
                    if k.startswith(("device_flops", "device_attn"))})
    else:
        out.update(_compute_profile("cpu", torch.device("cpu"), SHAPES[("cpu", quick)], repeats))
    out.update(_link_profile(dev, shapes.copy_bytes, repeats))
    out.update(executor_profile(dev, shapes, quick, repeats))
    out.update(disk_bw(offload_dir or default_offload_dir(), shapes.disk_bytes, 2 if quick else 3))
    out["disk_latency_s"] = disk_latency(offload_dir or default_offload_dir())
    return dict(sorted(out.items()))


# ---------------------------------------------------------------- cache


def cache_dir() -> Path:
    """$GRAPHGEN_CACHE_DIR, else $XDG_CACHE_HOME/graphgen, else ~/.cache/graphgen."""
    if os.environ.get("GRAPHGEN_CACHE_DIR"):
        return Path(os.environ["GRAPHGEN_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "graphgen"


def cache_path(device: str = "cpu") -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in device)
    return cache_dir() / f"hardware-{socket.gethostname()}-{safe}.json"


def _fs_type(path: str) -> str:
    """Filesystem type holding path, from /proc/mounts (longest mount-point prefix); '?' elsewhere."""
    path, best = os.path.realpath(path), ("", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                mnt, fstype = line.split()[1:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best[0]):
                    best = (mnt, fstype)
    except OSError:
        pass
    return best[1]


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "cpu"


def _meta(device: str, offload_dir: str, quick: bool, seconds: float,
          profile: Dict[str, float]) -> Dict[str, object]:
    dev = torch.device(device)
    return {
        "version": VERSION, "hostname": socket.gethostname(), "device": device,
        "device_name": _device_name(dev), "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(), "quick": quick,
        "offload_dir": os.path.realpath(offload_dir), "offload_fs": _fs_type(offload_dir),
        "disk_method": ("O_DIRECT" if profile.get("disk_o_direct") else
                        "buffered + fsync + posix_fadvise(DONTNEED)"
                        if hasattr(os, "posix_fadvise") else "buffered (page cache NOT bypassed)"),
        "links": ("memcpy: no separate device, h2d/d2h = host RAM copy"
                  if profile.get("device_is_host") else "pinned host <-> device copies"),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 2),
    }


def measure_and_cache(device: str = "cpu", offload_dir: Optional[str] = None,
                      quick: bool = False) -> Dict[str, object]:
    """Measure, write the cache file atomically, return {'profile': ..., 'meta': ...}."""
    offload_dir = offload_dir or default_offload_dir()
    t0 = time.perf_counter()
    profile = measure(device, offload_dir, quick)
    record = {"profile": profile,
              "meta": _meta(device, offload_dir, quick, time.perf_counter() - t0, profile)}
    path = cache_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


def load_cached(device: str = "cpu") -> Optional[Dict[str, object]]:
    """The cached {'profile', 'meta'} record for this host and device, or None."""
    try:
        record = json.loads(cache_path(device).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("profile"), dict) \
        and isinstance(record.get("meta"), dict)
    return record if ok else None


def _usable(record: Optional[Dict[str, object]], offload_dir: str, quick: bool) -> bool:
    """Same version, same offload directory, and never a quick profile where a full one is asked."""
    if record is None:
        return False
    meta = record["meta"]
    return (meta.get("version") == VERSION and (quick or not meta.get("quick"))
            and meta.get("offload_dir") == os.path.realpath(offload_dir))


def load_or_measure_record(device: str = "cpu", offload_dir: Optional[str] = None,
                           refresh: bool = False, quick: bool = False) -> Dict[str, object]:
    offload_dir = offload_dir or default_offload_dir()
    record = None if refresh else load_cached(device)
    if _usable(record, offload_dir, quick):
        return record
    return measure_and_cache(device, offload_dir, quick)


def load_or_measure(device: str = "cpu", offload_dir: Optional[str] = None,
                    refresh: bool = False, quick: bool = False) -> Dict[str, float]:
    """The cached profile for this host/device/offload_dir; measured (and cached) if absent."""
    return dict(load_or_measure_record(device, offload_dir, refresh, quick)["profile"])


# ---------------------------------------------------------------- CLI


def format_table(profile: Dict[str, float], meta: Optional[Dict[str, object]] = None) -> str:
    """Human units: GFLOP/s for *flops*, GB/s (1e9 bytes/s) for *_bw*, us for *_s, raw for flags."""
    rows = []
    for key, value in profile.items():
        if "flops" in key:
            rows.append((key, f"{value / 1e9:12.1f}", "GFLOP/s"))
        elif "_bw" in key:
            rows.append((key, f"{value / 1e9:12.2f}", "GB/s"))
        elif key.endswith("_s"):
            rows.append((key, f"{value * 1e6:12.1f}", "us"))
        else:
            rows.append((key, f"{value:12.4g}", ""))
    width = max(len(k) for k, _, _ in rows)
    lines = [f"{k:<{width}} {v} {u}" for k, v, u in rows]
    for key, value in (meta or {}).items():
        lines.append(f"# {key}: {value}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m graphgen.hardware_profile", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--offload-dir", default=None,
                   help="directory for the disk test (default: $GRAPHGEN_OFFLOAD_DIR or /tmp/graphgen-offload)")
    p.add_argument("--quick", action="store_true", help="small sizes, ~3 s (noisier)")
    p.add_argument("--refresh", action="store_true", help="re-measure even if a cached profile exists")
    args = p.parse_args(argv)
    record = load_or_measure_record(args.device, args.offload_dir, args.refresh, args.quick)
    print(format_table(record["profile"], record["meta"]))
    print(f"# cache: {cache_path(args.device)}")


if __name__ == "__main__":
    main()
