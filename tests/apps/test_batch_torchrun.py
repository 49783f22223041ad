"""The batch job under torchrun (a 2-stage pipeline, gloo on CPU, real processes): rank 0 alone
reads the input and writes the results, identical to one process, and prints each stage's
figures over the job; a refused job stops every rank at once; a rank killed mid-run stops the other, naming it, and a rerun writes the rest,
each id once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ..fake_llm import make_opt_checkpoint
from ..torchrun import ROOT, env, launch, torchrun
from .jsonl import read_jsonl, write_jsonl


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_opt_checkpoint(tmp_path_factory.mktemp("batch-opt"), max_positions=64)


def args(ckpt, tmp_path, inp, out, *more):
    return ["job=batch", f"job.input={inp}", f"job.output={out}", f"model.path={ckpt}", "model.dtype=float32",
            "workload.gen_len=8", "policy.gpu_batch_size=2", "policy.num_gpu_batches=2", "report.progress=false",
            f"hardware.offload_dir={tmp_path / 'offload'}", *more]


def by_id(path):
    rows = read_jsonl(path)
    assert len({r["id"] for r in rows}) == len(rows), "an id was written twice"
    return {r["id"]: r for r in rows}


def one_process(ckpt, tmp_path, inp, out):
    """The same job in one process (one thread, as each rank has: faster on a busy 2-core machine)."""
    r = subprocess.run([sys.executable, "-m", "graphgen", f"hydra.run.dir={tmp_path}/one",
                        *args(ckpt, tmp_path, inp, out)], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return by_id(out)


def test_refused_job_stops_every_rank_at_once(ckpt, tmp_path):
    """Rank 0 refuses the job (no input file): the other rank stops with it, nothing is written."""
    t0 = time.monotonic()
    r = torchrun(2, ["-m", "graphgen", f"hydra.run.dir={tmp_path}", "parallel.timeout_s=60",
                     *args(ckpt, tmp_path, tmp_path / "missing.jsonl", tmp_path / "out.jsonl")], timeout=120)
    assert r.returncode != 0
    assert "job.input=" in r.stderr and "does not exist" in r.stderr
    assert "rank 1: rank 0 stopped the batch job" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 50  # not after parallel.timeout_s
    assert not (tmp_path / "out.jsonl").exists()


def wait_for_lines(path, n, procs, timeout=120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-2000:]
        time.sleep(0.01)
    raise TimeoutError(f"{path} never reached {n} lines")


@pytest.mark.parametrize("killed", [1, 0])
def test_killed_rank_stops_the_other_then_rerun_resumes(ckpt, tmp_path, killed):
    """SIGKILL one rank mid-run: the other exits within seconds naming it; the lines on disk are
    whole; rerunning the same command under torchrun writes the rest, each id once, and the
    results equal one process's."""
    n = 120
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "word " * (i % 9 + 1) + str(i)} for i in range(n)])
    out = tmp_path / "out.jsonl"
    job = args(ckpt, tmp_path, inp, out)
    procs = launch([job, job], 20, tmp_path)
    try:
        wait_for_lines(out, 8, procs)
        os.kill(procs[killed].pid, signal.SIGKILL)
        t0 = time.monotonic()
        other = procs[1 - killed]
        _, err = other.communicate(timeout=60)
        assert other.returncode == 2 and f"rank {killed}" in err and "died" in err, err[-2000:]
        assert time.monotonic() - t0 < 15  # the connection closed: well before parallel.timeout_s
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    written = by_id(out)
    assert 8 <= len(written) < n, "the job finished before it could be killed: give it more prompts"
    r = torchrun(2, ["-m", "graphgen", f"hydra.run.dir={tmp_path}/rerun", *job], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming, {len(written)}/{n} prompts already in" in r.stderr
    assert f"batch: {n - len(written)} generated" in r.stderr
    assert "pipeline      2 stages; bubble fraction" in r.stderr and "link        stage0->stage1" in r.stderr
    assert sorted(by_id(out)) == list(range(n))
    if killed == 1:  # (once is enough: a process start costs seconds on a busy machine)
        assert by_id(out) == one_process(ckpt, tmp_path, inp, tmp_path / "one.jsonl")
