"""The main job's prompts (graphgen/run.py): from workload.prompts_file, refused clearly when unusable."""
from __future__ import annotations

import pytest

from graphgen.config import compose
from graphgen.run import workload_prompts

from .fake_llm import FakeLLM


@pytest.mark.parametrize("data,match", [(b"", "has no prompts"), (b"\n  \n", "has no prompts"),
                                        (b"ok\n\xff\xfe\n", "is not UTF-8 text")])
def test_an_unusable_prompts_file_is_refused(tmp_path, data, match):
    f = tmp_path / "p.txt"
    f.write_bytes(data)
    with pytest.raises(ValueError, match=f"workload.prompts_file={f} {match}"):
        workload_prompts(compose([f"workload.prompts_file={f}"]), FakeLLM())


def test_prompts_file_with_bom_and_crlf(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(b"\xef\xbb\xbfhello\r\nworld\r\n")
    ids, mask, texts = workload_prompts(compose([f"workload.prompts_file={f}", "workload.num_prompts=2"]), FakeLLM())
    assert texts == ["hello", "world"]
    tok = FakeLLM().tokenizer
    assert [tok.decode(r[m.bool()]) for r, m in zip(ids, mask)] == ["hello", "world"]


def test_builtin_prompts_go_as_chat_turns(smollm2):
    """workload.prompts with a chat-template tokenizer: each prompt is a user turn, left-padded."""
    cfg = compose(["workload.num_prompts=2"])
    ids, mask, texts = workload_prompts(cfg, smollm2)
    assert texts == list(cfg.workload.prompts[:2])
    first = smollm2.tokenizer.decode(ids[0][mask[0].bool()])
    assert first.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_synthetic_prompts_without_a_tokenizer():
    llm = FakeLLM()
    llm.tokenizer, llm.spec.vocab_size = None, 96
    ids, mask, texts = workload_prompts(compose(["model=opt-125m", "workload.num_prompts=3"]), llm)
    assert ids.shape == (3, 32) and texts is None and bool(mask.all())
