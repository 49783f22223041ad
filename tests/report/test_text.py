"""The text report (graphgen/report/text.py): names the checkpoint that ran, small sizes in MB, and a
measured-RAM line that says what an excess over the plan means."""
from __future__ import annotations

import re
import shutil

from graphgen import LLM
from graphgen.config import compose
from graphgen.report.text import format_report, measured_lines

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
