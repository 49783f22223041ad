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
    ids, mask = workload_prompts(compose([f"workload.prompts_file={f}", "workload.num_prompts=2"]), FakeLLM())
    tok = FakeLLM().tokenizer
    assert [tok.decode(r[m.bool()]) for r, m in zip(ids, mask)] == ["hello", "world"]
