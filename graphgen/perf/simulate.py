"""`job=simulate`: compile the schedule and "run" it on the cost model, touching no weights."""
from __future__ import annotations

import math
import sys

from ..compile import checkpoint_of, compile, spec_for, workload_shape
from ..config import Config
from .costmodel import CostModel, Prediction, simulate
from .optimize import resolve_policy
from .profile import hardware_profile


def predict(cfg: Config, graph=None) -> Prediction:
    graph = graph if graph is not None else compile(spec_for(cfg, checkpoint_of(cfg)), cfg, workload_shape(cfg))
    model = CostModel(hardware_profile(cfg), cfg.model.dtype, cfg.hardware.device)
    return simulate(graph, model, overlap=cfg.executor.name != "reference")


def format_prediction(cfg: Config, pr: Prediction, name: str = "") -> str:
    p, w = cfg.policy, cfg.workload
    n = w.num_prompts or p.gpu_batch_size * p.num_gpu_batches
    blocks = math.ceil(n / (p.gpu_batch_size * p.num_gpu_batches))
    gb = lambda x: f"{x / 1e9:.1f} GB"  # noqa: E731
    lines = [
        f"simulated {name or cfg.model.name} on hardware={cfg.hardware.name}, schedule {cfg.schedule.name}, "
        f"policy percent={list(p.percent)} gbs={p.gpu_batch_size} x {p.num_gpu_batches} "
        f"cpu_attention={p.cpu_attention}; {blocks} block(s) of prompt {w.prompt_len} -> gen {w.gen_len}",
        f"predicted   prefill {pr.prompt_tokens / pr.prefill_s if pr.prefill_s else 0:.1f} tok/s   "
        f"decode {(pr.tokens - pr.tokens // w.gen_len) / pr.decode_s if pr.decode_s else 0:.2f} tok/s   "
        f"total {pr.total_tok_s:.3f} tok/s   (block: prefill {pr.prefill_s:.2f} s, decode {pr.decode_s:.2f} s)",
        "busy        " + "   ".join(f"{s} {t:.2f} s" for s, t in pr.busy_s.items())
        + ("" if pr.overlap else "   (executor=reference: no overlap)"),
        "compute     " + "   ".join(f"{k} {v:.2f} s" for k, v in sorted(pr.compute_parts.items()) if v),
        f"bottleneck  {pr.bottleneck}; bound {pr.bound_tok_s:.3f} tok/s (busiest stream never waiting)",
    ]
    if pr.link_s:
        lines.append("links       " + "   ".join(f"{k} {gb(pr.link_bytes[k])} in {v:.2f} s"
                                                for k, v in sorted(pr.link_s.items()) if pr.link_bytes[k]))
    lines += stage_lines(pr)
    return "\n".join(lines)


def stage_lines(pr: Prediction) -> list:
    """Pipeline stages (parallel.stages): busy time per stage and stream, and the bubbles."""
    if not pr.stages:
        return []
    out = [f"pipeline    {len(pr.stages)} stages; bubble fraction {pr.bubble_fraction:.0%} "
           f"(compute idle over stages x the block's time)"]
    out += [f"  stage {s}   " + "   ".join(f"{k} {v:.2f} s" for k, v in b.items() if v) for s, b in enumerate(pr.stages)]
    return out


def run_simulation(cfg: Config) -> Prediction:
    spec = spec_for(cfg, checkpoint_of(cfg))  # model.path: the checkpoint's architecture, not model.arch
    cfg = resolve_policy(cfg, out=sys.stdout, spec=spec)  # policy=auto: optimise, print the choice
    pr = predict(cfg, compile(spec, cfg, workload_shape(cfg)))
    print(format_prediction(cfg, pr, spec.name))
    return pr
