"""python -m graphgen.lm_eval: lm-eval's own flags, the model fixed to graphgen, offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from graphgen.lm_eval.__main__ import lm_eval_argv
from tests.fake_llm import make_llama_checkpoint
from tests.lm_eval_backend.tasks import write_tasks

ROOT = Path(__file__).resolve().parent.parent.parent


def test_argv_fixes_the_model():
    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "graphgen", "--tasks", "x"]
    assert lm_eval_argv(["run", "--tasks", "x"]) == ["run", "--model", "graphgen", "--tasks", "x"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]
    assert lm_eval_argv([]) == ["run", "--help"]
    with pytest.raises(SystemExit, match="drop --model"):
        lm_eval_argv(["--model", "hf", "--tasks", "x"])


def test_cli_runs_local_tasks_and_writes_results(tmp_path):
    pytest.importorskip("lm_eval")
    ckpt = make_llama_checkpoint(tmp_path / "ckpt")
    tasks = write_tasks(tmp_path / "tasks")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "graphgen.lm_eval", "--tasks", "gg_mc,gg_gen", "--include_path",
                        str(tasks), "--model_args", f"pretrained={ckpt},model.dtype=float32", "--batch_size", "2",
                        "--limit", "3", "--output_path", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "gg_mc" in r.stdout and "acc" in r.stdout  # lm-eval's results table
    files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res["config"]["model"] == "graphgen" and set(res["results"]) == {"gg_mc", "gg_gen"}
    assert res["n-samples"]["gg_mc"]["effective"] == 3
