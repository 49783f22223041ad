"""graphgen vs transformers generate: same tokens (float32, greedy) for every schedule,
placement and CPU-attention setting, on left-padded batches of different lengths."""
from __future__ import annotations

import pytest
import torch

from graphgen import LLM

from .conftest import left_padded_batch

PLACEMENTS = {
    "all-device": "[100,0,100,0,100,0]",
    "all-host": "[0,100,0,100,0,100]",
    "all-disk": "[0,0,0,0,0,0]",
    "mixed": "[30,30,40,30,20,50]",
}


def run_graphgen(ckpt, offload_dir, *, schedule, percent, cpu_attention, gbs=2, ngb=3, gen=6, n=5,
                 executor="reference"):
    ids, mask = left_padded_batch(n)
    llm = LLM(str(ckpt), [f"schedule={schedule}", f"policy.percent={percent}",
                          f"policy.cpu_attention={str(cpu_attention).lower()}", "model.dtype=float32",
                          f"policy.gpu_batch_size={gbs}", f"policy.num_gpu_batches={ngb}",
                          f"hardware.offload_dir={offload_dir}", f"executor.name={executor}"])
    with llm:
        return llm.generate(ids, attention_mask=mask, max_new_tokens=gen), llm


def hf_generate(model, gen=6, n=5):
    ids, mask = left_padded_batch(n)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=gen, do_sample=False)


@pytest.mark.parametrize("schedule", ["row", "zigzag"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("cpu_attention", [False, True])
def test_matches_hf(opt_ckpt, offload_dir, schedule, placement, cpu_attention):
    path, model = opt_ckpt
    out, _ = run_graphgen(path, offload_dir, schedule=schedule, percent=PLACEMENTS[placement],
                          cpu_attention=cpu_attention)
    ref = hf_generate(model)
    assert torch.equal(out[:, :ref.shape[1]], ref)


@pytest.mark.parametrize("schedule", ["row", "zigzag"])
def test_opt350m_variant_matches_hf(opt350_ckpt, offload_dir, schedule):
    path, model = opt350_ckpt
    out, _ = run_graphgen(path, offload_dir, schedule=schedule, percent=PLACEMENTS["mixed"], cpu_attention=True)
    assert torch.equal(out[:, :hf_generate(model).shape[1]], hf_generate(model))


def test_prompt_count_not_a_multiple_of_the_block(opt_ckpt, offload_dir):
    """7 prompts, blocks of 2 x 2: two blocks, the last one padded; FlexGen demanded an exact count."""
    path, model = opt_ckpt
    out, _ = run_graphgen(path, offload_dir, schedule="zigzag", percent=PLACEMENTS["all-host"],
                          cpu_attention=False, gbs=2, ngb=2, n=7)
    assert torch.equal(out, hf_generate(model, n=7))


def test_output_shape_and_eos_padding(opt_ckpt, offload_dir):
    """Always [B, S + max_new_tokens]; after an eos every token is the pad id (HF semantics)."""
    path, model = opt_ckpt
    out, llm = run_graphgen(path, offload_dir, schedule="zigzag", percent=PLACEMENTS["all-device"],
                            cpu_attention=False, gen=12)
    assert out.shape == (5, 7 + 12)
    new = out[:, 7:]
    eos, pad = llm.spec.eos_token_id, llm.spec.pad_token_id
    for row in new:
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[hits[0, 0] + 1:] == pad).all()
    fake = torch.tensor([[5, eos, 7, eos, 9]])
    assert llm._after_eos(fake).tolist() == [[5, eos, pad, pad, pad]]


def test_logprobs_and_per_prompt_seeds(opt_ckpt, offload_dir):
    """Greedy log-probs equal log_softmax of HF's logits; a prompt's samples follow its own seed."""
    path, model = opt_ckpt
    ids, mask = left_padded_batch(4)
    with LLM(str(path), ["model.dtype=float32", "policy.gpu_batch_size=2", "policy.num_gpu_batches=1",
                         f"hardware.offload_dir={offload_dir}"]) as llm:
        out, lp = llm.generate(ids, mask, max_new_tokens=3, return_logprobs=True)
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=3, output_scores=True,
                                 return_dict_in_generate=True)
        want = torch.stack([torch.log_softmax(sc.float(), -1).gather(-1, out[:, 7 + t, None]).squeeze(-1)
                            for t, sc in enumerate(ref.scores)], 1)
        assert torch.allclose(lp, want, atol=1e-4)
        kw = dict(max_new_tokens=4, do_sample=True, temperature=1.5)
        a = llm.generate(ids, mask, seed=[11, 12, 13, 14], **kw)
        b = llm.generate(ids[[2, 3, 0, 1]], mask[[2, 3, 0, 1]], seed=[13, 14, 11, 12], **kw)
        assert torch.equal(a[[2, 3, 0, 1]], b)  # rows keep their samples whichever block they are in


def test_sampling_with_a_seed_repeats_across_schedules_and_placements(opt_ckpt, offload_dir):
    """Sampling depends on (seed, block, batch, step), never on the order squares run in."""
    path, _ = opt_ckpt
    ids, mask = left_padded_batch(5)
    outs = []
    for sched, pct, cpu in [("row", PLACEMENTS["all-device"], "false"), ("zigzag", PLACEMENTS["all-disk"], "true"),
                            ("zigzag", PLACEMENTS["mixed"], "false")]:
        with LLM(str(path), [f"schedule={sched}", f"policy.percent={pct}", f"policy.cpu_attention={cpu}",
                             "model.dtype=float32", "policy.gpu_batch_size=2", "policy.num_gpu_batches=3",
                             f"hardware.offload_dir={offload_dir}"]) as llm:
            outs.append(llm.generate(ids, mask, max_new_tokens=6, do_sample=True, temperature=1.3, top_k=20,
                                     top_p=0.95, seed=5))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert len(set(outs[0][:, 7:].flatten().tolist())) > 3  # it really sampled


def test_a_model_that_is_neither_a_path_nor_a_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"no such checkpoint directory or \.gguf file.*opt-125m"):
        LLM(str(tmp_path / "missing-checkpoint"))
    with pytest.raises(ValueError, match="not a model name"):
        LLM("opt-125mm")
