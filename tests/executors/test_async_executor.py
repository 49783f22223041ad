"""Async executor (executors/async_streams.py): bit-identical to the reference executor for every
schedule and placement; loads really overlap compute; failures and Ctrl-C stop every stream;
tiers stay within the plan, and the process within the plan plus the stated overhead."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from executors.async_streams import AsyncExecutor, plan_streams
from graphgen import LLM
from graphgen.build import build_graph
from graphgen.config import compose
from graphgen.models import build_spec, hf_config_from_arch
from passes import run_pipeline

from ..conftest import left_padded_batch
from ..test_generate_hf import PLACEMENTS


def make_llm(ckpt, offload_dir, executor, *, schedule="zigzag", percent=PLACEMENTS["mixed"], cpu_attention=True,
             extra=()):
    return LLM(str(ckpt), [f"schedule={schedule}", f"policy.percent={percent}",
                           f"policy.cpu_attention={str(cpu_attention).lower()}", "model.dtype=float32",
                           "policy.gpu_batch_size=2", "policy.num_gpu_batches=3", f"hardware.offload_dir={offload_dir}",
                           f"executor.name={executor}", *extra])


def generate(ckpt, offload_dir, executor, gen=6, n=5, **kw):
    ids, mask = left_padded_batch(n)
    with make_llm(ckpt, offload_dir, executor, **kw) as llm:
        out = llm.generate(ids, attention_mask=mask, max_new_tokens=gen)
        return out, llm.last_stats, llm


def reference_and_async(ckpt, offload_dir, **kw):
    """Both executors on one compiled graph: (reference tokens, async tokens, async stats)."""
    ids, mask = left_padded_batch(5)
    with make_llm(ckpt, offload_dir, "reference", **kw) as llm:
        ref = llm.generate(ids, attention_mask=mask, max_new_tokens=6)
        llm.close()
        llm.cfg.executor.name = "async"
        out = llm.generate(ids, attention_mask=mask, max_new_tokens=6)
        return ref, out, llm.last_stats


@pytest.mark.parametrize("schedule", ["row", "zigzag"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("cpu_attention", [False, True])
def test_bit_identical_to_reference(opt_ckpt, offload_dir, schedule, placement, cpu_attention):
    ref, out, st = reference_and_async(opt_ckpt[0], offload_dir, schedule=schedule, percent=PLACEMENTS[placement],
                                       cpu_attention=cpu_attention)
    assert torch.equal(out, ref)
    assert st["executor"] == "async"
    for tier in ("device", "host", "disk"):  # the stores' values leave their tier when the square ends
        assert st["measured_peak_bytes"][tier] <= st["planned_peak_bytes"][tier]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_prefetch_distance_keeps_outputs(opt_ckpt, offload_dir, prefetch):
    ref, out, _ = reference_and_async(opt_ckpt[0], offload_dir, extra=[f"executor.prefetch={prefetch}"])
    assert torch.equal(out, ref)


def test_bfloat16_bit_identical(opt_ckpt, offload_dir):
    ref, out, _ = reference_and_async(opt_ckpt[0], offload_dir, extra=["model.dtype=bfloat16"])
    assert torch.equal(out, ref)


def test_loads_overlap_compute(opt_ckpt, offload_dir, monkeypatch):
    """With a compute that takes a while, the next square's disk loads run during it."""
    real = AsyncExecutor.compute

    def slow(self, n, a):
        real(self, n, a)
        time.sleep(0.003)

    monkeypatch.setattr(AsyncExecutor, "compute", slow)
    _, st, _ = generate(opt_ckpt[0], offload_dir, "async", percent=PLACEMENTS["all-disk"],
                        extra=["executor.trace=true"])
    assert st["overlap_fraction"] > 0.3 and st["io_busy_s"] > 0
    assert st["link_bytes"]["disk->device"] > 0 and st["link_gbps"]["disk->device"] > 0


def test_no_io_threads_when_every_copy_stays_in_ram(opt_ckpt, offload_dir, monkeypatch):
    """CPU, nothing on disk: loads and stores run on the compute thread; no other thread starts
    (a third thread on the cores that compute uses only slows it down)."""
    seen = set()
    real = AsyncExecutor.compute

    def watch(self, n, a):
        seen.update(t.name for t in threading.enumerate())
        real(self, n, a)

    monkeypatch.setattr(AsyncExecutor, "compute", watch)
    ref, out, _ = reference_and_async(opt_ckpt[0], offload_dir, percent="[30,70,30,70,0,100]")
    assert torch.equal(out, ref)
    assert seen and not any(name.startswith("graphgen-") for name in seen)


def test_overlap_in_trace_events(opt_ckpt, offload_dir):
    """Some load interval intersects some compute interval (no help from a slowed compute)."""
    ids, mask = left_padded_batch(5)
    llm = LLM(str(opt_ckpt[0]), ["model.dtype=float32", f"policy.percent={PLACEMENTS['all-disk']}",
                                 "policy.gpu_batch_size=2", "policy.num_gpu_batches=3", "executor.name=async",
                                 "executor.trace=true", f"hardware.offload_dir={offload_dir}"])
    with llm:
        llm.generate(ids, attention_mask=mask, max_new_tokens=8)
        events = llm.executor.trace.events
    loads = [(e.start, e.end) for e in events if e.stream == "load"]
    computes = [(e.start, e.end) for e in events if e.stream == "compute"]
    assert any(ls < ce and cs < le for ls, le in loads for cs, ce in computes)


def test_stream_plan_respects_slots_and_producers():
    cfg = compose(["model=opt-125m", "model.arch.num_hidden_layers=2", f"policy.percent={PLACEMENTS['all-disk']}",
                   "policy.num_gpu_batches=2"])
    spec = build_spec(hf_config_from_arch(cfg.model.arch), cfg.model.name)
    g = run_pipeline(build_graph(spec, batch=2, num_batches=2, prompt_len=4, gen_len=3), cfg)
    plan = plan_streams(g, g.graph["ops"])
    assert sum(len(v) for v in plan.ops.values()) == len(g.graph["ops"])
    computes = plan.ops["compute"]
    for n in plan.ops["load"]:
        a = g.nodes[n]
        assert plan.waits[n][1] == a["slot"]  # waits for the computes of earlier slots only
        assert plan.waits[n][1] <= computes.index(a["square"])  # never for its own consumer
    for n in plan.ops["store"]:
        assert plan.waits[n][1] == computes.index(g.nodes[n]["square"]) + 1


def _fail_at(monkeypatch, method, count, exc):
    real = getattr(AsyncExecutor, method)
    calls = {"n": 0}

    def failing(self, *a):
        calls["n"] += 1
        if calls["n"] == count:
            raise exc
        return real(self, *a)

    monkeypatch.setattr(AsyncExecutor, method, failing)


@pytest.mark.parametrize("method,exc", [("load", RuntimeError("disk on fire")), ("store", OSError("no room")),
                                        ("compute", KeyboardInterrupt())])
def test_failure_stops_every_stream_and_cleans_up(opt_ckpt, offload_dir, monkeypatch, method, exc):
    _fail_at(monkeypatch, method, 5, exc)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(type(exc)):
        generate(opt_ckpt[0], offload_dir, "async", percent=PLACEMENTS["all-disk"])
    time.sleep(0.05)
    leftover = {t.name for t in threading.enumerate()} - before
    assert not {n for n in leftover if n.startswith("graphgen-load") or n.startswith("graphgen-store")}
    assert os.listdir(offload_dir) == [] if os.path.exists(offload_dir) else True


def test_measured_ram_within_plan_plus_stated_overhead(offload_dir):
    """A model big enough that the plan dominates: RSS growth <= planned RAM + stated overhead."""
    ov = ["model=opt-125m", "model.weights=dummy", "model.dtype=bfloat16", "policy.percent=[0,50,0,100,100,0]",
          "policy.gpu_batch_size=4", "policy.num_gpu_batches=2", "executor.name=async",
          f"hardware.offload_dir={offload_dir}"]
    ids = torch.randint(4, 1000, (8, 64))
    with LLM(overrides=ov) as llm:
        llm.generate(ids, max_new_tokens=4)
        st = llm.last_stats
    plan = st["planned_peak_bytes"]
    grew = st["rss_peak_bytes"] - st["rss_start_bytes"]
    assert plan["disk"] > 0 and grew > 0
    assert grew <= plan["device"] + plan["host"] + st["overhead_bytes"]
