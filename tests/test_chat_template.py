"""Chat messages -> the tokenizer's template -> prompt ids; replies end at the end-of-turn token."""
from __future__ import annotations

import pytest

from graphgen.chat_template import chat_ids, check_messages, end_of_turn_ids, is_messages, render

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_render_writes_the_template_and_opens_the_assistant_turn(smollm2):
    text = render(smollm2.tokenizer, CHAT)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template's own default system turn


def test_chat_ids_are_transformers_apply_chat_template(smollm2):
    tok = smollm2.tokenizer
    want = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert chat_ids(tok, CHAT) == list(want)


def test_end_of_turn_is_the_template_token(smollm2):
    tok = smollm2.tokenizer
    assert end_of_turn_ids(tok, smollm2.spec.eos_token_id) == [tok.convert_tokens_to_ids("<|im_end|>")]

    class Tok:
        eos_token_id = 7
    assert end_of_turn_ids(Tok(), 2) == [2, 7] and end_of_turn_ids(Tok(), 7) == [7]


def test_a_tokenizer_without_template_says_what_to_do():
    class Plain:
        chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render(Plain(), CHAT)


@pytest.mark.parametrize("bad,words", [([], "non-empty list"), ("hi", "non-empty list"),
                                       ([{"role": "user"}], "messages[0]"), ([{"role": "bot", "content": "x"}],
                                                                             "role='bot'"),
                                       ([{"role": "user", "content": " "}], "empty")])
def test_bad_messages_are_named(bad, words):
    assert words in check_messages(bad)
    assert check_messages(CHAT) is None
    assert is_messages(CHAT) and not is_messages("text") and not is_messages([])
