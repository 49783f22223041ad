"""The executor's boundary checks (executors/base.py): a device this process cannot compute on,
a pipeline that leaves the graph unrunnable: clear errors naming the key, before anything runs."""
from __future__ import annotations

import pytest
import torch

from graphgen import LLM

from ..conftest import left_padded_batch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(opt_ckpt):
    with LLM(str(opt_ckpt[0]), ["hardware.device=cuda"]) as llm:
        with pytest.raises(ValueError, match="hardware.device='cuda' but this torch .* sees no CUDA GPU"):
            llm.generate(*left_padded_batch(2), max_new_tokens=2)


def test_an_unknown_device_is_a_clear_error(opt_ckpt):
    with LLM(str(opt_ckpt[0]), ["hardware.device=tpu"]) as llm:
        with pytest.raises(ValueError, match="hardware.device='tpu' is not a device"):
            llm.generate(*left_padded_batch(2), max_new_tokens=2)


def test_a_pipeline_missing_passes_is_named(opt_ckpt):
    with LLM(str(opt_ckpt[0]), ["pipeline=[order,place_tensors]"]) as llm:
        with pytest.raises(ValueError, match=r"pipeline=\['order', 'place_tensors'\] leaves the graph unrunnable"):
            llm.generate(*left_padded_batch(2), max_new_tokens=2)
