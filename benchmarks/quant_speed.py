"""Throughput of the quantisation kernels on this machine, beside a plain bf16 copy.

GB/s counts the bf16 tensor (dequantize: bytes written; quantize: bytes read). Time is the
best of --reps runs (shared CPUs are noisy; the best run is the least disturbed one).

    python benchmarks/quant_speed.py [--n 4096] [--reps 7] [--device cpu] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from executors.quant import dequantize, load_prefix, qempty, quantize, store_slice  # noqa: E402


def best_time(fn, reps: int, device: str) -> float:
    """Best wall time of fn() over reps runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def report(name: str, nbytes: int, seconds: float, ref_seconds: float) -> None:
    """One row; `ref_seconds`: the bf16 copy of the same allocation kind (fresh or reused)."""
    gbs = nbytes / seconds / 1e9
    print(f"{name:<34} {seconds * 1e3:8.2f} ms {gbs:7.2f} GB/s  {ref_seconds / seconds:5.2f}x copy speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, reps = args.device, args.reps
    x = torch.randn(args.n, args.n, device=dev).bfloat16()  # [n, n] bf16 weight
    nbytes = x.numel() * x.element_size()
    clone_s = best_time(lambda: x.clone(), reps, dev)  # fresh output, like dequantize()
    buf = torch.empty_like(x)  # a fresh large CPU allocation page-faults on first touch
    copy_s = best_time(lambda: buf.copy_(x), reps, dev)  # reused output, like dequantize(out=)
    print(f"device {dev}, {torch.get_num_threads()} threads, "
          f"{args.n}x{args.n} bf16 ({nbytes / 2**20:.0f} MiB)")
    report("bf16 clone (reference)", nbytes, clone_s, clone_s)
    report("  copy_ into a reused buffer", nbytes, copy_s, copy_s)
    for bits in (4, 8):
        for gd in (-1, 0):
            q = quantize(x, bits, 64, gd)
            t_q = best_time(lambda: quantize(x, bits, 64, gd), reps, dev)
            t_dq = best_time(lambda: dequantize(q), reps, dev)
            t_out = best_time(lambda: dequantize(q, out=buf), reps, dev)
            report(f"quantize   {bits}-bit g64 dim{gd}", nbytes, t_q, clone_s)
            report(f"dequantize {bits}-bit g64 dim{gd}", nbytes, t_dq, clone_s)
            report("  into a reused buffer (out=)", nbytes, t_out, copy_s)
    kv_cache(dev, reps)


def kv_cache(dev: str, reps: int) -> None:
    """Decode-step cache traffic: append one position, read the whole prefix back."""
    shape = (2, 512, 32, 12, 64)  # [2, S, B, nkv, d]: opt-125m-like heads, batch 32, 512 tokens
    kv = torch.randn(shape, device=dev).bfloat16()
    cache = qempty(shape, 4, 64, -1, dtype=torch.bfloat16, device=dev)
    store_slice(cache, kv, 0)
    step, buf, nbytes = kv[:, -1:], torch.empty_like(kv), kv.numel() * kv.element_size()
    clone_s = best_time(lambda: kv.clone(), reps, dev)
    copy_s = best_time(lambda: buf.copy_(kv), reps, dev)
    t_store = best_time(lambda: store_slice(cache, step, 511), reps, dev)
    t_load = best_time(lambda: load_prefix(cache, 512), reps, dev)
    t_out = best_time(lambda: load_prefix(cache, 512, out=buf), reps, dev)
    report("cache store 1 position 4-bit", step.numel() * 2, t_store, best_time(lambda: step.clone(), reps, dev))
    report("cache load 512-prefix 4-bit", nbytes, t_load, clone_s)
    report("  into a reused buffer (out=)", nbytes, t_out, copy_s)


if __name__ == "__main__":
    main()
