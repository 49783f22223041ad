"""Profile of graphgen's decode steps: self CPU time per op inside the decode squares only
(--phase prefill: the prefill's).

A torch.profiler record of one generate call; each decode op runs under a record_function
marker, and every op below a marker counts, per decode step. Prints the op table and the decode
rate of an unprofiled run before it.

    python benchmarks/profile_decode.py ~/.cache/graphgen/bench/smollm2-135m-bf16 --batch 16 --prompt-len 256
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path
from typing import Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLM  # noqa: E402
from executors.base import Executor  # noqa: E402


def mark_decode_ops(phase: str = "decode") -> None:
    """Run every op of a decode (or prefill) square under a "DECODE" profiler range."""
    execute = Executor.execute

    def marked(self, node):
        b = self.A[node]
        if (self.A[b["square"]] if "square" in b else b).get("step_kind") == phase:
            with record_function("DECODE"):
                return execute(self, node)
        return execute(self, node)

    Executor.execute = marked


def per_op(prof, shapes: bool = False) -> Tuple[collections.Counter, collections.Counter]:
    """Self CPU microseconds and calls of each op whose ancestors include a DECODE range (per op
    and input shapes with `shapes`)."""
    tot, calls = collections.Counter(), collections.Counter()
    for e in prof.events():
        a = e.cpu_parent
        while a is not None and a.name != "DECODE":
            a = a.cpu_parent
        if a is not None and e.name != "DECODE":
            key = f"{e.name} {e.input_shapes}" if shapes else e.name
            tot[key] += e.self_cpu_time_total
            calls[key] += 1
    return tot, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a Hugging Face checkpoint dir or a conf/model name")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=9)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--executor", default="reference")
    ap.add_argument("--phase", choices=("decode", "prefill"), default="decode",
                    help="profile the decode steps (default) or the prefill")
    ap.add_argument("--shapes", action="store_true", help="one row per op and input shapes")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("overrides", nargs="*", help="more graphgen overrides, e.g. policy.compress_weight.bits=4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, P, G = args.batch, args.prompt_len, args.gen_len
    ov = ["model.dtype=bfloat16", "policy=all-device", f"policy.gpu_batch_size={B}", "policy.num_gpu_batches=1",
          f"executor.name={args.executor}", "hardware.device_mem=64GB", "report.progress=false", *args.overrides]
    ids = torch.randint(4, 1000, (B, P), generator=torch.Generator().manual_seed(0))
    mark_decode_ops(args.phase)
    with LLM(args.model, ov) as llm:
        llm.generate(ids[:, :8], max_new_tokens=2)  # warm-up: places the weights
        llm.generate(ids, max_new_tokens=G)
        plain = llm.last_stats["decode_s"]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
            llm.generate(ids, max_new_tokens=G)
    n = G - 1
    if args.phase == "prefill":
        plain, n = llm.last_stats["prefill_s"], 1
        print(f"prefill {B * P / plain:.1f} tok/s ({plain * 1e3:.1f} ms) in the profiled run; "
              f"load average {os.getloadavg()[0]:.1f}")
    else:
        print(f"decode {B * n / plain:.1f} tok/s ({plain / n * 1e3:.1f} ms/step) unprofiled; "
              f"load average {os.getloadavg()[0]:.1f}")
    tot, calls = per_op(prof, args.shapes)
    total = sum(tot.values())
    w = 100 if args.shapes else 50
    print(f"{'op (self CPU inside decode squares)':<{w}} {'ms/step':>8} {'%':>5} {'calls/step':>10}")
    for name, t in tot.most_common(args.rows):
        print(f"{name[:w]:<{w}} {t / n / 1e3:8.2f} {100 * t / total:5.1f} {calls[name] / n:10.0f}")
    print(f"{'all ops':<{w}} {total / n / 1e3:8.2f} {'':>5} {sum(calls.values()) / n:10.0f}")


if __name__ == "__main__":
    main()
