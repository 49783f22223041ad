"""The offload dir (executors/offload_dir.py, through the disk tier): a private default, refusal of directories
other users could write or own, no path redirection by symlinks, run directories locked while
their run lives, removed on SIGTERM, and reclaimed after SIGKILL by the next run."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from executors.disk import DiskTier
from graphgen import LLM
from graphgen.config import compose

from ..conftest import left_padded_batch

GB = 10**9
ROOT = Path(__file__).resolve().parents[2]
OTHER = 54321  # a uid that owns nothing on this machine
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="making files owned by another user needs root")


def run_dirs(off):
    return sorted(p.name for p in Path(off).iterdir() if p.name.startswith("graphgen-")) if Path(off).exists() else []


def test_default_offload_dir_is_private_to_the_user(tmp_path, monkeypatch):
    monkeypatch.delenv("GRAPHGEN_OFFLOAD_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    t = DiskTier(GB, compose([]).hardware.offload_dir)
    t.put(("act", 0), torch.ones(10))
    off = tmp_path / "cache" / "graphgen" / "offload"
    assert Path(t.root).parent == off
    assert stat.S_IMODE(off.stat().st_mode) == 0o700 and stat.S_IMODE(Path(t.root).stat().st_mode) == 0o700
    t.close()
    assert not (tmp_path / "cache").exists() or not run_dirs(off)


@root_only
def test_offload_dir_owned_by_another_user_is_refused(tmp_path):
    off = tmp_path / "theirs"
    off.mkdir()
    os.chown(off, OTHER, OTHER)
    t = DiskTier(GB, str(off))
    with pytest.raises(PermissionError, match=rf"hardware.offload_dir=.*belongs to uid {OTHER}"):
        t.put(("act", 0), torch.ones(10))
    t.close()
    assert os.listdir(off) == []


@pytest.mark.parametrize("mode,ok", [(0o777, False), (0o770, False), (0o757, False), (0o1777, True), (0o755, True)])
def test_offload_dir_writable_by_others_needs_the_sticky_bit(tmp_path, mode, ok):
    off = tmp_path / "shared"
    off.mkdir()
    os.chmod(off, mode)
    t = DiskTier(GB, str(off))
    if ok:
        t.put(("act", 0), torch.ones(10))
        assert torch.equal(t.get(("act", 0)), torch.ones(10))
    else:
        with pytest.raises(PermissionError, match="without the sticky bit"):
            t.put(("act", 0), torch.ones(10))
    t.close()
    assert os.listdir(off) == []


@root_only
def test_offload_dir_symlink_owned_by_another_user_is_refused(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "offload"
    link.symlink_to(target)
    os.lchown(link, OTHER, OTHER)
    with pytest.raises(PermissionError, match=f"symlink owned by uid {OTHER}"):
        DiskTier(GB, str(link)).check_space(1)
    assert os.listdir(target) == []


def test_swapping_the_run_directory_for_a_symlink_redirects_nothing(tmp_path):
    """Another user renames graphgen's run directory and puts a symlink to a victim's directory in
    its place: later writes (a new KV cache, a value) and reads still go to graphgen's own files."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "kv_1_0.bin").write_bytes(b"precious")
    (victim / "act_1.bin").write_bytes(b"precious too")
    os.chmod(victim / "kv_1_0.bin", 0o600)
    t = DiskTier(GB, str(tmp_path / "off"))
    t.put(("act", 0), torch.arange(10.0))
    run = t.root
    os.rename(run, run + "-moved")
    os.symlink(victim, run)
    t.alloc(("kv", 1, 0), (2, 8, 1, 2, 4), torch.float32)
    t.write_slice(("kv", 1, 0), 0, torch.ones(2, 3, 1, 2, 4))
    t.put(("act", 1), torch.zeros(1000))
    assert torch.equal(t.get(("act", 0)), torch.arange(10.0))
    assert torch.equal(t.read_prefix(("kv", 1, 0), 3), torch.ones(2, 3, 1, 2, 4))
    t.close()
    assert (victim / "kv_1_0.bin").read_bytes() == b"precious"
    assert (victim / "act_1.bin").read_bytes() == b"precious too"
    assert sorted(os.listdir(victim)) == ["act_1.bin", "kv_1_0.bin"]


def test_an_all_device_run_needs_no_offload_dir(opt_ckpt, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    ids, mask = left_padded_batch(4)
    with LLM(str(opt_ckpt[0]), ["policy.percent=[100,0,100,0,100,0]", f"hardware.offload_dir={blocker}/off"]) as llm:
        assert llm.generate(ids, attention_mask=mask, max_new_tokens=3).shape == (4, 10)
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_run_directories_are_locked_and_dead_ones_reclaimed(tmp_path):
    off = tmp_path / "off"
    alive = DiskTier(GB, str(off))
    alive.put(("act", 0), torch.ones(10))
    dead = off / "graphgen-0123456789ab"  # as a SIGKILLed run leaves it: data and an unheld lock
    dead.mkdir(mode=0o700)
    (dead / ".lock").write_bytes(b"")
    (dead / "kv_0_0.bin").write_bytes(b"\0" * 100_000)
    other = DiskTier(GB, str(off))
    other.check_space(1)  # opening the offload dir reclaims
    assert run_dirs(off) == [Path(alive.root).name]
    assert other.run.reclaimed[0] == 1 and other.run.reclaimed[1] >= 100_000
    assert torch.equal(alive.get(("act", 0)), torch.ones(10))
    other.close()
    alive.close()
    assert not off.exists()


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch
from graphgen import LLM
llm = LLM({ckpt!r}, ["policy.percent=[0,0,0,0,0,0]", "hardware.offload_dir={off}", "report.progress=false"])
ids = torch.randint(4, 90, (4, 8))
while True:
    llm.generate(ids, max_new_tokens=8)
"""


def start_disk_run(script: Path, off: Path):
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if any(list((off / d).glob("*.bin")) for d in run_dirs(off)):
            return proc
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError("the disk run never wrote an offload file")


def test_sigterm_removes_the_offload_files_and_sigkill_leftovers_are_reclaimed(opt_ckpt, tmp_path):
    off = tmp_path / "off"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(root=str(ROOT), ckpt=str(opt_ckpt[0]), off=off)))
    proc = start_disk_run(script, off)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert run_dirs(off) == []  # unwound like Ctrl-C: files removed
    proc = start_disk_run(script, off)
    proc.kill()
    proc.wait(60)
    left = run_dirs(off)
    assert len(left) == 1 and list((off / left[0]).glob("*.bin"))  # SIGKILL: nothing could clean up
    ids, mask = left_padded_batch(4)
    with LLM(str(opt_ckpt[0]), ["policy.percent=[0,0,0,0,0,0]", f"hardware.offload_dir={off}"]) as llm:
        llm.generate(ids, attention_mask=mask, max_new_tokens=3)  # the next disk run reclaims it
        assert left[0] not in run_dirs(off)
        assert llm.executor.tiers["disk"].run.reclaimed[0] == 1
    assert run_dirs(off) == []
