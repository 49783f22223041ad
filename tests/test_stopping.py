"""Stop strings on decoded text, eos handling, token counts and logprobs alignment."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_llm import EOS, PAD, make_tokenizer  # noqa: E402

from graphgen.stopping import CompletionDecoder, find_stop, finish, normalize_stops  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text):
    return tok(text)["input_ids"]


def test_normalize_stops_dedupes_and_drops_empty():
    assert normalize_stops(None) == ()
    assert normalize_stops("x") == ("x",)
    assert normalize_stops(["\n", "", "Q:", "\n"]) == ("\n", "Q:")
    with pytest.raises(TypeError):
        normalize_stops([1])


def test_find_stop_earliest_wins():
    assert find_stop("abc Q: x\n", ["\n", "Q:"]) == (4, "Q:")
    assert find_stop("abc", ["z"]) is None
    assert find_stop("abcd", ["bcd", "bc"]) == (1, "bc")  # same start: the shorter completes first


def test_multi_token_stop_is_cut_and_counted(tok):
    prompt = ids(tok, "Q: 1+1?\nA:")
    new = ids(tok, " 2\n\nQ: 2+2?") + [PAD] * 3  # "\n\nQ:" spans four byte tokens
    c = finish(tok, prompt, new, eos_token_id=EOS, stop=["\n\nQ:"])
    assert (c.text, c.finish_reason, c.stop) == (" 2", "stop", "\n\nQ:")
    assert len(c.token_ids) == len(" 2\n\nQ:")  # up to the token that completes the stop string


def test_earliest_of_several_stops(tok):
    new = ids(tok, "one. two\nthree")
    c = finish(tok, [], new, stop=["\n", "."])
    assert c.text == "one" and c.stop == "." and len(c.token_ids) == 4


def test_eos_then_padding(tok):
    new = ids(tok, "hello") + [EOS, PAD, PAD]
    c = finish(tok, ids(tok, "hi"), new, eos_token_id=EOS, stop=["zzz"])
    assert (c.text, c.finish_reason, len(c.token_ids)) == ("hello", "eos", 6)  # eos is counted


def test_stop_after_eos_does_not_count(tok):
    new = ids(tok, "ab") + [EOS] + ids(tok, "STOP")
    c = finish(tok, [], new, eos_token_id=[7, EOS], stop=["STOP"])
    assert (c.text, c.finish_reason) == ("ab", "eos")


def test_length_when_nothing_stops(tok):
    new = ids(tok, "abcdef")
    c = finish(tok, [], new, eos_token_id=EOS, stop=["x"])
    assert (c.text, c.finish_reason, len(c.token_ids)) == ("abcdef", "length", 6)


def test_stop_at_the_very_start_gives_empty_completion(tok):
    c = finish(tok, [], ids(tok, "\nabc"), stop="\n")
    assert (c.text, c.finish_reason, len(c.token_ids)) == ("", "stop", 1)


def test_multibyte_characters_split_across_tokens(tok):
    new = ids(tok, "né€ END more")  # é and € are 2 and 3 byte tokens
    c = finish(tok, [], new, stop=["€ E"])
    assert c.text == "né" and len(c.token_ids) == len("né€ E".encode())


def test_logprobs_truncated_with_tokens(tok):
    new = ids(tok, "ab\ncd")
    c = finish(tok, [], new, stop="\n", logprobs=[-0.1, -0.2, -0.3, -0.4, -0.5])
    assert c.logprobs == [-0.1, -0.2, -0.3] and c.tokens == ["a", "b", "\n"]


class WordTokenizer:
    """SentencePiece-like: a word decoded alone loses its leading space."""
    words = ["<s>", "the", "cat", "sat", "down", "."]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[i] for i in ids if i != 0)


def test_completion_keeps_the_leading_space_of_its_context():
    d = CompletionDecoder(WordTokenizer(), [0, 1, 2])
    assert d([3, 4]) == " sat down"
    c = finish(WordTokenizer(), [0, 1, 2], [3, 4, 5], stop=" down")
    assert c.text == " sat" and len(c.token_ids) == 2
