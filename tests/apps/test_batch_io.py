"""Fuzzing the batch job's file handling (graphgen/apps/batch_io.py): random bytes and random JSON
in the prompts file, random bytes in the results file. Every outcome is a result, a bad line or a
clear refusal, never a traceback; a refused results file is left exactly as it was."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import given, settings, strategies as st

from graphgen.apps.batch import run_batch
from graphgen.apps.batch_io import BadInputError, GenSettings, JobRefused, read_input, repair_output, validate

from ..fake_llm import FakeLLM

LLM = FakeLLM(block_size=4)
DEFAULTS = GenSettings(4, False, 1.0, 0, 1.0)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=10)
FIELDS = st.fixed_dictionaries({}, optional={"id": JSON, "prompt": JSON, "max_new_tokens": JSON,
                                             "temperature": JSON, "stop": JSON})


def check_reader(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"in{suffix}"
        path.write_bytes(data)
        records, bad = read_input(path)
        requests, bad2 = validate(records, LLM.tokenizer, DEFAULTS, (), LLM.spec.max_positions)
    assert len(requests) + len({b.line for b in bad + bad2}) <= max(1, data.count(b"\n") + 1)
    assert all(isinstance(b.error, str) and b.error for b in bad + bad2)
    assert all(isinstance(r.prompt, str) and r.ids for r in requests)


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".txt", ""]))
def test_random_bytes_in_the_prompts_file(data, suffix):
    check_reader(data, suffix)


@settings(max_examples=100, deadline=None, database=None)
@given(lines=st.lists(JSON | FIELDS, max_size=6))
def test_random_json_in_the_prompts_file(lines):
    check_reader("".join(json.dumps(x) + "\n" for x in lines).encode(), ".jsonl")


@settings(max_examples=25, deadline=None, database=None)
@given(lines=st.lists(FIELDS | st.fixed_dictionaries({"id": st.integers(0, 5), "prompt": st.text(max_size=30)}),
                      max_size=6))
def test_random_jobs_end_in_results_or_a_clear_refusal(lines):
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "in.jsonl", Path(d) / "out.jsonl"
        inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
        try:
            s = run_batch(LLM, inp, out, max_new_tokens=3, progress=False)
        except BadInputError as e:
            assert "nothing was generated" in str(e) or "has no prompts" in str(e)
            assert not out.exists()
            return
        assert s.generated == s.total >= 1
        # JSON lines end in \n only: a prompt may hold other line breaks (U+0085, U+2028) raw
        assert out.read_text(encoding="utf-8").count("\n") == s.total


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.binary(max_size=200) | st.lists(st.sampled_from([
    b'{"id": 1, "prompt": "p", "completion": "c", "finish_reason": "eos"}\n', b'{"id": 2, "pro', b"\0\0\0",
    b"\n", b"notes", b'{"id": 3}\n']), max_size=5).map(b"".join))
def test_random_results_files_are_resumed_or_refused_untouched(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "out.jsonl"
        path.write_bytes(data)
        try:
            done, dropped = repair_output(path)
        except JobRefused as e:
            assert "not a graphgen result file" in str(e) and path.read_bytes() == data
            return
        kept = path.read_bytes()
        assert data.startswith(kept) and len(data) - len(kept) == dropped
        assert dropped == 0 or b"\n" not in data[len(kept):].rstrip(b"\n")  # at most one record cut
        assert len(done) <= kept.count(b"\n")
