"""Pipeline parallelism with real processes (torchrun, gloo on CPU): tokens identical to the
single-process run for OPT and Llama, both schedules, 2 and 3 stages, greedy and seeded
sampling; a dead or stuck rank and ranks that disagree stop the run with an error naming them."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

from graphgen import LLM

from ..conftest import left_padded_batch, make_opt
from ..torchrun import launch, torchrun
from ..models.test_model_families import _llama, make_checkpoint

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
MIXED = "[30,30,40,30,20,50]"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    opt = tmp_path_factory.mktemp("dist-opt")
    make_opt(opt)
    llama = tmp_path_factory.mktemp("dist-llama")
    make_checkpoint(_llama(num_key_value_heads=2), llama)
    return {"opt": str(opt), "llama": str(llama)}


def cases(ckpts, stages: int, offload: str):
    ids, mask = left_padded_batch(5)
    out = []
    for family, path in ckpts.items():
        for schedule, executor in (("zigzag", "async"), ("row", "reference")):
            for sample in (False, True):
                percent = MIXED if (stages == 3) == sample else "[100,0,100,0,100,0]"
                ov = [f"schedule={schedule}", f"executor.name={executor}", "model.dtype=float32",
                      f"policy.percent={percent}", "policy.gpu_batch_size=2", "policy.num_gpu_batches=3",
                      f"hardware.offload_dir={offload}", "report.progress=false"]
                out.append(dict(name=f"{family}-{schedule}-{'sample' if sample else 'greedy'}", ckpt=path,
                                overrides=ov, ids=ids.tolist(), mask=mask.tolist(), gen=5, sample=sample,
                                seed=123 if sample else None))
    return out


def single_process(c) -> torch.Tensor:
    with LLM(c["ckpt"], c["overrides"] + ["parallel.stages=1"]) as llm:
        return llm.generate(torch.tensor(c["ids"]), attention_mask=torch.tensor(c["mask"]), max_new_tokens=c["gen"],
                            do_sample=c["sample"], seed=c["seed"])


@pytest.mark.parametrize("stages", [2, 3])
def test_tokens_identical_to_one_process(ckpts, tmp_path, stages):
    cs = cases(ckpts, stages, str(tmp_path / "offload"))
    (tmp_path / "cases.json").write_text(json.dumps(cs))
    r = torchrun(stages, [WORKER, tmp_path / "cases.json", tmp_path / "out.pt"])
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    for c in cs:
        assert len(got[c["name"] + "/stage_layers"]) == stages
        assert torch.equal(got[c["name"]], single_process(c)), c["name"]
    assert not list((tmp_path / "offload").glob("*")), "offload files left behind"


def test_cli_report_on_rank_zero(ckpts, tmp_path):
    """One report, from rank 0, with every stage's figures of the call (2 blocks); one trace.json
    with a process track per rank."""
    r = torchrun(2, ["-m", "graphgen", f"model.path={ckpts['opt']}", "model.dtype=float32", "workload.prompt_len=6",
                     "workload.gen_len=4", "workload.num_prompts=8", "policy.gpu_batch_size=2",
                     "policy.num_gpu_batches=2", "report.progress=false", f"hardware.offload_dir={tmp_path}",
                     f"hydra.run.dir={tmp_path}", "viz.timeline=true", "viz.formats=[png]"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("throughput") == 1  # one report, from rank 0
    assert "pipeline      2 stages" in r.stdout and "over 2 blocks" in r.stdout
    assert "stage0->stage1" in r.stdout and "stage1->stage0" in r.stdout
    assert "peak memory   stage tier" in r.stdout and "              1     device" in r.stdout
    assert "stage 0: RAM" in r.stdout and "stage 1: RAM" in r.stdout
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert {e["args"]["name"] for e in events if e["name"] == "process_name"} == {"stage 0 (rank 0)",
                                                                                  "stage 1 (rank 1)"}
    sends = {e["pid"] for e in events if e["ph"] == "X" and e["cat"] == "send"}
    assert sends == {1, 2}  # activations from rank 0, token ids from rank 1


def tiny_args(ckpts, offload):
    """Half the weights on disk (read from the checkpoint in place when the dtype is the same)."""
    return [f"model.path={ckpts['opt']}", "model.dtype=float32", "workload.prompt_len=8", "policy.gpu_batch_size=2",
            "policy.num_gpu_batches=3", "policy.percent=[50,0,100,0,100,0]", "report.progress=false",
            f"hardware.offload_dir={offload}"]


def test_ranks_with_different_configs_are_refused(ckpts, tmp_path):
    base = tiny_args(ckpts, tmp_path) + ["workload.gen_len=4"]
    procs = launch([base, base + ["policy.gpu_batch_size=1"]], 60, tmp_path)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        assert "policy.gpu_batch_size: rank 0 2 vs rank 1 1" in err


def test_dead_rank_stops_the_others(ckpts, tmp_path):
    """Rank 1 fails placing its weights (its offload dir cannot be made): rank 0 stops, naming it."""
    base = tiny_args(ckpts, tmp_path) + ["workload.gen_len=4"]
    dead = base + ["hardware.offload_dir=/dev/null/offload"]
    t0 = time.monotonic()
    procs = launch([base, dead], 15, tmp_path)
    outs = [p.communicate(timeout=120) for p in procs]
    assert procs[1].returncode == 2 and "hardware.offload_dir" in outs[1][1]
    assert procs[0].returncode != 0 and "rank 1" in outs[0][1], outs[0][1][-2000:]
    assert time.monotonic() - t0 < 90


def test_stuck_rank_stops_the_others(ckpts, tmp_path):
    """Rank 1 stops answering mid-run (SIGSTOP): rank 0 exits within parallel.timeout_s, naming it."""
    off = [tmp_path / "r0", tmp_path / "r1"]
    # bfloat16: the float32 checkpoint's weights are converted and written to the offload dir
    procs = launch([tiny_args(ckpts, o) + ["workload.gen_len=50", "model.dtype=bfloat16"] for o in off], 10, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (off[1].exists() and any(off[1].iterdir())):  # it placed weights there: it is running
            assert time.monotonic() < deadline and procs[1].poll() is None, procs[1].communicate()[1][-2000:]
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        assert procs[0].returncode == 2 and "rank 1" in err and "parallel.timeout_s" in err, err[-2000:]
        assert time.monotonic() - t0 < 60
    finally:
        procs[1].send_signal(signal.SIGCONT)
        procs[1].kill()
        procs[1].communicate()
