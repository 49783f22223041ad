"""Weights on disk, bfloat16 vs 4-bit (policy.compress_weight.bits=4), side by side.

Every token pass (the prefill and each decode step) reads all the weights from the offload
dir; 4-bit weights read ~28% of the bytes and are dequantised once per layer per pass, on the
compute stream (the zig-zag block shares the copy across its GPU batches). With a small batch the run is
I/O-bound, so throughput should rise about as much as the bytes fall, less the dequantisation.
The page cache is dropped before each run (root only) and the disk tier reads with O_DIRECT
where the filesystem allows it, so "disk" means the disk.

    python benchmarks/bench_compress_disk.py [--model opt-1.3b] [--batch 4] [--gen 6] [--executor async] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import drop_page_cache  # noqa: E402
from executors.offload_dir import default_offload_dir  # noqa: E402
from graphgen import LLM  # noqa: E402


def run(args, extra):
    """One LLM with weights on disk; returns (stats, setup seconds, page-cache note)."""
    ov = [f"model={args.model}", "model.weights=dummy", "model.dtype=bfloat16", f"executor.name={args.executor}",
          "policy.percent=[0,0,100,0,100,0]", f"policy.gpu_batch_size={args.batch}", "policy.num_gpu_batches=2",
          f"hardware.offload_dir={args.offload_dir}", "report.progress=false", "executor.trace=true", *extra]
    ids = torch.randint(4, 1000, (2 * args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    with LLM(args.model, ov) as llm:
        llm.generate(ids[:, :2], max_new_tokens=1)  # places (and quantises) the weights once
        setup = time.perf_counter() - t
        note = drop_page_cache()
        llm.generate(ids, max_new_tokens=args.gen)
        return dict(llm.last_stats, dequantize_s=llm.executor.stats.get("dequantize_s", 0.0)), setup, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--batch", type=int, default=4, help="GPU batch size (2 GPU batches per block)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--gen", type=int, default=6)
    ap.add_argument("--executor", default="async")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; 1 is steadier "
                    "on a shared CPU, where threads of the load and compute streams contend)")
    ap.add_argument("--offload-dir", default=default_offload_dir())
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {"bf16": run(args, []), "4-bit": run(args, ["policy.compress_weight.bits=4"])}
    passes = args.gen  # the prefill and gen - 1 decode steps each read every weight once
    print(f"{args.model} (dummy weights), weights on disk ({args.offload_dir}), bfloat16 compute, "
          f"{args.executor} executor, {torch.get_num_threads()} threads, "
          f"{2 * args.batch} prompts x {args.prompt_len} tokens -> {args.gen}")
    print(f"{'':<34}" + "".join(f"{name:>14}" for name in rows) + f"{'4-bit / bf16':>14}")

    def line(label, values, fmt, ratio=True):
        r = f"{values[1] / values[0]:>14.3f}" if ratio and values[0] else f"{'':>14}"
        print(f"{label:<34}" + "".join(f"{v:>14{fmt}}" for v in values) + r)

    st = [s for s, _, _ in rows.values()]
    read = [s["bytes_moved"].get("disk->device", 0) for s in st]
    line("GB read from disk per token pass", [r / passes / 1e9 for r in read], ".3f")
    line("prefill s", [s["prefill_s"] for s in st], ".2f")
    line("decode s", [s["decode_s"] for s in st], ".2f")
    line("decode tok/s", [s["decode_tok_s"] for s in st], ".2f")
    line("total tok/s (FlexGen's metric)", [s["total_tok_s"] for s in st], ".2f")
    line("disk GB/s over the run", [r / (s["prefill_s"] + s["decode_s"]) / 1e9 for r, s in zip(read, st)], ".3f")
    busy = [s.get("stream_busy_s", {}) for s in st]
    line("load stream busy s (disk reads)", [b.get("load", 0.0) for b in busy], ".2f")
    line("compute stream busy s", [b.get("compute", 0.0) for b in busy], ".2f")
    line("  of which dequantising s", [s["dequantize_s"] for s in st], ".2f", ratio=False)
    tokens = 2 * args.batch * args.gen
    bound = [tokens / max(b.get("load", 0.0), b.get("compute", 0.0)) for b in busy]
    line("bound: tokens / busier stream, tok/s", bound, ".2f")
    line("fraction of the bound reached", [s["total_tok_s"] / b for s, b in zip(st, bound)], ".2f", ratio=False)
    line("setup s (place, quantise weights)", [setup for _, setup, _ in rows.values()], ".1f")
    print("page cache: " + ", ".join(f"{name} {note}" for name, (_, _, note) in rows.items()))


if __name__ == "__main__":
    main()
