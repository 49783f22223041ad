"""Chat sessions keep the KV cache between turns and answer as re-encoding the history would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from graphgen import LLM

from ..fake_llm import make_opt_checkpoint

ROOT = Path(__file__).resolve().parent.parent.parent
TURNS = [[5, 17, 33, 40], [9, 12], [60, 61, 62]]


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    return make_opt_checkpoint(tmp_path_factory.mktemp("chat-opt"))


@pytest.mark.parametrize("percent,cpu", [("[100,0,100,0,100,0]", "false"), ("[0,0,0,0,0,0]", "true"),
                                         ("[0,100,0,100,0,100]", "true")])
def test_turns_equal_reencoding_the_history(chat_ckpt, tmp_path, percent, cpu):
    """Each reply equals generate() over the whole history so far, including a turn cut short
    (its unkept tokens stay in the cache, masked out)."""
    llm = LLM(str(chat_ckpt), ["model.dtype=float32", f"policy.percent={percent}",
                               f"policy.cpu_attention={cpu}", f"hardware.offload_dir={tmp_path}"])
    with llm, llm.chat(max_context=64) as s:
        cuts = [lambda t: len(t), lambda t: 2, lambda t: len(t)]
        replies = [s.send(t, max_new_tokens=5, cut=c) for t, c in zip(TURNS, cuts)]
        assert s.context_len == sum(map(len, TURNS)) + sum(map(len, replies))
        hist = []
        for t, r in zip(TURNS, replies):
            hist += t
            ref = llm_generate_closed(llm, s, hist)
            assert ref[:len(r)] == r
            hist += r


def llm_generate_closed(llm, session, hist):
    """generate() over the history with the session paused (it owns the executor's cache)."""
    llm.session = None
    try:
        return llm.generate(torch.tensor([hist]), max_new_tokens=5)[0, len(hist):].tolist()
    finally:
        llm.session = session


def test_a_session_refuses_what_its_cache_cannot_hold(chat_ckpt):
    with LLM(str(chat_ckpt), ["model.dtype=float32"]) as llm, llm.chat(max_context=12) as s:
        s.send([5, 6, 7], max_new_tokens=4)
        with pytest.raises(ValueError, match="start a new session"):
            s.send([8, 9, 10, 11], max_new_tokens=4)
        with pytest.raises(RuntimeError, match="chat session is open"):
            llm.generate(torch.tensor([[5, 6]]), max_new_tokens=2)


def test_chat_app_through_a_pipe(chat_ckpt):
    """The app reads turns from a pipe, answers each, and exits at end of input."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "graphgen.apps.chat", "--model", str(chat_ckpt),
                        "--max-new-tokens", "6", "--temperature", "0", "--system", "Hi.\n", "model.dtype=float32"],
                       input="Hello there\nHow are you?\n/reset\nAgain\n", capture_output=True, text=True,
                       cwd=ROOT, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("Assistant:") == 3
    assert "context" in r.stderr


def test_send_after_close_is_refused(chat_ckpt):
    with LLM(str(chat_ckpt), ["model.dtype=float32"]) as llm:
        s = llm.chat()
        s.send([5, 6, 7], max_new_tokens=2)
        s.close()
        with pytest.raises(RuntimeError, match="session is closed"):
            s.send([8], max_new_tokens=2)
        with llm.chat() as s2:
            with pytest.raises(ValueError, match="outside the model's vocabulary"):
                s2.send([5, 10**6], max_new_tokens=2)
            with pytest.raises(ValueError, match="non-empty list of integer token ids"):
                s2.send([], max_new_tokens=2)


def run_app(ckpt, data: bytes, capsys, *args):
    import io

    from graphgen.apps.chat import main

    llm = LLM(str(ckpt), ["model.dtype=float32", "report.progress=false"])
    out = io.StringIO()
    rc = main(["--max-new-tokens", "4", "--temperature", "0", "--system", "Hi.\n", *args], llm=llm,
              stdin=io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"), stdout=out)
    return rc, out.getvalue(), capsys.readouterr().err


def test_chat_app_drops_the_oldest_turns_when_the_context_is_full(chat_ckpt, capsys):
    turns = [f"turn {i}: " + "tell me more about this " * 2 for i in range(12)]
    rc, out, err = run_app(chat_ckpt, "".join(t + "\n" for t in turns).encode(), capsys, "--max-context", "128")
    assert rc == 0 and out.count("Assistant:") == 12  # every turn answered
    assert "context full: dropped the" in err


def test_chat_app_refuses_a_turn_too_long_for_the_context_visibly(chat_ckpt, capsys):
    rc, out, err = run_app(chat_ckpt, ("x" * 200 + "\nshort one\n").encode(), capsys, "--max-context", "64")
    assert rc == 0 and out.count("Assistant:") == 1 and "[turn not answered: this turn needs" in err


def test_chat_app_survives_bytes_that_are_not_utf8(chat_ckpt, capsys):
    rc, out, err = run_app(chat_ckpt, b"Hello \xff\xfe there\nAgain\n", capsys)
    assert rc == 0 and out.count("Assistant:") == 2 and "not UTF-8" in err


def test_chat_app_on_the_default_model_uses_its_template(smollm2):
    """Turns are written by the tokenizer's chat template and each reply stops at <|im_end|>; the
    second turn extends the first turn's cache (the context grows, nothing is re-encoded)."""
    import io

    from graphgen.apps.chat import Chat, main, parse_args

    chat = Chat(smollm2, parse_args(["--temperature", "0", "--max-new-tokens", "12"]))
    try:
        assert chat.templated
        assert "Paris" in chat.reply("What is the capital of France?")
        first = chat.session.context_len
        assert chat.session.pending == []  # the reply ended at its end-of-turn token, inside the budget
        chat.reply("Thanks!")
        assert chat.session.context_len > first and chat.cached.startswith("<|im_start|>system")
    finally:
        chat.close()
    out = io.StringIO()
    assert main(["--temperature", "0", "--max-new-tokens", "8"], llm=smollm2,
                stdin=io.StringIO("What is the capital of France?\n"), stdout=out) == 0
    assert "Assistant: " in out.getvalue() and "Paris" in out.getvalue()


def test_chat_app_names_a_missing_model(tmp_path, capsys):
    from graphgen.apps.chat import main

    assert main(["--model", str(tmp_path / "nowhere")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
