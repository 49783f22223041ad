"""The package installs anywhere: the wheel carries the Hydra configs (conf/ -> graphgen/conf)
and every Python package, and its `graphgen` script starts from any directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "conf", "graphgen", "passes", "executors")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in SOURCES:
        f = ROOT / name
        if f.is_dir():
            shutil.copytree(f, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(f, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                        "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return next(out.glob("graphgen-*.whl"))


def test_wheel_holds_every_config_and_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"graphgen/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    packages = {str(p.parent.relative_to(ROOT)) + "/__init__.py"
                for top in ("graphgen", "passes", "executors") for p in (ROOT / top).rglob("__init__.py")}
    assert packages <= names, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(packages - names)}"


def test_installed_script_runs_from_another_directory(wheel, tmp_path):
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")  # the installed copy, not the checkout
    script = [sys.executable, str(site / "bin" / "graphgen")]
    r = subprocess.run(script + ["--help"], cwd=elsewhere, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    for words in ("job=generate", "job=batch", "job=simulate", "job=plan", "model:", "smollm2-135m",
                  "schedule: row, zigzag"):
        assert words in r.stdout
    r = subprocess.run(script + ["model=opt-125m", "model.weights=dummy", "workload.prompt_len=4",
                                 "workload.gen_len=2", f"hydra.run.dir={tmp_path}/run"],
                       cwd=elsewhere, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "throughput" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import graphgen.config as c; print(c.CONF_DIR)"], cwd=elsewhere,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.stdout.strip() == str(site / "graphgen" / "conf"), r.stdout + r.stderr  # the wheel's own configs
