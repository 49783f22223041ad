"""passes/plan_memory.py: per-tier peaks, and plans over budget refused with the keys to change."""
import pytest

from passes import PassError

from .graphs import compiled, config


def test_plan_over_budget_is_refused_with_advice():
    with pytest.raises(PassError) as e:
        compiled(config(device_mem="1000"))
    msg = str(e.value)
    assert "hardware.device_mem" in msg and "policy.percent[0]" in msg and "plan_memory" in msg
    assert "passes already run: ['partition_stages', 'order'" in msg


def test_peaks_count_weights_at_home_and_working_copies():
    g, _ = compiled(config(percent=[0, 100, 100, 0, 100, 0]))
    peak = g.graph["peak_bytes"]
    w_total = sum(g.nodes[(0, j, 0)]["w_bytes"] for j in range(4))
    assert peak["host"] == w_total
    two_layers = max(g.nodes[(0, j, 0)]["w_bytes"] + g.nodes[(0, j + 1, 0)]["w_bytes"] for j in range(3))
    assert peak["device"] >= two_layers  # prefetch keeps the next layer beside the current one
