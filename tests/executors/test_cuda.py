"""CUDA: the async executor's streams, events and pinned staging (executors/cuda.py) give the same
tokens as the reference executor on the GPU, and the tiers stay within the plan. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from graphgen import LLM

from ..conftest import left_padded_batch
from ..test_generate_hf import PLACEMENTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_run(ckpt, offload_dir, executor, percent, cpu_attention, extra=()):
    ids, mask = left_padded_batch(5)
    with LLM(str(ckpt), ["hardware=cuda", "model.dtype=float32", f"policy.percent={percent}",
                         f"policy.cpu_attention={str(cpu_attention).lower()}", "policy.gpu_batch_size=2",
                         "policy.num_gpu_batches=3", f"hardware.offload_dir={offload_dir}",
                         f"executor.name={executor}", *extra]) as llm:
        return llm.generate(ids, attention_mask=mask, max_new_tokens=6), llm.last_stats


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("cpu_attention", [False, True])
def test_async_on_cuda_matches_reference(opt_ckpt, offload_dir, placement, cpu_attention):
    ref, _ = cuda_run(opt_ckpt[0], offload_dir, "reference", PLACEMENTS[placement], cpu_attention)
    out, st = cuda_run(opt_ckpt[0], offload_dir, "async", PLACEMENTS[placement], cpu_attention)
    assert torch.equal(out, ref)
    for tier in ("device", "host", "disk"):
        assert st["measured_peak_bytes"][tier] <= st["planned_peak_bytes"][tier]
    assert st["cuda_peak_bytes"] > 0


def test_disk_to_gpu_through_small_pinned_staging(opt_ckpt, offload_dir):
    """Staging buffers far smaller than a layer: many chunks through two reused buffers."""
    small = ["executor.staging_buffers=2", "executor.staging_bytes=4kB"]
    ref, _ = cuda_run(opt_ckpt[0], offload_dir, "reference", PLACEMENTS["all-disk"], False)
    out, _ = cuda_run(opt_ckpt[0], offload_dir, "async", PLACEMENTS["all-disk"], False, small)
    assert torch.equal(out, ref)


def test_matches_hf_on_cuda(opt_ckpt, offload_dir):
    path, model = opt_ckpt
    ids, mask = left_padded_batch(5)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    out, _ = cuda_run(path, offload_dir, "async", PLACEMENTS["mixed"], True)
    assert torch.equal(out, want)
