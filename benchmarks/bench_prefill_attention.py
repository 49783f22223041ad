"""Prefill attention on a CPU: SDPA's flash kernel against graphgen's grouped-head score blocks
(graphgen/models/base.py grouped_attention) per block size, one layer, bf16.

    python benchmarks/bench_prefill_attention.py --threads 2
    python benchmarks/bench_prefill_attention.py --shapes 16x256,64x128 --heads 9:3 --blocks 4,8

Prints ms per layer, GFLOP/s (causal: 2 * B * heads * s^2 * d) and the largest difference from
float32 SDPA for each shape (batch x tokens).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_ms  # noqa: E402
from graphgen.models.base import grouped_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="16x256,64x128,4x1024,1x64", help="batch x tokens, comma-separated")
    ap.add_argument("--heads", default="9:3", help="query heads : KV heads (SmolLM2's 9:3 by default)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--blocks", default="2,4,8", help="score block sizes to try, MiB")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
        nh, nkv = (int(x) for x in args.heads.split(":"))
        blocks = [int(b) for b in args.blocks.split(",")]
    except ValueError:
        ap.error("--shapes takes BxS[,BxS...], --heads Q:KV, --blocks MiB[,MiB...] (integers)")
    if nkv < 1 or nh % nkv:
        ap.error(f"--heads {args.heads}: the query heads must be a multiple of the KV heads")
    torch.set_num_threads(args.threads)
    d = args.head_dim
    print(f"{args.threads} threads, heads {nh}:{nkv}, head dim {d}, load average {os.getloadavg()[0]:.1f}")
    for b, s in shapes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, n, s, d, generator=g).to(torch.bfloat16) for n in (nh, nkv, nkv))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
        ref = ref.transpose(1, 2).reshape(b, s, nh * d)
        flops = 2 * b * nh * s * s * d
        runs = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                .transpose(1, 2).reshape(b, s, nh * d)}
        for mib in blocks:
            runs[f"grouped {mib} MiB"] = lambda mib=mib: grouped_attention(q, k, v, None, d ** -0.5, mib << 20)
        cells = []
        for name, fn in runs.items():
            ms = best_ms(fn, args.repeats)
            err = (fn().float() - ref).abs().max().item()
            cells.append(f"{name} {ms:.2f} ms ({flops / ms / 1e6:.0f} GFLOP/s, err {err:.3g})")
        print(f"{b} x {s}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
