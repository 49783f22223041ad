"""In memory (no offloading): graphgen vs transformers generate, same model, dtype, lengths.

Both run in this one process on the same dummy-weight model (conf/model/<model>), greedy, exactly
gen_len new tokens, each at the best of the batch sizes tried. Prints both throughputs and their
ratio, graphgen's prefill FLOP/s against the machine's bf16 matmul peak measured in this run,
and the batch each side did best at.

    python benchmarks/bench_in_memory.py                       # OPT-1.3B, prompt 512, gen 32
    python benchmarks/bench_in_memory.py --model opt-125m --prompt-len 128 --gen-len 8 --batches 1,4   # quick
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (LLM, best, graphgen_generate, hf_dummy_model, hf_generate, machine,  # noqa: E402
                    matmul_peak, parse_ints, prefill_flops, prompts)
from executors.memory import keep_freed_memory  # noqa: E402


def hf_model(args):
    t = time.perf_counter()
    model = hf_dummy_model(args.model, torch.bfloat16)
    print(f"  HF model built in {time.perf_counter() - t:.1f} s", flush=True)
    hf_generate(model, prompts(1, 8), 2)  # warm-up: kernels, allocator
    return model


def run_hf(args, model, batches):
    runs = []
    for b in batches:
        runs.append(hf_generate(model, prompts(b, args.prompt_len), args.gen_len))
        print("  " + runs[-1].row(), flush=True)
    return runs


PEAKS = []  # bf16 matmul peak, sampled through the run: the machine's load drifts


def sample_peak() -> float:
    PEAKS.append(matmul_peak(torch.bfloat16))
    return PEAKS[-1]


def run_graphgen(args, batches):
    runs = []
    for b in batches:
        ov = ["model.weights=dummy", "model.dtype=bfloat16", "policy=all-device", f"policy.gpu_batch_size={b}",
              "policy.num_gpu_batches=1", f"executor.name={args.executor}", "hardware.device_mem=64GB",
              "report.progress=false"]
        with LLM(args.model, ov) as llm:
            llm.generate(prompts(b, 8), max_new_tokens=2)  # warm-up; places the weights
            r = graphgen_generate(llm, prompts(b, args.prompt_len), args.gen_len)
            r.extra["prefill_flops"] = prefill_flops(llm.graph)
        runs.append(r)
        print("  " + r.row(), flush=True)
        sample_peak()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes tried for HF")
    ap.add_argument("--gg-batches", default=None, help="batch sizes tried for graphgen (default: --batches)")
    ap.add_argument("--executor", default="async")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each side's best batch, back to back")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"allocator: glibc keeps freed memory for reuse, for both sides: {keep_freed_memory()} "
          f"(graphgen's executor.keep_freed_memory; set here so HF runs the same way)")
    peak = sample_peak()
    print(f"bf16 matmul peak (measured now, best of 4096^3 and 2048x2048x8192 GEMMs): {peak / 1e9:.1f} GFLOP/s")
    print(f"{args.model}, dummy weights, bfloat16, CPU, prompt {args.prompt_len}, gen {args.gen_len}, greedy")
    model = None if args.skip_hf else hf_model(args)
    hf = [] if args.skip_hf else run_hf(args, model, parse_ints(args.batches))
    gg = run_graphgen(args, parse_ints(args.gg_batches or args.batches))
    # side by side: a shared machine's load drifts over minutes, so each side's best batch runs again,
    # back to back, --repeat - 1 more times; each side's best run counts
    for _ in range(args.repeat - 1):
        if hf:
            hf += run_hf(args, model, [best(hf).batch])
        gg += run_graphgen(args, [best(gg).batch])
    for _ in range(3):
        sample_peak()
    peak = max(PEAKS)
    print(f"bf16 matmul peak sampled {len(PEAKS)} times through the run (at the start, after each graphgen "
          f"run, at the end): {', '.join(f'{p / 1e9:.0f}' for p in PEAKS)} GFLOP/s; the peak is their max")
    g = best(gg)
    pf = g.extra["prefill_flops"] / g.prefill_s
    print("\nresult")
    if hf:
        h = best(hf)
        print(f"  HF transformers generate  best batch {h.batch:>3}: {h.tok_s:8.3f} tok/s")
    print(f"  graphgen ({args.executor:<9})      best batch {g.batch:>3}: {g.tok_s:8.3f} tok/s")
    if hf:
        print(f"  ratio graphgen / HF: {g.tok_s / h.tok_s:.2f}x (target >= 1.3x)")
    print(f"  graphgen prefill: {pf / 1e9:.1f} GFLOP/s = {pf / peak:.0%} of the measured bf16 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (target >= 60%)")


if __name__ == "__main__":
    main()
