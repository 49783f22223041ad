"""Accuracy of group-wise weight quantisation on a random tiny OPT (Hugging Face forward).

Every Linear weight of the decoder layers (q/k/v/out_proj, fc1, fc2; not biases, not norms)
is replaced by dequantize(quantize(w)); next-token distributions are compared with the
float32 original over a batch of random prompts, at every position:
    top-1 agreement (fraction of positions whose argmax is unchanged) and mean KL(orig || quant).
Rows with `+emb` also quantise the tied input embedding / LM head (FlexGen compresses it too).
A `bf16` row (weights rounded to bfloat16) gives the scale of harmless noise.

    python benchmarks/quant_accuracy.py [--prompts 32] [--len 64] [--seed 0] [--init-std 0.02]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from executors.quant import dequantize, quantize  # noqa: E402

CONFIG = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, ffn_dim=256,
              num_attention_heads=4, max_position_embeddings=256)


def tiny_opt(seed: int, init_std: float):
    """Random float32 OPT with the brief's shape; a larger init_std gives peakier predictions."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    return OPTForCausalLM(OPTConfig(**CONFIG, init_std=init_std)).eval()


def fake_quant(w: torch.Tensor, bits: int, group_size: int, group_dim: int) -> torch.Tensor:
    """w -> dequantize(quantize(w)), same dtype."""
    return dequantize(quantize(w, bits, group_size, group_dim), dtype=w.dtype)


@torch.no_grad()
def quantised_copy(model, transform, embeddings: bool):
    """Copy of `model` with transform applied to decoder Linear weights (and embeddings)."""
    m = copy.deepcopy(model)
    for layer in m.model.decoder.layers:
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(transform(mod.weight))
    if embeddings:  # tied with lm_head
        emb = m.model.decoder.embed_tokens.weight
        emb.copy_(transform(emb))
    return m


@torch.no_grad()
def compare(ref_logits: torch.Tensor, logits: torch.Tensor):
    """(top-1 agreement, mean KL(ref || q) in nats) over all positions; logits [B, T, V]."""
    agree = (ref_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
    lp, lq = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return agree, kl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--init-std", type=float, default=0.02, help="HF's default 0.02: near-uniform outputs")
    args = ap.parse_args()

    model = tiny_opt(args.seed, args.init_std)
    ids = torch.randint(2, CONFIG["vocab_size"], (args.prompts, args.len),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits  # [B, T, V]
    probs = ref.softmax(-1)
    gap = probs.topk(2, -1).values
    print(f"tiny OPT {CONFIG}, init_std {args.init_std}, {args.prompts} prompts x {args.len} tokens, "
          "float32 forward")
    print(f"reference: mean top-1 prob {gap[..., 0].mean():.4f}, mean top1-top2 logit gap "
          f"{(ref.topk(2, -1).values.diff(dim=-1).abs()).mean():.4f}\n")
    print(f"{'weights':<22} {'bytes/bf16':>10} {'top-1 agree':>12} {'mean KL (nats)':>15}")
    gs = args.group_size
    rows = [("bf16", lambda w: w.bfloat16().float(), 1.0)]
    for bits in (8, 4):
        for gd in (-1, 0):
            ratio = quantize(torch.zeros(4096, 4096), bits, gs, gd).nbytes / (2 * 4096 * 4096)
            fn = (lambda b, d: lambda w: fake_quant(w, b, gs, d))(bits, gd)  # bind bits, gd now
            rows.append((f"{bits}-bit g{gs} dim{gd}", fn, ratio))
    for name, fn, ratio in rows:
        for emb in (False, True):
            with torch.no_grad():
                logits = quantised_copy(model, fn, emb)(input_ids=ids).logits
            agree, kl = compare(ref, logits)
            label = name + (" +emb" if emb else "")
            print(f"{label:<22} {ratio:>10.3f} {agree:>12.4f} {kl:>15.2e}")


if __name__ == "__main__":
    main()
