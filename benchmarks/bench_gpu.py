"""One CUDA GPU: graphgen vs HF Accelerate offloading to host RAM, same checkpoint, GPU budget, lengths.

FlexGen's setting: the model does not fit the GPU budget (--gpu-mem); the rest of the weights
stay in (pinned) host RAM. HF: from_pretrained(device_map="auto", max_memory={0: gpu budget,
"cpu": ...}); graphgen: the same share of weights on the GPU (policy.percent), the rest on the host
streamed by the async executor (CUDA streams and events, pinned weights), the KV cache on the
host with CPU attention when --cpu-attention, a zig-zag block of --gbs x --num-batches sequences.
Both at the best of the batch sizes tried; prints throughputs and the ratio. Without CUDA it
says so and exits 0 (so it can sit in scripts that also run on CPU-only machines).

    python benchmarks/bench_gpu.py --model opt-6.7b --gpu-mem 8GB
    python benchmarks/bench_gpu.py --model opt-1.3b --gpu-mem 1GB --hf-batches 1,8 --gbs 16 --num-batches 2 --gen-len 8
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-6.7b")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--gpu-mem", default="8GB", help="GPU budget for both")
    ap.add_argument("--hf-batches", default="1,4,16")
    ap.add_argument("--gbs", type=int, default=32)
    ap.add_argument("--num-batches", type=int, default=4)
    ap.add_argument("--cpu-attention", action="store_true")
    ap.add_argument("--work-dir", default=os.environ.get("GRAPHGEN_BENCH_DIR", "/tmp/graphgen-bench"))
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine: skipped")
        return 0
    from bench_disk_offload import checkpoint, weight_files
    from common import (LLM, best, free, graphgen_generate, hf_generate, machine, matmul_peak, parse_ints,
                        prompts)
    from graphgen.config import parse_bytes

    print(f"machine: {machine()}")
    print(f"command: python {' '.join(sys.argv)}")
    peak = matmul_peak(torch.float16, "cuda", shapes=((8192, 8192, 8192),))
    print(f"fp16 matmul peak (measured now): {peak / 1e12:.1f} TFLOP/s")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(args.model, work)  # bf16 on disk; both read it as float16
    w_bytes = sum(f.stat().st_size for f in weight_files(ckpt))
    gpu = parse_bytes(args.gpu_mem, "--gpu-mem")
    w_gpu = max(0, min(100, int(100 * 0.8 * gpu / w_bytes)))  # 80% of the GPU budget for weights
    print(f"{args.model}: {w_bytes / 1e9:.1f} GB of weights; GPU budget {gpu / 1e9:.1f} GB; {w_gpu}% of the weights "
          f"on the GPU, the rest in host RAM; prompt {args.prompt_len}, gen {args.gen_len}", flush=True)
    hf = []
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto", dtype=torch.float16,
                                                     max_memory={0: int(0.8 * gpu), "cpu": 10**13}).eval()
        for b in parse_ints(args.hf_batches):
            try:
                hf.append(hf_generate(model, prompts(b, args.prompt_len).cuda(), args.gen_len))
                print("  " + hf[-1].row(), flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"  HF batch {b}: out of GPU memory")
                torch.cuda.empty_cache()
        del model
        free()
        torch.cuda.empty_cache()
    cache = "0,100" if args.cpu_attention else "100,0"
    ov = [f"model.path={ckpt}", "model.weights=hf", "hardware=cuda", "model.dtype=float16",
          f"hardware.device_mem={gpu}", f"policy.percent=[{w_gpu},{100 - w_gpu},{cache},100,0]",
          f"policy.cpu_attention={str(args.cpu_attention).lower()}", f"policy.gpu_batch_size={args.gbs}",
          f"policy.num_gpu_batches={args.num_batches}", "executor.name=async", "executor.trace=true",
          "report.progress=false"]
    n = args.gbs * args.num_batches
    with LLM(str(ckpt), ov) as llm:
        llm.generate(prompts(n, 4), max_new_tokens=1)  # places the weights
        g = graphgen_generate(llm, prompts(n, args.prompt_len), args.gen_len)
    print("  " + g.row())
    h = best(hf)
    print("\nresult")
    if h:
        print(f"  HF Accelerate (GPU + host offload) best batch {h.batch}: {h.tok_s:.2f} tok/s")
    print(f"  graphgen (async, CUDA streams)   batch {g.batch}: {g.tok_s:.2f} tok/s; CUDA peak "
          f"{g.extra.get('cuda_peak_bytes', 0) / 1e9:.2f} GB (plan {g.extra['planned_peak_bytes']['device'] / 1e9:.2f} GB);"
          f" I/O under compute {g.extra.get('overlap_fraction', 0):.0%}")
    if h:
        print(f"  ratio graphgen / HF: {g.tok_s / h.tok_s:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
