"""The completion example app on the fake LLM (the real engine is covered in test_batch)."""
from graphgen.apps.completion import PROMPTS, main
from tests.fake_llm import FakeLLM


def test_completion_app_prints_completions_cut_at_newline(capsys):
    llm = FakeLLM({PROMPTS[0]: " The Nile\nQuestion: next", PROMPTS[1]: " PHX, LAS</s>"})
    out = main([], llm=llm)
    assert [c.text for c in out] == [" The Nile", " PHX, LAS"]
    assert [c.finish_reason for c in out] == ["stop", "eos"]
    assert llm.calls[0]["do_sample"] and llm.calls[0]["temperature"] == 0.7
    printed = capsys.readouterr().out
    assert "The Nile" in printed and "2 completions" in printed


def test_completion_app_options_and_greedy():
    llm = FakeLLM({"Hi": " there. More"})
    out = main(["--prompt", "Hi", "--stop", ".", "--temperature", "0", "--max-new-tokens", "8"], llm=llm)
    assert out[0].text == " there" and not llm.calls[0]["do_sample"]


def test_completion_app_without_tokenizer_shows_token_ids(capsys):
    llm = FakeLLM()
    llm.tokenizer = None
    llm.spec.vocab_size = 259
    llm.generate = lambda ids, **kw: __import__("torch").cat([ids, ids[:, :2]], 1)
    assert main(["--max-new-tokens", "2"], llm=llm) == []
    assert "no tokenizer" in capsys.readouterr().err


def test_completion_app_names_a_missing_model(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="completion: LLM.*no such checkpoint directory"):
        main(["--model", str(tmp_path / "nowhere")])
