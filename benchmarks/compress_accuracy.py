"""Accuracy of compression end to end: graphgen with quantised weights and/or KV cache against
graphgen uncompressed, on the same random Hugging Face OPT checkpoint (float32 compute).

Teacher-forced (graphgen/accuracy.py): every run is fed the uncompressed run's greedy tokens,
so each of the --gen steps of every prompt compares next-token distributions in the same
context; decode steps read the (compressed) KV cache. Columns: top-1 agreement and mean
KL(uncompressed || compressed) in nats; `bytes` is what is stored and moved, as a fraction of
bfloat16 (weights: all layers; cache: the whole cache). A `bf16` row (the weights and compute
in bfloat16, uncompressed) gives the scale of noise users already accept. Weights placed on
the host, cache on the host with CPU attention: every link carries compressed bytes.

    python benchmarks/compress_accuracy.py [--prompts 32] [--len 32] [--gen 16] [--init-std 0.02 0.1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from graphgen import LLM  # noqa: E402
from graphgen.perf.accuracy import agreement, forced_logits  # noqa: E402

CONFIG = dict(vocab_size=2048, hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4,
              max_position_embeddings=256, word_embed_proj_dim=256, do_layer_norm_before=True)
ROWS = {  # name: overrides
    "bf16 (no compression)": ["model.dtype=bfloat16"],
    "weights 8-bit": ["policy.compress_weight.bits=8"],
    "weights 4-bit": ["policy.compress_weight.bits=4"],
    "weights 4-bit dim0": ["policy.compress_weight.bits=4", "policy.compress_weight.group_dim=0"],
    "cache 8-bit": ["policy.compress_cache.bits=8"],
    "cache 4-bit": ["policy.compress_cache.bits=4"],
    "weights 8 + cache 8": ["policy.compress_weight.bits=8", "policy.compress_cache.bits=8"],
    "weights 4 + cache 4": ["policy.compress_weight.bits=4", "policy.compress_cache.bits=4"],
}


def checkpoint(init_std: float, seed: int) -> str:
    """A random float32 OPT saved as an HF checkpoint; larger init_std: peakier predictions."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    path = tempfile.mkdtemp(prefix="graphgen-acc-")
    OPTForCausalLM(OPTConfig(**CONFIG, init_std=init_std)).eval().save_pretrained(path)
    return path


def prompts(n: int, length: int, seed: int):
    """n random prompts, left-padded to `length` (every third one 8 tokens shorter)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, CONFIG["vocab_size"], (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, :8] = 0
    return ids.masked_fill(mask == 0, 1), mask


def ratio(stats, what: str) -> str:
    c = (stats.get("compression") or {}).get(what)
    return f"{c['bytes'] / (c['dense_bytes'] / 2):.3f}" if c else "1.000"  # dense_bytes is float32 here


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--len", type=int, default=32)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-std", type=float, nargs="+", default=[0.02, 0.1])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ids, mask = prompts(args.prompts, args.len, args.seed + 1)
    base = ["model.dtype=float32", "policy.gpu_batch_size=8", "policy.num_gpu_batches=2", "report.progress=false",
            "policy.percent=[0,100,0,100,100,0]", "policy.cpu_attention=true"]
    print(f"random OPT {CONFIG}\n{args.prompts} prompts x {args.len} tokens, {args.gen} teacher-forced steps, "
          "float32 compute; groups of 64\n")
    for std in args.init_std:
        path = checkpoint(std, args.seed)
        with LLM(path, base) as llm:
            ref, tokens = forced_logits(llm, ids, mask, args.gen)
        top = ref.softmax(-1).max(-1).values.mean().item()
        print(f"init_std {std}: mean top-1 probability of the uncompressed run {top:.3f}")
        print(f"  {'run':<24} {'weight bytes':>12} {'cache bytes':>12} {'top-1 agree':>12} {'mean KL (nats)':>15}")
        for name, extra in ROWS.items():
            with LLM(path, base + extra) as llm:
                logits, _ = forced_logits(llm, ids, mask, args.gen, forced=tokens)
                st = llm.last_stats
            a = agreement(ref, logits)
            print(f"  {name:<24} {ratio(st, 'weight'):>12} {ratio(st, 'cache'):>12} {a['top1']:>12.4f} "
                  f"{a['kl']:>15.2e}")
        print()


if __name__ == "__main__":
    main()
