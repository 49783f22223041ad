"""Regenerate the README pictures in docs/images/ (offline, headless, about a minute on a CPU).

    python docs/make_images.py [--executor async|reference] [--out docs/images]

- schedule-small.png: row vs zig-zag on the paper's figure size (3 tokens x 4 layers x 4 GPU batches),
  compiled from OPT's architecture with one decoder layer (no weights needed);
- schedule-opt-175b.png: the same two schedules for OPT-175B (prompt 512, 32 tokens, weights half in
  host RAM and half on disk), drawn as an image of the whole grid;
- timeline.png: a real run's trace (opt-125m's shapes with 4 decoder layers, dummy weights, weights
  split host/disk, async executor): the load / compute / store streams and memory per tier over time.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from graphgen import LLM  # noqa: E402
from graphgen.build import build_graph  # noqa: E402
from graphgen.config import compose  # noqa: E402
from graphgen.models import build_spec, hf_config_from_arch  # noqa: E402
from graphgen.report.timeline import write_timeline  # noqa: E402
from graphgen.report.schedule import detail_size, draw_schedule, new_figure, save  # noqa: E402
from passes import run_pipeline  # noqa: E402


def compiled(overrides, *, batch, num_batches, prompt_len, gen_len):
    cfg = compose(overrides)
    spec = build_spec(hf_config_from_arch(cfg.model.arch), cfg.model.name)
    g = build_graph(spec, batch=batch, num_batches=num_batches, prompt_len=prompt_len, gen_len=gen_len,
                    dtype=cfg.model.dtype)
    return run_pipeline(g, cfg)


def small_schedules(out: Path):
    """Weights of embed/attn on the host, mlp/head on disk; 2 of 4 caches on the host, CPU attention."""
    ov = ["model.arch.num_hidden_layers=1", "policy.percent=[0,50,50,50,100,0]", "policy.cpu_attention=true"]
    w, h = detail_size(3, 4, 4)
    fig = new_figure(w, 2 * h)
    for ax, sched in zip(fig.subplots(2, 1), ("row", "zigzag")):
        draw_schedule(compiled([f"schedule={sched}", *ov], batch=2, num_batches=4, prompt_len=8, gen_len=3), ax)
    return save(fig, out / "schedule-small", ["png"])


def big_schedules(out: Path):
    ov = ["model=opt-175b", "model.dtype=float16", "policy=disk-offload", "hardware.host_mem=2TB",
          "hardware.disk_mem=10TB"]
    fig = new_figure(16, 7)
    for ax, sched in zip(fig.subplots(1, 2), ("row", "zigzag")):
        g = compiled([f"schedule={sched}", *ov], batch=8, num_batches=4, prompt_len=512, gen_len=32)
        draw_schedule(g, ax, detail=False)
    return save(fig, out / "schedule-opt-175b", ["png"])


def timeline(out: Path, executor: str):
    with tempfile.TemporaryDirectory() as off:
        ov = ["model.weights=dummy", "model.arch.num_hidden_layers=4", "policy.percent=[0,50,0,100,100,0]",
              "policy.cpu_attention=true", "policy.gpu_batch_size=4", "policy.num_gpu_batches=2",
              "executor.trace=true", f"executor.name={executor}", f"hardware.offload_dir={off}"]
        with LLM("opt-125m", ov) as llm:
            ids = torch.randint(4, 1000, (8, 32), generator=torch.Generator().manual_seed(0))
            llm.generate(ids, max_new_tokens=6)
            title = (f"opt-125m shapes, 4 decoder layers (dummy weights): zig-zag, 2 GPU batches of 4, "
                     f"weights host/disk, executor {executor}")
            return write_timeline(llm.executor.trace, out / "timeline", ["png"], llm.graph, title)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--executor", default="async", help="executor whose trace is drawn (async | reference)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = ap.parse_args()
    for path in small_schedules(args.out) + big_schedules(args.out) + timeline(args.out, args.executor):
        print(path)


if __name__ == "__main__":
    main()
