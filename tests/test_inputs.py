"""generate()'s inputs (graphgen/inputs.py): right padding handled, bad ids / masks / shapes
refused with a message naming the argument, and random inputs never end in a traceback."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from graphgen import LLM

VOCAB = 96  # conftest's tiny OPT


@pytest.fixture(scope="module")
def llm(opt_ckpt):
    with LLM(str(opt_ckpt[0]), ["model.dtype=float32", "policy.gpu_batch_size=2", "report.progress=false"]) as m:
        yield m


def test_right_padded_prompts_generate_what_the_unpadded_ones_do(llm):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(4, VOCAB, (5,), generator=g), torch.randint(4, VOCAB, (3,), generator=g)
    alone = [llm.generate(p[None], max_new_tokens=5)[0, len(p):] for p in (a, b)]
    right = torch.stack([a, torch.cat([b, torch.ones(2, dtype=torch.long)])])
    rmask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    out = llm.generate(right, attention_mask=rmask, max_new_tokens=5)
    assert torch.equal(out[:, :5], right)  # the prompts as given, then the new tokens
    assert torch.equal(out[0, 5:], alone[0]) and torch.equal(out[1, 5:], alone[1])
    for n in range(3):  # one right-padded prompt at a time
        p = torch.randint(4, VOCAB, (3,), generator=g)
        padded = llm.generate(torch.cat([p, torch.ones(2, dtype=torch.long)])[None],
                              attention_mask=torch.tensor([[1, 1, 1, 0, 0]]), max_new_tokens=5)
        assert torch.equal(padded[0, 5:], llm.generate(p[None], max_new_tokens=5)[0, 3:])
    both = torch.tensor([[1, *b.tolist(), 1]])  # padded on both sides
    assert torch.equal(llm.generate(both, attention_mask=torch.tensor([[0, 1, 1, 1, 0]]), max_new_tokens=5)[0, 5:],
                       alone[1])


@pytest.mark.parametrize("ids,mask,match", [
    (torch.zeros(0, 4, dtype=torch.long), None, "no prompts"),
    (torch.zeros(2, 0, dtype=torch.long), None, "length 0"),
    (torch.tensor([5, 6, 7]), None, r"\[batch, seq\].*input_ids\[None\]"),
    (torch.tensor([[5.0, 6.0]]), None, "integer token ids"),
    (torch.tensor([[5, VOCAB]]), None, f"token id {VOCAB} at \\[0, 1\\], outside the model's vocabulary of {VOCAB}"),
    (torch.tensor([[5, -1]]), None, "token id -1"),
    (torch.tensor([[5, 6]]), torch.tensor([[1, 1, 1]]), r"attention_mask has shape \(1, 3\) but input_ids \(1, 2\)"),
    (torch.tensor([[5, 6]]), torch.tensor([[1, 1], [1, 1]]), r"attention_mask has shape \(2, 2\)"),
    (torch.tensor([[5, 6]]), torch.tensor([[1, 2]]), "only 0 .padding. and 1 .token., found 2"),
    (torch.tensor([[5, 6]]), torch.tensor([[0.5, 1.0]]), "found 0.5"),
    (torch.tensor([[5, 6]]), torch.tensor([[0, 0]]), "row 0 is all 0"),
    (torch.tensor([[5, 6, 7]]), torch.tensor([[1, 0, 1]]), "row 0 has padding between tokens"),
])
def test_bad_inputs_are_refused_with_what_to_change(llm, ids, mask, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_bad_lengths_are_refused(llm):
    with pytest.raises(ValueError, match="max_new_tokens=0 must be an integer >= 1"):
        llm.generate(torch.tensor([[5, 6]]), max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model's context of 64 positions"):
        llm.generate(torch.tensor([[5] * 60]), max_new_tokens=5)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_and_masks_give_a_result_or_a_clear_error(llm, data):
    B, S = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 5))
    ids = torch.tensor(data.draw(st.lists(st.lists(st.integers(-2, VOCAB + 2), min_size=S, max_size=S),
                                          min_size=B, max_size=B)), dtype=torch.long).reshape(B, S)
    mask = None
    if data.draw(st.booleans()):
        mw, mb = data.draw(st.sampled_from([S, S + 1])), data.draw(st.sampled_from([B, B + 1]))
        mask = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([0, 1, 1, 1, 2]), min_size=mw, max_size=mw),
                                               min_size=mb, max_size=mb)), dtype=torch.long).reshape(mb, mw)
    gen = data.draw(st.integers(0, 3))
    try:
        out = llm.generate(ids, attention_mask=mask, max_new_tokens=gen)
    except ValueError as e:
        assert str(e) and any(k in str(e) for k in ("input_ids", "attention_mask", "max_new_tokens"))
        return
    assert out.shape == (B, S + gen) and bool(((out >= 0) & (out < VOCAB)).all())
