"""job=simulate (graphgen/perf/simulate.py) with model.path simulates the checkpoint's architecture."""
from __future__ import annotations

from graphgen.compile import compile, spec_for, workload_shape
from graphgen.config import compose
from graphgen.perf.simulate import predict
from graphgen.run import run

from .test_costmodel import PROFILE


def test_simulate_with_model_path_simulates_the_checkpoint(opt_ckpt, capsys):
    path = opt_ckpt[0]
    cfg = compose(["job=simulate", f"model.path={path}", "model.dtype=float32", "hardware.device=cuda"])
    cfg.hardware.profile = dict(PROFILE)
    pr = run(cfg)
    out = capsys.readouterr().out
    assert out.startswith(f"simulated {path.name} on hardware")
    ckpt_graph = compile(spec_for(cfg, path), cfg, workload_shape(cfg))
    assert pr.total_tok_s == predict(cfg, ckpt_graph).total_tok_s
    default = compose(["job=simulate", "model.dtype=float32", "hardware.device=cuda"])  # opt-125m's arch
    default.hardware.profile = dict(PROFILE)
    assert predict(default).total_tok_s < pr.total_tok_s / 10  # a 2-layer, 32-wide model is far faster
