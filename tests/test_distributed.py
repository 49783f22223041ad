"""graphgen/distributed.py without processes: how rank 0 combines the stages' figures into the
report (a generate call's blocks, not the executor's lifetime; links counted once, by the sender;
one process's trace figures not passed off as the pipeline's); job=simulate and job=plan under
torchrun. Pipelines that generate: tests/executors/test_distributed.py, tests/apps/test_batch_torchrun.py."""
from __future__ import annotations

import re

import pytest

from graphgen.api import stage_figures
from graphgen.distributed import combine_stages

from .torchrun import launch, torchrun


def block(rank, wall, compute, sent):
    return {"stage": {"rank": rank, "layers": 3, "wall_s": wall, "busy_s": {"compute": compute, "recv": wall - compute},
                      "sent_bytes": sent, "planned_peak_bytes": {"device": 10}, "budget_bytes": {"device": 100}}}


def test_a_stage_sums_the_blocks_of_one_call():
    s = stage_figures([block(1, 2.0, 0.5, {"stage1->stage0": 8}), block(1, 3.0, 1.0, {"stage1->stage0": 8})])["stage"]
    assert s["blocks"] == 2 and s["wall_s"] == 5.0 and s["busy_s"] == {"compute": 1.5, "recv": 3.5}
    assert s["sent_bytes"] == {"stage1->stage0": 16} and s["planned_peak_bytes"] == {"device": 10}
    assert stage_figures([{"time": {}}]) == {}  # one process: no stage


def test_rank_zero_combines_the_stages():
    st = {"num_prompts": 8, "prompt_len": 4, "gen_len": 3, "prefill_s": 0.1, "decode_s": 0.2, "overlap_fraction": 0.9,
          "compute_busy_s": 1.0, "io_busy_s": 1.0, "trace_span_s": 1.0, "stage": {"rank": 0}}
    stages = [dict(block(0, 4.0, 1.0, {"stage0->stage1": 1000})["stage"], prefill_s=0.1, decode_s=0.2,
                   bytes_moved={"disk->device": 50, "stage0->stage1": 1000, "stage1->stage0": 16}),
              dict(block(1, 3.0, 2.0, {"stage1->stage0": 16})["stage"], prefill_s=1.0, decode_s=1.0,
                   bytes_moved={"disk->device": 70, "stage0->stage1": 1000, "stage1->stage0": 16})]
    out = combine_stages(st, stages)
    assert out["bubble_fraction"] == pytest.approx(1 - 3.0 / (2 * 4.0))  # compute busy / (stages x slowest wall)
    assert out["link_bytes"] == {"stage0->stage1": 1000, "stage1->stage0": 16}  # the sender's count, once
    assert out["bytes_moved"] == {"disk->device": 120, "stage0->stage1": 1000, "stage1->stage0": 16}
    assert (out["prefill_s"], out["decode_s"]) == (1.0, 1.0)  # the slowest stage's
    assert out["total_tok_s"] == pytest.approx(8 * 3 / 2.0)
    assert "overlap_fraction" not in out and "stage" not in out  # rank 0's own trace figures are per stage
    assert out["stages"] == stages


# --- job=simulate and job=plan under torchrun: rank 0 alone, with what the ranks bring ------------------

def test_simulate_under_torchrun_measures_the_link_and_predicts_on_rank_zero(tmp_path):
    r = torchrun(2, ["-m", "graphgen", "job=simulate", "model=opt-1.3b", "hardware=t4-flexgen",
                     f"hydra.run.dir={tmp_path}"], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("simulated opt-1.3b") == 1 and "pipeline    2 stages" in r.stdout
    assert "the link between ranks, measured:" in r.stderr


def test_plan_under_torchrun_draws_once_with_each_ranks_budget(tmp_path):
    """Rank 1's machine holds less: the plan gives it fewer layers (hardware.* is each rank's own)."""
    common = ["job=plan", "model=opt-125m", "model.dtype=float32", "viz.schedule=true", "viz.formats=[png]",
              f"viz.out_dir={tmp_path / 'plan'}"]
    procs = launch([common, common + ["hardware.device_mem=280MB"]], 60, tmp_path)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    split = re.search(r"pipeline      2 stages of (\d+), (\d+) layers", outs[0][0])
    assert split and int(split[1]) > int(split[2]), outs[0][0]
    assert outs[1][0] == "" and [f.name for f in (tmp_path / "plan").iterdir()] == ["schedule-zigzag.png"]
