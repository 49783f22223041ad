"""Storage tiers (executors/tiers.py, executors/disk.py, executors/disk_io.py): round trips, cache prefix reads and slice
writes, in-place safetensors reads, budgets, clear errors for unusable offload dirs, cleanup."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from executors.disk import DiskFull, DiskTier, Extent
from executors.disk_io import ALIGN, CHUNK, ReadBuffers, direct_io_works
from executors.tiers import Tier, TierFull
from graphgen import LLM
from graphgen.models.base import WeightSpec
from graphgen.models.weights import CheckpointWeights
from passes import PassError

from ..conftest import left_padded_batch, make_opt

GB = 10**9


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(37, 53, generator=g).bfloat16(), "b": torch.randn(53, generator=g),
            "big": torch.randn(CHUNK // 4 + 1234, generator=g), "i": torch.arange(7)}


@pytest.fixture(params=[True, False], ids=["direct", "buffered"])
def disk(request, tmp_path):
    t = DiskTier(GB, str(tmp_path / "off"), io_threads=3, direct_io=request.param)
    yield t
    t.close()


def test_direct_io_used_where_the_filesystem_allows(tmp_path):
    t = DiskTier(GB, str(tmp_path / "off"))
    t.put(("act", 0), torch.ones(3))  # the run directory is made (and probed) on the first write
    assert t.direct == direct_io_works(t.run.fd)
    t.close()


def test_disk_round_trip(disk):
    w = weights()
    disk.put(("w", 0), w)
    disk.put(("act", 1), w["w"])
    got = disk.get(("w", 0))
    assert set(got) == set(w) and all(torch.equal(got[k], w[k]) and got[k].dtype == w[k].dtype for k in w)
    assert torch.equal(disk.pop(("act", 1)), w["w"])
    assert disk.used == sum(t.numel() * t.element_size() for t in w.values())  # the plan's bytes
    assert len(disk.files()) == 1
    disk.pop(("w", 0))
    assert disk.used == 0 and disk.files() == []


def test_cache_prefix_reads_and_slice_writes_match_memory(disk):
    shape = (2, 11, 3, 2, 5)  # [2, S_max, B, nkv, d]
    mem = Tier("host", GB, torch.device("cpu"))
    for t in (mem, disk):
        t.alloc(("kv", 1, 0), shape, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    start = 0
    for s in (4, 1, 1, 3):
        new = torch.randn((2, s) + shape[2:], generator=g).bfloat16()
        for t in (mem, disk):
            t.write_slice(("kv", 1, 0), start, new)
        start += s
        for n in (1, start):
            assert torch.equal(disk.read_prefix(("kv", 1, 0), n), mem.read_prefix(("kv", 1, 0), n))


def test_read_buffers_serve_the_next_read_of_their_size_within_room():
    pool = ReadBuffers(keep=1)  # (the executor keeps 2 per size)
    a = pool.take(3 * ALIGN)
    assert a.data_ptr() % ALIGN == 0 and a.numel() == 3 * ALIGN
    pool.give({"x": a[:ALIGN].view(torch.float32), "y": a[ALIGN:]})
    assert pool.pooled == 0  # room() is 0 until an executor sets it: nothing kept
    pool.room = lambda: 10 * ALIGN
    pool.give({"x": a[:ALIGN].view(torch.float32), "y": a[ALIGN:]})  # one storage, given once
    assert pool.pooled == 4 * ALIGN
    b = pool.take(3 * ALIGN)
    assert b.data_ptr() == a.data_ptr() and pool.pooled == 0 and (pool.hits, pool.misses) == (1, 1)
    assert pool.take(2 * ALIGN).data_ptr() != a.data_ptr()  # another size: a new buffer
    pool.give(b)
    pool.give(ReadBuffers().take(3 * ALIGN))  # a second buffer of a pooled size
    assert pool.pooled == 4 * ALIGN  # keep=1 per size
    pool.room = lambda: 5 * ALIGN
    pool.give(ReadBuffers().take(2 * ALIGN))  # 4 + 3 pages would pass room()
    assert pool.pooled == 4 * ALIGN
    pool.clear()
    assert pool.pooled == 0 and not pool.free


def test_weights_read_from_disk_reuse_freed_buffers(opt_ckpt, tmp_path):
    """A weights-on-disk run reads every layer after the first of each size into a freed buffer,
    with the same tokens as the reference executor (which frees the same way)."""
    ids, mask = left_padded_batch(3)
    ov = ["policy.percent=[0,0,100,0,100,0]", "model.dtype=float32", f"hardware.offload_dir={tmp_path}",
          "policy.gpu_batch_size=3", "policy.num_gpu_batches=1"]
    outs = []
    for ex in ("reference", "async"):
        with LLM(str(opt_ckpt[0]), ov + [f"executor.name={ex}"]) as llm:
            outs.append(llm.generate(ids, attention_mask=mask, max_new_tokens=8))
            pool = llm.executor.tiers["disk"].buffers
            sizes = {a["w_bytes"] for n, a in llm.graph.nodes(data=True) if "kind" in a and a["w_bytes"]}
            assert pool.misses <= len(sizes) and pool.hits >= 5 * pool.misses  # only the first of a size
            assert pool.pooled == 0  # returned at the end of the block
    assert torch.equal(outs[0], outs[1])


def test_in_place_safetensors_read_copies_nothing(tmp_path, disk):
    from safetensors.torch import save_file

    w = {"model.x.weight": torch.randn(33, 65).bfloat16(), "model.y.bias": torch.randn(65).bfloat16(),
         "model.z.weight": torch.randn(300, 7000).bfloat16()}
    save_file(w, str(tmp_path / "model.safetensors"))
    src = CheckpointWeights(tmp_path)
    specs = [WeightSpec(n.split(".", 1)[1], n, tuple(t.shape)) for n, t in w.items()]
    ext = [Extent(s.name, *src.locate(s)[:2], torch.bfloat16, s.shape) for s in specs]
    disk.put_external(("w", 3), ext, torch.bfloat16)
    got = disk.get(("w", 3))
    assert all(torch.equal(got[s.name], w[s.source]) for s in specs)
    assert disk.root is None  # nothing copied to the offload dir: not even a run directory made
    disk.drop(("w", 3))
    assert (tmp_path / "model.safetensors").exists()  # and the checkpoint is left alone


def test_llm_reads_disk_weights_in_place(tmp_path):
    """A bf16 safetensors checkpoint with every weight on disk: no weight file in the offload dir."""
    make_opt(tmp_path / "ckpt")
    sd = CheckpointWeights(tmp_path / "ckpt")
    from safetensors.torch import load_file, save_file

    f = next((tmp_path / "ckpt").glob("*.safetensors"))
    save_file({k: v.bfloat16() for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    sd.close()
    ids, mask = left_padded_batch(4)
    common = [f"hardware.offload_dir={tmp_path / 'off'}", "policy.gpu_batch_size=2", "policy.num_gpu_batches=2"]
    with LLM(str(tmp_path / "ckpt"), ["policy.percent=[0,0,100,0,100,0]", "executor.name=async"] + common) as llm:
        out = llm.generate(ids, attention_mask=mask, max_new_tokens=4)
        disk = llm.executor.tiers["disk"]
        assert len(disk.external) == len(llm.spec.layers)
        assert not [f for f in disk.files() if f.startswith("w_")]
    with LLM(str(tmp_path / "ckpt"), ["policy.percent=[100,0,100,0,100,0]"] + common) as llm:
        assert torch.equal(llm.generate(ids, attention_mask=mask, max_new_tokens=4), out)


def test_unwritable_offload_dir_is_a_clear_error_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    t = DiskTier(GB, str(blocker / "offload"))  # nothing happens before the first write
    with pytest.raises(OSError, match="hardware.offload_dir"):
        t.put(("act", 0), torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_offload_dir_created_for_the_run_is_removed_on_close(tmp_path):
    t = DiskTier(GB, str(tmp_path / "new" / "deeper"))
    t.put(("act", 0), torch.ones(10))
    t.close()
    assert os.listdir(tmp_path) == []


def test_disk_full_refused_before_generation_and_nothing_left(opt_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(DiskTier, "free_bytes", lambda self: 1000)
    ids, mask = left_padded_batch(4)
    off = tmp_path / "off"
    with LLM(str(opt_ckpt[0]), ["policy.percent=[0,0,0,0,0,0]", f"hardware.offload_dir={off}"]) as llm:
        with pytest.raises(DiskFull, match="hardware.offload_dir"):
            llm.generate(ids, attention_mask=mask, max_new_tokens=3)
        assert llm.executor.tiers["disk"].used == 0  # not a byte written
    assert not off.exists()


def test_disk_budget_over_plan_is_refused(opt_ckpt, tmp_path):
    ids, mask = left_padded_batch(4)
    with LLM(str(opt_ckpt[0]), ["policy.percent=[0,0,0,0,0,0]", "hardware.disk_mem=10kB",
                                f"hardware.offload_dir={tmp_path / 'off'}"]) as llm:
        with pytest.raises(PassError, match="hardware.disk_mem"):
            llm.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert not (tmp_path / "off").exists()


@pytest.mark.parametrize("executor", ["reference", "async"])
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_offload_dir_cleaned_after_error_mid_run(opt_ckpt, tmp_path, monkeypatch, executor, exc):
    from executors.base import Executor

    real, calls = Executor.compute, {"n": 0}

    def compute(self, n, a):
        calls["n"] += 1
        if calls["n"] == 7:
            assert self.tiers["disk"].files()  # the run had files on disk
            raise exc("stop")
        real(self, n, a)

    monkeypatch.setattr(Executor, "compute", compute)
    ids, mask = left_padded_batch(4)
    off = tmp_path / "off"
    llm = LLM(str(opt_ckpt[0]), ["policy.percent=[0,0,0,0,0,0]", f"hardware.offload_dir={off}",
                                 f"executor.name={executor}"])
    with pytest.raises(exc):
        with llm:
            llm.generate(ids, attention_mask=mask, max_new_tokens=3)
    assert not off.exists()


def test_slice_write_of_the_slice_itself_copies_nothing(monkeypatch):
    t = Tier("device", GB, torch.device("cpu"))
    t.alloc("kv", (2, 6, 3, 2, 4), torch.float32, head_major=True)
    x = torch.randn(2, 2, 3, 2, 4)
    t.write_slice("kv", 1, x)
    assert torch.equal(t.read_prefix("kv", 3)[:, 1:], x)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda *a, **k: pytest.fail("copied a slice onto itself"))
    t.write_slice("kv", 1, t.get("kv")[:, 1:3])  # attention wrote it in place: nothing to do
    assert torch.equal(t.read_prefix("kv", 3)[:, 1:], x)


def test_tier_budget_enforced_at_runtime():
    t = Tier("host", 100, torch.device("cpu"))
    t.put("a", torch.zeros(20))  # 80 bytes
    with pytest.raises(TierFull, match="hardware.host_mem"):
        t.put("b", torch.zeros(10))
    assert t.used == 80 and "b" not in t


def test_tier_accounting_is_thread_safe():
    t = Tier("device", GB, torch.device("cpu"))

    def churn(w):
        for i in range(2000):
            t.put((w, i), torch.zeros(3))
            t.pop((w, i))

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.used == 0 and t.peak <= 4 * 12
