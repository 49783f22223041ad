"""LLM.score / score_tokens / score_rolling vs transformers (float32, within 1e-4), through every
placement and both executors; compressed weights; chunked logits; lm-eval's truncation."""
from __future__ import annotations

import pytest
import torch

from graphgen import LLM, costs
from graphgen.scoring import encode_pair, rolling_windows

from .fake_llm import make_llama_checkpoint, make_opt_checkpoint

PAIRS = [("The cat sat on the", " mat"), ("Hello", " world, how are you?"), ("", "Empty context"),
         ("Trailing space ", "moves"), ("x" * 40, " y"), ("a", "b")]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama_checkpoint(tmp_path_factory.mktemp("llama-score"))


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return make_opt_checkpoint(tmp_path_factory.mktemp("opt-score"))


def hf_score(path, pairs, max_len):
    """The oracle: one unpadded sequence at a time, float32 log-softmax at the continuation."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for ctx, cont in pairs:
        whole = (list(ctx) + list(cont))[-(max_len + 1):]
        with torch.no_grad():
            logits = model(torch.tensor([whole[:-1]])).logits[0, -len(cont):].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
        out.append((float(lp.double().sum()), bool((logits.argmax(-1) == torch.tensor(cont)).all())))
    return out


def graphgen_llm(path, *overrides, gbs=2, ngb=2):
    return LLM(str(path), ["model.dtype=float32", f"policy.gpu_batch_size={gbs}", f"policy.num_gpu_batches={ngb}",
                           *overrides])


def assert_close(got, want):
    assert len(got) == len(want)
    for (a, ga), (b, gb) in zip(got, want):
        assert abs(a - b) < 1e-4, (got, want)
        assert ga == gb


PLACEMENTS = {"device": [], "mixed-disk": ["policy.percent=[30,30,40,30,20,50]"],
              "host-async": ["policy.percent=[0,100,0,100,0,100]", "executor.name=async"]}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_score_matches_transformers(llama_dir, opt_dir, tmp_path, family, placement):
    path = llama_dir if family == "llama" else opt_dir
    with graphgen_llm(path, f"hardware.offload_dir={tmp_path}", *PLACEMENTS[placement]) as llm:
        got = llm.score([c for c, _ in PAIRS], [x for _, x in PAIRS])
        pairs = [encode_pair(llm.tokenizer, c, x) for c, x in PAIRS]
    assert_close(got, hf_score(path, pairs, llm.spec.max_positions))


def test_greedy_flag_is_true_for_the_models_own_continuation(llama_dir):
    with graphgen_llm(llama_dir) as llm:
        ids = llm.tokenizer("Once upon", return_tensors="pt")["input_ids"]
        new = llm.generate(ids, max_new_tokens=5)[0, ids.shape[1]:].tolist()
        (lp, greedy), (_, not_greedy) = llm.score_tokens([(ids[0].tolist(), new),
                                                          (ids[0].tolist(), new[:4] + [(new[4] + 1) % 200 + 3])])
    assert greedy and not not_greedy and lp < 0


def test_truncation_keeps_the_last_max_len_tokens(llama_dir):
    pairs = [(list(range(3, 63)), [70, 71, 72]), (list(range(5, 20)), [80])]
    with graphgen_llm(llama_dir) as llm:
        got = llm.score_tokens(pairs, max_len=24)
    assert_close(got, hf_score(llama_dir, pairs, 24))


def test_logits_are_made_a_chunk_at_a_time(llama_dir, monkeypatch):
    pairs = [(list(range(3, 30)), list(range(40, 52))), (list(range(7, 12)), [90, 91])]
    with graphgen_llm(llama_dir) as llm:
        whole = llm.score_tokens(pairs)
        monkeypatch.setattr(costs, "SCORE_CHUNK_BYTES", 4 * 2 * llm.spec.vocab_size * 3)  # 3 positions a chunk
        assert costs.score_chunk(2, llm.spec.vocab_size, 40) == 3
        chunked = llm.score_tokens(pairs)
    assert_close(chunked, whole)


def test_score_graph_is_prefill_only_and_plans_the_head(llama_dir):
    with graphgen_llm(llama_dir) as llm:
        llm.score(["abc"], ["d"])
        g = llm.graph
        assert g.graph["num_tokens"] == 1 and g.graph["shape"].score
        head = g.nodes[(0, g.graph["num_layers"] - 1, 0)]
        plain = llm.compile(g.graph["shape"].prompt_len, 1, 1, 1).nodes[(0, g.graph["num_layers"] - 1, 0)]
    assert head["flops"] > plain["flops"] and head["workspace"] > plain["workspace"]


def test_score_rolling_matches_transformers_windows(llama_dir):
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    with graphgen_llm(llama_dir) as llm:
        short, = llm.score_rolling([text], max_len=16)
        full, = llm.score_rolling([text])
        ids = llm.tokenizer.encode(text)
    windows = rolling_windows(ids, 1, 16)
    assert len(windows) > 4 and sum(len(c) for _, c in windows) == len(ids)
    assert abs(short - sum(lp for lp, _ in hf_score(llama_dir, windows, 16))) < 1e-4
    # one window: the whole text after the prefix token, every token scored once
    assert abs(full - hf_score(llama_dir, [([1], ids)], 128)[0][0]) < 1e-4


def test_compressed_weights_score_close_to_float32(llama_dir):
    with graphgen_llm(llama_dir) as llm:
        exact = llm.score([c for c, _ in PAIRS], [x for _, x in PAIRS])
    with graphgen_llm(llama_dir, "policy.compress_weight.bits=8") as llm:
        q8 = llm.score([c for c, _ in PAIRS], [x for _, x in PAIRS])
        assert llm.graph.graph["compression"]
    assert any(a != b for (a, _), (b, _) in zip(exact, q8))
    assert all(abs(a - b) < 0.05 * abs(a) + 0.05 for (a, _), (b, _) in zip(exact, q8))


def test_bad_pairs_say_what_is_wrong(llama_dir):
    with graphgen_llm(llama_dir) as llm:
        with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
            llm.score(["a", "b"], ["c"])
        with pytest.raises(ValueError, match="nothing to score"):
            llm.score_tokens([([3], [])])
        with pytest.raises(ValueError, match="use score_rolling"):
            llm.score_tokens([([3], [4] * 130)])
