"""Config composition: every group combination composes; wrong keys and types are rejected."""
from __future__ import annotations

import itertools

import pytest

from graphgen.config import CONF_DIR, compose, parse_bytes, tier_budgets
from graphgen.models import build_spec, hf_config_from_arch


def names(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_combination_composes():
    for model, sched, policy, wl in itertools.product(
            names("model")[:3], names("schedule"), names("policy"), names("workload")):
        cfg = compose([f"model={model}", f"schedule={sched}", f"policy={policy}", f"workload={wl}"])
        assert cfg.model.name == model and cfg.schedule.name == sched


@pytest.mark.parametrize("model", names("model"))
def test_every_model_config_builds_a_spec(model):
    cfg = compose([f"model={model}"])
    spec = build_spec(hf_config_from_arch(cfg.model.arch), cfg.model.name)
    assert spec.layers[0].kind == "embed" and spec.layers[-1].kind == "head"
    assert len(spec.layers) == 2 * spec.num_blocks + 2


def test_opt_sizes_have_published_parameter_counts():
    """Architecture numbers produce the published sizes (within 2%; opt-350m is 331M)."""
    for name, billions in [("opt-125m", 0.125), ("opt-350m", 0.331), ("opt-1.3b", 1.3), ("opt-6.7b", 6.7),
                           ("opt-30b", 30), ("opt-175b", 175)]:
        spec = build_spec(hf_config_from_arch(compose([f"model={name}"]).model.arch))
        n = sum(layer.numel for layer in spec.layers[:-1])  # the head's matrix is tied to the embedding
        assert abs(n / 1e9 - billions) / billions < 0.02, name


@pytest.mark.parametrize("experiment", names("experiment"))
def test_pinned_experiments_compose(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.model.weights == "dummy" and len(cfg.policy.percent) == 6


def test_wrong_key_is_rejected_with_its_name():
    with pytest.raises(Exception, match="gpu_batchsize"):
        compose(["policy.gpu_batchsize=8"])


def test_wrong_type_is_rejected_with_its_name():
    with pytest.raises(Exception, match="gpu_batch_size"):
        compose(["policy.gpu_batch_size=many"])


def test_unknown_arch_key_is_rejected():
    with pytest.raises(ValueError, match="hidden_sise"):
        hf_config_from_arch({"model_type": "opt", "hidden_sise": 8})


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match="supported model types: .*opt"):
        hf_config_from_arch({"model_type": "gpt2"})


def test_byte_sizes():
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes(1024) == 1024
    with pytest.raises(ValueError, match="hardware.host_mem"):
        parse_bytes("lots", "hardware.host_mem")
    assert set(tier_budgets(compose([]).hardware)) == {"device", "host", "disk"}


def test_a_misspelt_added_key_is_rejected_with_a_suggestion():
    with pytest.raises(ValueError, match="unknown config key policy.cpu_atention: did you mean policy.cpu_attention"):
        compose(["+policy.cpu_atention=true"])
    with pytest.raises(ValueError, match="unknown config key job.outptu: did you mean job.output"):
        compose(["+job.outptu=x.jsonl"])


@pytest.mark.parametrize("override,match", [
    ("policy.gpu_batch_size=0", "policy.gpu_batch_size=0 must be >= 1"),
    ("policy.num_gpu_batches=0", "policy.num_gpu_batches=0 must be >= 1"),
    ("workload.num_prompts=0", "workload.num_prompts=0 must be >= 1"),
    ("workload.gen_len=0", "workload.gen_len=0 must be >= 1"),
    ("pipeline=[]", r"pipeline=\[\] is empty"),
    ("hardware.host_mem=1.2.3GB", r"hardware.host_mem='1.2.3GB' is not a size"),
    ("hardware.disk_mem=-5", "hardware.disk_mem='-5' is not a size"),
])
def test_values_no_run_can_use_are_refused_naming_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        compose([override])


def test_sizes_print_in_mb_below_10_mb():
    from graphgen.config import format_bytes

    assert format_bytes(4096) == "0.00 MB" and format_bytes(2_500_000) == "2.50 MB"
    assert format_bytes(12e6) == "0.01 GB" and format_bytes(3e9) == "3.00 GB"
    assert parse_bytes("1.5e3") == 1500 and parse_bytes(".5kB") == 500
