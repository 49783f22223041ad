"""passes/__init__.py: the registry and run_pipeline's contracts (requires / provides)."""
import pytest

from passes import PassError

from .graphs import compiled, config


def test_missing_requirement_names_the_pass():
    with pytest.raises(PassError, match="insert_io.*requires"):
        compiled(config(), names=["order", "insert_io"])


def test_unknown_pass_lists_known():
    with pytest.raises(PassError, match="known passes:.*place_tensors"):
        compiled(config(), names=["order", "magic"])


def test_the_default_pipeline_provides_a_flat_schedule():
    g, cfg = compiled(config())
    assert cfg.pipeline == ["partition_stages", "order", "place_tensors", "compress", "delegate_cpu_attention",
                            "insert_io", "insert_comm", "plan_memory"]
    assert len([n for n in g.graph["ops"] if "kind" in g.nodes[n]]) == 3 * 4 * 4
