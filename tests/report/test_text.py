"""The text report (graphgen/report/text.py): names the checkpoint that ran, small sizes in MB, a
measured-RAM line that says what an excess over the plan means, and the cost model's line: each
generate run is compared with its prediction, and a run more than 2x off is a warning that says how to
re-measure."""
from __future__ import annotations

import re
import shutil

import pytest

from graphgen import LLM
from graphgen.build import build_graph
from graphgen.config import compose
from graphgen.models import build_spec, hf_config_from_arch
from graphgen.perf import simulate
from graphgen.report.text import add_prediction, format_report, measured_lines
from passes import run_pipeline

from ..conftest import left_padded_batch


def test_report_names_the_checkpoint_and_prints_small_sizes_in_mb(opt_ckpt, tmp_path):
    odd = tmp_path / "my ckpt, v2 = 'final'"  # commas, spaces, '=' and quotes are no override syntax
    shutil.copytree(opt_ckpt[0], odd)
    with LLM(str(odd), ["model.dtype=float32", "report.progress=false"]) as llm:
        assert llm.cfg.model.path == str(odd.resolve())
        llm.generate(*left_padded_batch(2), max_new_tokens=2)
        text = format_report(llm.last_stats)
    assert f"model {odd.name} (hf weights from {odd.resolve()})" in text
    with LLM(config=compose([f"model.path={opt_ckpt[0]}", "report.progress=false"])) as llm:  # as the CLI does
        llm.generate(*left_padded_batch(2), max_new_tokens=2)
        text = format_report(llm.last_stats)
    assert text.startswith(f"model {opt_ckpt[0].name} (hf weights from {opt_ckpt[0]})")
    assert " MB" in text and not re.search(r"(?<![0-9])0\.00+ GB", text)


def test_measured_ram_line_says_what_an_excess_means():
    st = {"planned_peak_bytes": {"device": 2e9, "host": 1e9, "disk": 0}, "device_type": "cpu",
          "rss_start_bytes": 5e8, "rss_peak_bytes": 3.2e9, "overhead_bytes": 3e8}
    within = "\n".join(measured_lines(st))
    assert "grew 2.700 GB" in within and "= 3.300 GB" in within and "within what the plan accounts for" in within
    st["rss_peak_bytes"] = 4.3e9
    over = "\n".join(measured_lines(st))
    assert "0.500 GB more than the plan accounts for: not an error" in over
    assert "lower hardware.host_mem / device_mem by that much" in over and "OVER" not in over


# --- the prediction beside the measurement (issue 19) ---------------------------------------------

TINY = {"model_type": "opt", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "ffn_dim": 128,
        "num_attention_heads": 4, "max_position_embeddings": 128, "word_embed_proj_dim": 32}
PROFILE = {"device_flops_float32": 1e11, "device_flops_decode_float32": 2e10, "device_bmm_flops_float32": 5e10,
           "device_attn_bw": 2e10, "cpu_attn_bw": 1e10, "h2d_bw": 1e10, "d2h_bw": 1e10, "disk_read_bw": 5e8,
           "disk_write_bw": 5e8, "device_is_host": 1.0}


def graph_and_cfg(*overrides):
    cfg = compose(["model.dtype=float32", *overrides])
    g = build_graph(build_spec(hf_config_from_arch(TINY)), batch=4, num_batches=1, prompt_len=16, gen_len=4,
                    dtype="float32")
    return run_pipeline(g, cfg), cfg


def predicted(cfg, g) -> float:
    st = {}
    add_prediction(st, cfg, g)
    return st["predicted_tok_s"]


def test_a_published_profile_far_off_says_use_hardware_auto(capsys):
    g, cfg = graph_and_cfg()
    cfg.hardware.profile, cfg.hardware.name = dict(PROFILE), "t4-flexgen"
    st = {"total_tok_s": 10 * predicted(cfg, g)}
    add_prediction(st, cfg, g)
    assert "10.0x faster than predicted" in st["prediction_warning"]
    assert "hardware=t4-flexgen's profile describes another machine" in st["prediction_warning"]
    assert "graphgen: warning:" in capsys.readouterr().err
    near = {"total_tok_s": 1.5 * predicted(cfg, g)}
    add_prediction(near, cfg, g)
    assert "prediction_warning" not in near


def test_hardware_auto_is_predicted_and_a_stale_profile_names_the_refresh(monkeypatch, capsys):
    g, cfg = graph_and_cfg("hardware=auto")
    monkeypatch.setattr(simulate, "hardware_profile", lambda c: dict(PROFILE))  # the cached measurement
    st = {"total_tok_s": predicted(cfg, g) / 5}
    add_prediction(st, cfg, g)
    assert "5.0x slower than predicted" in st["prediction_warning"]
    assert "python -m graphgen.perf.profile --refresh --device cpu" in capsys.readouterr().err


def test_no_profile_no_measurement_behind_the_runs_back(monkeypatch):
    g, cfg = graph_and_cfg("hardware=cpu")
    monkeypatch.setattr(simulate, "hardware_profile", lambda c: pytest.fail("measured"))
    st = {"total_tok_s": 1.0}
    add_prediction(st, cfg, g)
    assert st == {"total_tok_s": 1.0}
