"""Hardware profiler: quick measurement, cache round trip, published profiles against the schema."""
import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from graphgen.perf import probes, profile as hp
from graphgen.config import CONF_DIR, HardwareConfig, parse_bytes


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(scope="module")
def quick_record(tmp_path_factory):
    """One quick measurement (~3 s) shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("hw")
    mp = pytest.MonkeyPatch()
    mp.setenv("GRAPHGEN_CACHE_DIR", str(root / "cache"))
    try:
        yield hp.measure_and_cache("cpu", str(root / "offload"), quick=True), root
    finally:
        mp.undo()


def _documented(key: str) -> bool:
    templates = [k.replace("<dtype>", "") for k in hp.PROFILE_KEYS if "<dtype>" in k]
    return key in hp.PROFILE_KEYS or any(
        key.startswith(t) and key[len(t):] in ("bfloat16", "float32", "float16") for t in templates)


def test_quick_measure_keys_positive(quick_record):
    profile = quick_record[0]["profile"]
    for key in ("device_flops_bfloat16", "device_flops_float32", "cpu_flops_bfloat16",
                "cpu_flops_float32", "device_flops_decode_bfloat16", "device_bmm_flops_float32",
                "device_attn_bw", "cpu_attn_bw", "host_memcpy_bw", "h2d_bw", "d2h_bw",
                "disk_read_bw", "disk_write_bw"):
        assert profile[key] > 0, key
    assert "device_flops_float16" not in profile  # never float16 on the CPU
    assert profile["device_is_host"] == 1.0 and profile["h2d_bw"] == profile["host_memcpy_bw"]
    assert profile["disk_o_direct"] in (0.0, 1.0)
    assert all(isinstance(v, float) for v in profile.values())
    assert all(_documented(k) for k in profile), [k for k in profile if not _documented(k)]


def test_quick_measure_is_quick_and_cleans_up(quick_record):
    record, root = quick_record
    assert record["meta"]["seconds"] < 60  # ~3 s idle; a loaded 2-core CI box takes ~10 s
    for kind in ("cpu", "cuda"):
        quick, full = hp.SHAPES[(kind, True)], hp.SHAPES[(kind, False)]
        assert quick.disk_bytes < full.disk_bytes and quick.mm[0] < full.mm[0]
    assert record["meta"]["quick"] is True
    assert not (root / "offload").exists()  # the disk test files removed, and the directory made for them


def test_cache_written_and_reused(quick_record, monkeypatch):
    record, root = quick_record
    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(root / "cache"))
    path = hp.cache_path("cpu")
    assert path.parent == root / "cache" and path.name.startswith("hardware-")
    assert json.loads(path.read_text())["profile"] == record["profile"]
    monkeypatch.setattr(hp, "measure", lambda *a, **k: pytest.fail("re-measured despite cache"))
    assert hp.load_or_measure("cpu", str(root / "offload"), quick=True) == record["profile"]


def test_cache_invalidation(cache_env, monkeypatch):
    calls = []
    monkeypatch.setattr(hp, "measure", lambda d, o, q: calls.append(q) or {"h2d_bw": 1.0})
    off = str(cache_env / "off")
    hp.load_or_measure("cpu", off, quick=True)
    hp.load_or_measure("cpu", off, quick=True)  # cached
    hp.load_or_measure("cpu", off)  # a quick profile never stands in for a full one
    hp.load_or_measure("cpu", str(cache_env / "elsewhere"))  # other offload dir: other disk
    hp.load_or_measure("cpu", str(cache_env / "elsewhere"), refresh=True)
    assert calls == [True, False, False, False]


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("GRAPHGEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hp.cache_path("cuda:0").parent == tmp_path / "graphgen"
    assert hp.cache_path("cuda:0").name.endswith("-cuda_0.json")


def test_disk_fallback_without_o_direct(tmp_path, monkeypatch):
    monkeypatch.setattr(probes, "_o_direct_works", lambda path, buf: False)
    out = probes.disk_bw(str(tmp_path), 8 << 20, repeats=1)
    assert out["disk_o_direct"] == 0.0 and out["disk_read_bw"] > 0 and out["disk_write_bw"] > 0
    assert list(tmp_path.iterdir()) == []


def test_disk_probes_use_a_private_run_directory(tmp_path):
    """The probes' files live in a fresh 0700 run directory of a checked offload dir (as the disk
    tier's): a shared directory others may write without the sticky bit is refused."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(PermissionError, match="without the sticky bit"):
        probes.disk_latency(str(shared), repeats=1)
    assert probes.disk_latency(str(tmp_path / "new"), repeats=2) > 0
    assert list(tmp_path.iterdir()) == [shared] and list(shared.iterdir()) == []
    hp.detect_memory("cpu", str(tmp_path / "not" / "made"))
    assert not (tmp_path / "not").exists()


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="hardware=cpu"):
        hp.measure("cuda")


def test_format_table_units():
    table = hp.format_table({"device_flops_float32": 1.5e11, "disk_read_bw": 2e9, "disk_o_direct": 1.0})
    assert "150.0 GFLOP/s" in table and "2.00 GB/s" in table


def test_cli_prints_table_and_cache_path(quick_record, monkeypatch, capsys):
    record, root = quick_record
    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(root / "cache"))
    hp.main(["--quick", "--offload-dir", str(root / "offload")])
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "GB/s" in out and str(hp.cache_path("cpu")) in out


@pytest.mark.parametrize("name", ["t4-flexgen", "auto", "cpu", "cuda"])
def test_hardware_yaml_matches_schema(name):
    cfg = OmegaConf.merge(OmegaConf.structured(HardwareConfig), OmegaConf.load(CONF_DIR / "hardware" / f"{name}.yaml"))
    hw = OmegaConf.to_object(cfg)
    assert hw.name == name
    for key in ("device_mem", "host_mem", "disk_mem"):
        assert parse_bytes(getattr(hw, key), key) > 0
    assert all(_documented(k) for k in hw.profile), [k for k in hw.profile if not _documented(k)]


def test_t4_flexgen_constants():
    hw = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HardwareConfig),
                                             OmegaConf.load(CONF_DIR / "hardware" / "t4-flexgen.yaml")))
    gib, p = 2**30, hw.profile
    assert hw.device == "cuda" and parse_bytes(hw.device_mem) == 15 * gib
    assert p["h2d_bw"] == pytest.approx(12.89 * gib) and p["disk_read_bw"] == pytest.approx(0.473 * gib)
    assert p["device_flops_float16"] == pytest.approx(21.24e12) and p["cpu_attn_bw"] == pytest.approx(12.3e9)
