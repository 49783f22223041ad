"""graphgen.sampling against transformers' warpers: same filtered logits, same samples."""
import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from graphgen.sampling import Sampling, process_logits, select_tokens, step_generator, token_logprobs

SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 0, 1.0), (1.0, 1, 1.0), (1.0, 5, 1.0), (1.0, 50, 1.0),
    (1.0, 1000, 1.0), (1.0, 0, 0.9), (1.0, 0, 0.5), (1.0, 0, 0.0), (1.0, 0, 1e-6),
    (0.6, 40, 0.95), (2.0, 10, 0.3), (0.3, 3, 0.99),
]


def hf_warpers(temperature, top_k, top_p):
    """The chain GenerationMixin._get_logits_processor builds for do_sample=True, num_beams=1."""
    chain = LogitsProcessorList()
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        chain.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return chain


def random_logits(seed, B=4, V=503, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filtered_logits_match_hf(temperature, top_k, top_p):
    s = Sampling(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    for seed in range(5):
        logits = random_logits(seed)
        ours = process_logits(logits, s)
        ref = hf_warpers(temperature, top_k, top_p)(torch.zeros(4, 1, dtype=torch.long), logits.clone())
        assert torch.equal(ours, ref)  # bit-identical, -inf in the same places


def test_ties_and_peaked_logits_match_hf():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0, -1.0], [5.0, 5.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0, 0.0]])
    for t, k, p in [(1.0, 2, 1.0), (1.0, 1, 1.0), (1.0, 0, 0.5), (0.5, 2, 0.6), (1.0, 3, 0.01)]:
        s = Sampling(do_sample=True, temperature=t, top_k=k, top_p=p)
        ref = hf_warpers(t, k, p)(None, logits.clone())
        assert torch.equal(process_logits(logits, s), ref)


def test_sampled_tokens_match_hf_with_same_rng():
    logits = random_logits(7, B=8, V=1000)
    for t, k, p in [(0.8, 20, 0.9), (1.0, 0, 1.0), (1.5, 0, 0.7)]:
        s = Sampling(do_sample=True, temperature=t, top_k=k, top_p=p)
        torch.manual_seed(123)
        ref = torch.multinomial(hf_warpers(t, k, p)(None, logits.clone()).softmax(-1), 1).squeeze(1)
        torch.manual_seed(123)
        assert torch.equal(select_tokens(logits, s), ref)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(select_tokens(logits, s, g1), select_tokens(logits, s, g2))


def test_greedy_is_argmax_and_ignores_warpers():
    logits = random_logits(3)
    s = Sampling(do_sample=False, temperature=0.1, top_k=2, top_p=0.1)
    assert torch.equal(select_tokens(logits, s), logits.argmax(-1))


def test_greedy_on_bfloat16_logits_is_the_float32_argmax():
    """The heads return logits in the compute dtype; greedy takes them as they are (ties included:
    rounding to bfloat16 makes many)."""
    logits = random_logits(5, B=16, V=49152).to(torch.bfloat16)
    s = Sampling(do_sample=False)
    assert torch.equal(select_tokens(logits, s), logits.float().argmax(-1))
    first = torch.arange(16) * 3000 + 7
    logits[torch.arange(16), first] = logits[torch.arange(16), first + 999] = 100.0  # tied maxima
    assert torch.equal(select_tokens(logits, s), first)
    lp = token_logprobs(logits, select_tokens(logits, s), s)
    assert lp.dtype == torch.float32 and torch.allclose(lp, torch.log_softmax(logits.float(), -1).max(-1).values)


def test_sampled_tokens_stay_inside_the_filter():
    logits = random_logits(11, B=64, V=100)
    s = Sampling(do_sample=True, top_k=3)
    allowed = torch.topk(logits, 3).indices
    tok = select_tokens(logits, s, torch.Generator().manual_seed(0))
    assert (allowed == tok[:, None]).any(1).all()


def test_token_logprobs_of_processed_distribution():
    logits = random_logits(5)
    s = Sampling(do_sample=True, temperature=0.7, top_k=10, top_p=0.9)
    tok = select_tokens(logits, s, torch.Generator().manual_seed(0))
    ref = torch.log_softmax(hf_warpers(0.7, 10, 0.9)(None, logits.clone()), -1).gather(1, tok[:, None])[:, 0]
    assert torch.allclose(token_logprobs(logits, tok, s), ref)
    assert torch.isfinite(token_logprobs(logits, tok, s)).all()
    greedy = Sampling()
    tok = select_tokens(logits, greedy)
    assert torch.allclose(token_logprobs(logits, tok, greedy), torch.log_softmax(logits, -1).max(-1).values)


def test_bfloat16_logits_are_processed_in_float32():
    logits = random_logits(2).to(torch.bfloat16)
    s = Sampling(do_sample=True, temperature=0.9, top_p=0.8)
    tok = select_tokens(logits, s, torch.Generator().manual_seed(1))
    assert tok.dtype == torch.long and tok.shape == (4,)


@pytest.mark.parametrize("kw,msg", [(dict(do_sample=True, temperature=0.0), "do_sample=false"),
                                    (dict(top_k=-1), "top_k"), (dict(top_p=1.5), "top_p")])
def test_invalid_settings_say_what_to_change(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Sampling(**kw)


def test_step_generator_is_deterministic_per_coordinate():
    assert step_generator(None, 0, 0, 0) is None
    a = torch.rand(3, generator=step_generator(1, 2, 3, 4))
    b = torch.rand(3, generator=step_generator(1, 2, 3, 4))
    c = torch.rand(3, generator=step_generator(1, 2, 3, 5))
    assert torch.equal(a, b) and not torch.equal(a, c)
