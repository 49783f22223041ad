"""Pipeline parallelism under torchrun: join the process group, check that every rank runs the same
job, gather each rank's budgets, and gather each stage's figures into rank 0's report.

    torchrun --nproc-per-node 2 -m graphgen model=opt-1.3b          # 2 stages on one machine
    torchrun --nnodes 2 --node-rank R --nproc-per-node 1 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m graphgen model=opt-30b   # across machines

Stage r runs on rank r (executors/pipeline.py); the split is passes/partition_stages.py's.
Without torchrun (no WORLD_SIZE) nothing here does anything. See docs/distributed.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from .compile import checkpoint_of
from .config import Config

# keys each rank may set for itself: its machine's budgets and paths, and what only rank 0 does
PER_RANK = ("hardware", "model.path", "viz", "report", "job.progress", "parallel.stage_budgets")
_timeout_s = 0.0  # parallel.timeout_s of the process group this process joined


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_reporter() -> bool:
    """Rank 0 prints the report (and writes files); the only process without torchrun."""
    return not dist.is_initialized() or dist.get_rank() == 0


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def from_reporter(obj: Any, what: str) -> Any:
    """Rank 0's obj on every rank (torch.distributed.broadcast_object_list; the others pass None).
    A rank 0 that died, or sends nothing within parallel.timeout_s, is named in the error."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:
        who = f"{others()} did not receive" if rank() == 0 else "rank 0 did not send"
        raise ConnectionError(f"rank {rank()}: {who} {what} within parallel.timeout_s={_timeout_s:g} s: it "
                              f"died or hung (see its log); ({str(e).splitlines()[0] if str(e) else e})") from None
    return box[0]


def others() -> str:
    """The ranks other than 0, in words: which one failed a collective, the error does not say."""
    world = dist.get_world_size()
    return "rank 1" if world == 2 else f"one of ranks 1..{world - 1}"


def setup(cfg: Config) -> Config:
    """Under torchrun: join the process group (gloo on CPU, NCCL on CUDA), refuse ranks whose
    configs or checkpoints differ, and put every rank's budgets in parallel.stage_budgets."""
    world = world_size()
    if world == 1 or dist.is_initialized():
        return cfg
    if cfg.parallel.stages and cfg.parallel.stages != world:
        raise ValueError(f"parallel.stages={cfg.parallel.stages} but torchrun started {world} processes: set "
                         f"torchrun --nproc-per-node (x --nnodes) to {cfg.parallel.stages}, or drop parallel.stages "
                         f"(it defaults to the world size)")
    me = int(os.environ.get("RANK", "0"))
    runs = cfg.job.name in ("generate", "batch")  # simulate and plan run nothing: gloo, no GPU needed
    if runs and cfg.hardware.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"rank {me}: hardware.device={cfg.hardware.device} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s) for local rank {local}: start at most that many "
                             f"processes per machine (torchrun --nproc-per-node), or set hardware.device=cpu")
        torch.cuda.set_device(local)
        cfg = replace(cfg, hardware=replace(cfg.hardware, device=f"cuda:{local}"))
    timeout = timedelta(seconds=float(cfg.parallel.timeout_s))
    global _timeout_s
    _timeout_s = timeout.total_seconds()
    try:
        dist.init_process_group("nccl" if runs and cfg.hardware.device.startswith("cuda") else "gloo",
                                timeout=timeout)
    except RuntimeError as e:
        raise ConnectionError(f"rank {me}: not all {world} ranks joined within parallel.timeout_s="
                              f"{timeout.total_seconds():g} s (a rank failed to start, or MASTER_ADDR / "
                              f"--rdzv-endpoint is unreachable): {e}") from None
    mine = {"config": shared_config(cfg), "checkpoint": checkpoint_digest(cfg),
            "budgets": {f"{t}_mem": getattr(cfg.hardware, f"{t}_mem") for t in ("device", "host", "disk")}}
    everyone: List[Optional[Dict]] = [None] * world
    dist.all_gather_object(everyone, mine)
    check_agree(everyone)
    budgets = cfg.parallel.stage_budgets or [r["budgets"] for r in everyone]
    return replace(cfg, parallel=replace(cfg.parallel, stages=world, stage_budgets=budgets))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shared_config(cfg: Config) -> Dict[str, str]:
    """The config as flat key -> value, without the keys each rank may set for itself."""
    flat: Dict[str, str] = {}

    def walk(prefix, v):
        if prefix in PER_RANK:
            return
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            flat[prefix] = json.dumps(v, sort_keys=True, default=str)

    walk("", asdict(cfg))
    return flat


def checkpoint_digest(cfg: Config) -> str:
    """What identifies the weights: config.json and the weight files' names and sizes (or the seed of
    dummy weights)."""
    ckpt = checkpoint_of(cfg)
    if ckpt is None:
        return f"dummy weights, seed {cfg.seed}"
    h = hashlib.sha256()
    for f in sorted(Path(ckpt).iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".gguf"):
            h.update(f"{f.name}:{f.stat().st_size};".encode())
    return h.hexdigest()[:16]


def check_agree(everyone: List[Dict]) -> None:
    """Every rank must run the same job on the same checkpoint; the error names rank and keys."""
    ref = everyone[0]
    for r, d in enumerate(everyone[1:], 1):
        keys = sorted(k for k in set(ref["config"]) | set(d["config"]) if ref["config"].get(k) != d["config"].get(k))
        if keys:
            diff = "; ".join(f"{k}: rank 0 {ref['config'].get(k)} vs rank {r} {d['config'].get(k)}" for k in keys[:5])
            raise ValueError(f"ranks run different configs ({diff}): give every rank the same overrides "
                             f"(only hardware.*, model.path, viz.*, report.* may differ)")
        if d["checkpoint"] != ref["checkpoint"]:
            raise ValueError(f"rank {r}'s checkpoint differs from rank 0's (config.json or weight file sizes; "
                             f"{d['checkpoint']} vs {ref['checkpoint']}): copy the same checkpoint to every "
                             f"machine (model.path)")


def for_prediction(cfg: Config) -> Optional[Config]:
    """job=simulate / job=plan under torchrun: rank 0 predicts or draws the whole pipeline, with every
    rank's budgets (setup) and, to simulate, the link measured between the ranks where
    hardware.profile.net_bw / net_latency_s are not set; None on the other ranks (nothing to do)."""
    if not dist.is_initialized():
        return cfg
    link = measure_link() if cfg.job.name == "simulate" else {}
    if rank() != 0:
        return None
    missing = {k: v for k, v in link.items() if k not in cfg.hardware.profile}
    if missing:
        print(f"graphgen: the link between ranks, measured: {link['net_bw'] / 1e9:.2f} GB/s, latency "
              f"{link['net_latency_s'] * 1e6:.0f} us (+hardware.profile.net_bw / net_latency_s set others)",
              file=sys.stderr)
        cfg = replace(cfg, hardware=replace(cfg.hardware, profile={**cfg.hardware.profile, **missing}))
    return cfg


def measure_link(rounds: int = 20, nbytes: int = 1 << 20) -> Dict[str, float]:
    """The slowest link between neighbouring ranks (r and r + 1, as activations flow), for the cost
    model: latency of an 8-byte ping-pong, and bytes/s of nbytes messages (their latency included:
    a floor). Every rank calls it; each gets the result."""
    me, world = rank(), dist.get_world_size()
    worst = {"net_latency_s": 0.0, "net_bw": float("inf")}
    for a in range(world - 1):  # one pair at a time: the others wait at the barrier
        dist.barrier()
        if me not in (a, a + 1):
            continue
        times = []
        for n in (8, nbytes):
            t = torch.zeros(n // 4)
            t0 = time.perf_counter()
            for _ in range(rounds):
                if me == a:
                    dist.send(t, a + 1)
                    dist.recv(t, a + 1)
                else:
                    dist.recv(t, a)
                    dist.send(t, a)
            times.append((time.perf_counter() - t0) / (2 * rounds))
        worst = {"net_latency_s": max(worst["net_latency_s"], times[0]), "net_bw": min(worst["net_bw"], nbytes / times[1])}
    everyone: List[Optional[Dict]] = [None] * world
    dist.all_gather_object(everyone, worst)
    return {"net_latency_s": max(d["net_latency_s"] for d in everyone), "net_bw": min(d["net_bw"] for d in everyone)}


# what each rank adds to its stage's figures for rank 0's report (graphgen/api.py's stats of the call)
STAGE_KEYS = ("prefill_s", "decode_s", "measured_peak_bytes", "bytes_moved", "rss_start_bytes", "rss_peak_bytes",
              "cuda_peak_bytes", "overhead_bytes", "device_type", "compute_busy_s", "io_busy_s", "overlap_fraction",
              "trace_span_s", "link_busy_s")
# one process's trace figures, not the pipeline's: each stage's are under stages
TRACE_KEYS = ("compute_busy_s", "io_busy_s", "overlap_fraction", "trace_span_s", "stream_busy_s", "link_gbps")


def to_reporter(obj: Any, what: str) -> Optional[List[Any]]:
    """Every rank's obj, in rank order, on rank 0 (torch.distributed.gather_object); None elsewhere."""
    if not dist.is_initialized():
        return [obj]
    everyone: Optional[List[Any]] = [None] * dist.get_world_size() if rank() == 0 else None
    try:
        dist.gather_object(obj, everyone, dst=0)
    except RuntimeError as e:
        who = f"{others()} did not send" if rank() == 0 else "rank 0 did not receive"
        raise ConnectionError(f"rank {rank()}: {who} {what} within parallel.timeout_s={_timeout_s:g} s: it "
                              f"died or hung (see its log); ({str(e).splitlines()[0] if str(e) else e})") from None
    return everyone


def gather_traces(trace) -> Optional[List[Optional[Dict]]]:
    """Rank 0: every rank's trace ({rank, t0_wall, events}; None for a rank without one), for one
    trace file with a track per rank (report/timeline.py); None elsewhere and without torchrun.
    Every rank must call it."""
    if not dist.is_initialized():
        return None
    mine = None if trace is None else {"rank": rank(), "t0_wall": trace.t0_wall, "events": list(trace.events)}
    return to_reporter(mine, "its trace")


def gather_report(st: Dict) -> Dict:
    """Rank 0: every stage's figures over this call's blocks (wall and busy time, bytes sent and
    moved, planned and measured peaks), the bubble fraction, bytes per link, and the throughput
    over the slowest stage's time (the pipeline's). Every rank must call it; the others get st."""
    if not dist.is_initialized() or "stage" not in st:
        return st
    mine = dict(st["stage"], **{k: st[k] for k in STAGE_KEYS if k in st})
    everyone = to_reporter(mine, "its stage's figures for the report")
    return st if everyone is None else combine_stages(st, everyone)


def combine_stages(st: Dict, everyone: List[Dict]) -> Dict:
    """Rank 0's stats of the call and every stage's figures -> the pipeline's report."""
    slow = max(everyone, key=lambda d: d["prefill_s"] + d["decode_s"])
    n, S, gen = st["num_prompts"], st["prompt_len"], st["gen_len"]
    st = {k: v for k, v in st.items() if k not in TRACE_KEYS and k != "stage"}
    st.update(prefill_s=slow["prefill_s"], decode_s=slow["decode_s"])
    st.update(prefill_tok_s=n * S / st["prefill_s"] if st["prefill_s"] else 0.0,
              decode_tok_s=n * (gen - 1) / st["decode_s"] if st["decode_s"] and gen > 1 else 0.0,
              total_tok_s=n * gen / (st["prefill_s"] + st["decode_s"]) if st["prefill_s"] + st["decode_s"] else 0.0)
    pipe = pipeline_figures(everyone)
    links, moved, link_busy = pipe["link_bytes"], {}, {}
    for d in everyone:
        for k, v in d.get("bytes_moved", {}).items():
            if not k.startswith("stage"):  # tiers within the stage; between stages: what was sent
                moved[k] = moved.get(k, 0) + v
        for k, v in d.get("link_busy_s", {}).items():
            link_busy[k] = link_busy.get(k, 0.0) + v
    st.update(pipe, bytes_moved={**moved, **links}, link_busy_s=link_busy)
    return st


def pipeline_figures(everyone: List[Dict]) -> Dict:
    """The stages' figures, the bubble fraction (compute idle over stages x the slowest stage's
    wall time) and the bytes sent per link between stages."""
    span = max(d["wall_s"] for d in everyone)
    busy = sum(d["busy_s"].get("compute", 0.0) for d in everyone)
    links: Dict[str, int] = {}
    for d in everyone:
        for k, v in d["sent_bytes"].items():
            links[k] = links.get(k, 0) + v
    return {"stages": everyone, "bubble_fraction": 1.0 - busy / (len(everyone) * span) if span else 0.0,
            "link_bytes": links}
