"""Regenerate the pictures of README.md and docs/ in docs/images/ (offline, headless, about a minute on a CPU).

    python docs/make_images.py [--only schedule|timeline] [--executor async|reference] [--out docs/images]

- schedule-small.png: row vs zig-zag on the paper's figure size (3 tokens x 4 layers x 4 GPU batches),
  compiled from OPT's architecture with one decoder layer (no weights needed): every square in detail;
- schedule-opt-125m-zigzag.png / schedule-opt-125m-row.png: the same two schedules at real size, what
  `python -m graphgen job=plan viz.schedule=true ...` draws for opt-125m (26 layers, 8 token steps, 4 GPU
  batches, weights half in host RAM and half on disk, half the KV caches on the host): a detail window,
  the whole run and the traversal;
- schedule-opt-175b.png: the traversal of both schedules for OPT-175B (prompt 512, 32 tokens, 4 GPU batches of 8,
  weights half in host RAM and half on disk), with their weight traffic;
- timeline.png: a real run's trace (opt-125m's shapes with 4 decoder layers, dummy weights, weights
  split host/disk, async executor): the load / compute / store streams and memory per tier over time.
"""
from __future__ import annotations

import argparse
import shutil
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
from graphgen.run import run  # noqa: E402
from graphgen.report.timeline import write_timeline  # noqa: E402
from graphgen.report.schedule import (detail_size, draw_schedule, draw_traversal,  # noqa: E402
                                      new_figure, save, schedule_grid)
from passes import run_pipeline  # noqa: E402


def compiled(overrides, *, batch, num_batches, prompt_len, gen_len):
    cfg = compose(overrides)
    spec = build_spec(hf_config_from_arch(cfg.model.arch), cfg.model.name)
    g = build_graph(spec, batch=batch, num_batches=num_batches, prompt_len=prompt_len, gen_len=gen_len,
                    dtype=cfg.model.dtype)
    return run_pipeline(g, cfg)


OFFLOAD = "policy.percent=[0,50,50,50,100,0]"  # weights host/disk, half the KV caches on the host


def small_schedules(out: Path):
    """Weights of embed/attn on the host, mlp/head on disk; 2 of 4 caches on the host, CPU attention."""
    ov = ["model.arch.num_hidden_layers=1", OFFLOAD, "policy.cpu_attention=true"]
    w, h = detail_size(3, 4, 4)
    fig = new_figure(w, 2 * h)
    for ax, sched in zip(fig.subplots(2, 1), ("row", "zigzag")):
        draw_schedule(compiled([f"schedule={sched}", *ov], batch=2, num_batches=4, prompt_len=8, gen_len=3), ax)
    return save(fig, out / "schedule-small", ["png"])


def real_size_schedules(out: Path):
    """What `python -m graphgen job=plan viz.schedule=true` draws for opt-125m (the same run, its file copied)."""
    paths = []
    for sched in ("zigzag", "row"):
        with tempfile.TemporaryDirectory() as tmp:
            st = run(compose(["job=plan", "viz.schedule=true", "viz.formats=[png]", f"viz.out_dir={tmp}",
                              f"schedule={sched}", "policy.num_gpu_batches=4", "workload.gen_len=8", OFFLOAD]))
            paths.append(Path(shutil.copy(st["files"][0], out / f"schedule-opt-125m-{sched}.png")))
    return paths


def big_schedules(out: Path):
    ov = ["model=opt-175b", "model.dtype=float16", "policy=disk-offload", "hardware.host_mem=2TB",
          "hardware.disk_mem=10TB"]
    fig = new_figure(16, 7)
    for ax, sched in zip(fig.subplots(2, 1), ("row", "zigzag")):
        g = compiled([f"schedule={sched}", *ov], batch=8, num_batches=4, prompt_len=512, gen_len=32)
        grid = schedule_grid(g)
        draw_traversal(ax, grid)
        ax.set_title(f"OPT-175B, schedule {sched}: {len(grid.w_loads)} weight loads "
                     f"({grid.load_bytes['w'] / 1e12:.1f} TB); which layer runs at each execution step, "
                     f"coloured by GPU batch (mixed colours = batches interleaved)", fontsize=10, loc="left")
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
    ap.add_argument("--only", choices=("schedule", "timeline"), help="draw only these pictures")
    args = ap.parse_args()
    paths = []
    if args.only in (None, "schedule"):
        paths += small_schedules(args.out) + real_size_schedules(args.out) + big_schedules(args.out)
    if args.only in (None, "timeline"):
        paths += timeline(args.out, args.executor)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
