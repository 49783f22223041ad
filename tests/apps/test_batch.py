"""The batch job: validation, bucketing, durable append, resume (torn lines, a real SIGKILL)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.fake_llm import FakeLLM  # noqa: E402

from graphgen.apps.batch import (BadInputError, lock_output, main, plan_blocks, repair_output,  # noqa: E402
                                 run_batch)
from graphgen.apps.job_config import JobConfig, resolve_job  # noqa: E402

from .jsonl import read_jsonl, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent


def ids_of(path):
    return sorted(str(r["id"]) for r in read_jsonl(path))


def test_end_to_end_jsonl_with_eos_stop_and_length(tmp_path):
    llm = FakeLLM({"Q: capital of France?\nA:": " Paris\n\nQ: next", "Say hi": " hi</s>", "Count": " 1 2 3 4 5"})
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "fr", "prompt": "Q: capital of France?\nA:"},
        {"id": 2, "prompt": "Say hi"},
        {"id": "c", "prompt": "Count", "max_new_tokens": 4, "stop": []},
    ])
    s = run_batch(llm, inp, tmp_path / "out.jsonl", max_new_tokens=16, stop=["\n\nQ:"], progress=False)
    out = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert s.generated == 3 and s.total == 3
    assert out["fr"]["completion"] == " Paris" and out["fr"]["finish_reason"] == "stop"
    assert out["fr"]["completion_tokens"] == len(" Paris\n\nQ:")
    assert out[2]["completion"] == " hi" and out[2]["finish_reason"] == "eos"
    assert out["c"]["completion"] == " 1 2" and out["c"]["finish_reason"] == "length"
    assert out["c"]["prompt_tokens"] == len("Count") and out["c"]["completion_tokens"] == 4
    assert set(out["fr"]) == {"id", "prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()


BAD_INPUT = [
    {"id": 1, "prompt": "good one"},
    '{"id": 2, "prompt": "unterminated',          # line 2: invalid JSON
    {"id": 3},                                    # line 3: missing prompt
    {"id": 4, "prompt": "   "},                   # line 4: empty prompt
    {"id": 5, "prompt": "x" * 300},               # line 5: too long for the context (256)
    {"id": 1, "prompt": "duplicate id"},          # line 6: duplicate of line 1
    {"id": 7, "prompt": "ok", "max_new_tokens": 0},  # line 7: bad field
    {"id": 8, "prompt": "also good"},
]


def test_bad_lines_are_reported_with_line_numbers_and_skipped(tmp_path):
    llm = FakeLLM()
    inp = write_jsonl(tmp_path / "in.jsonl", BAD_INPUT)
    s = run_batch(llm, inp, tmp_path / "out.jsonl", max_new_tokens=8, progress=False)
    errors = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [e["line"] for e in errors] == [2, 3, 4, 5, 6, 7]
    msgs = [e["error"] for e in errors]
    assert "invalid JSON" in msgs[0] and "missing field(s): prompt" in msgs[1] and msgs[2] == "empty prompt"
    assert "prompt too long: 300 tokens + max_new_tokens 8 > the model's context of 256" in msgs[3]
    assert "duplicate id 1 (first on line 1)" in msgs[4] and "max_new_tokens" in msgs[5]
    assert ids_of(tmp_path / "out.jsonl") == ["1", "8"] and len(s.bad_lines) == 6


def test_on_bad_input_stop_generates_nothing(tmp_path):
    llm = FakeLLM()
    inp = write_jsonl(tmp_path / "in.jsonl", BAD_INPUT)
    with pytest.raises(BadInputError, match=r"(?s)6 bad input line\(s\).*line 2: invalid JSON.*on_bad_input=skip"):
        run_batch(llm, inp, tmp_path / "out.jsonl", max_new_tokens=8, on_bad_input="stop", progress=False)
    assert llm.calls == [] and not (tmp_path / "out.jsonl").exists()
    assert len(read_jsonl(tmp_path / "out.jsonl.errors.jsonl")) == 6


def test_cli_entry_stops_with_a_message_not_a_traceback(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", BAD_INPUT)
    job = JobConfig(name="batch", input=str(inp), output=str(tmp_path / "o.jsonl"), on_bad_input="stop")
    with pytest.raises(SystemExit, match="line 3: missing field"):
        main(job, FakeLLM())


def test_text_input_ids_are_line_numbers(tmp_path):
    inp = tmp_path / "prompts.txt"
    inp.write_text("first prompt\n\nthird prompt\r\n")
    run_batch(FakeLLM(), inp, tmp_path / "out.jsonl", max_new_tokens=4, progress=False)
    out = {r["id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert sorted(out) == [1, 3] and out[3]["prompt"] == "third prompt"
    assert read_jsonl(tmp_path / "out.jsonl.errors.jsonl")[0] == {"line": 2, "id": 2, "error": "empty prompt",
                                                                "input": ""}


def test_bucketing_by_length_and_settings(tmp_path):
    lengths = [3, 40, 5, 38, 4, 39, 6, 41]  # interleaved short and long prompts
    recs = [{"id": i, "prompt": "p" * n} for i, n in enumerate(lengths)]
    recs.append({"id": "hot", "prompt": "p" * 40, "temperature": 0.8})  # other settings: own block
    llm = FakeLLM(block_size=4)
    run_batch(llm, write_jsonl(tmp_path / "in.jsonl", recs), tmp_path / "out.jsonl", max_new_tokens=2,
              progress=False)
    reals = [sorted(c["real"]) for c in llm.calls]
    assert reals == [[38, 39, 40, 41], [3, 4, 5, 6], [40]]  # longest first, no long+short mix
    padded = sum(c["shape"][0] * c["shape"][1] for c in llm.calls)
    assert padded == 4 * 41 + 4 * 6 + 40  # vs 8 * 41 in arrival order
    assert [c["do_sample"] for c in llm.calls] == [False, False, True]
    assert ids_of(tmp_path / "out.jsonl") == sorted(str(i) for i in [*range(8), "hot"])


def test_plan_blocks_keeps_input_order_among_equal_lengths():
    from graphgen.apps.batch import GenSettings, Request
    g = GenSettings(4, False, 1.0, 0, 1.0)
    reqs = [Request(n, n, "x", [0] * 5, g) for n in range(1, 6)]
    assert [[r.line for r in b] for b in plan_blocks(reqs, 2)] == [[1, 2], [3, 4], [5]]


def test_resume_repairs_torn_line_and_skips_done_ids(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"prompt {i}"} for i in range(6)])
    out = tmp_path / "out.jsonl"
    run_batch(FakeLLM(block_size=2), inp, out, max_new_tokens=4, progress=False)
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:11])  # 3 whole lines + a torn one
    llm = FakeLLM(block_size=2)
    s = run_batch(llm, inp, out, max_new_tokens=4, progress=False)
    assert s.already_done == 3 and s.generated == 3 and s.repaired_bytes == 11
    assert sum(c["shape"][0] for c in llm.calls) == 3
    assert ids_of(out) == [str(i) for i in range(6)]
    s = run_batch(FakeLLM(), inp, out, max_new_tokens=4, progress=False)  # all done: nothing to do
    assert s.generated == 0 and ids_of(out) == [str(i) for i in range(6)]


def result(i):
    return json.dumps({"id": i, "prompt": "p", "completion": "c", "prompt_tokens": 1, "completion_tokens": 1,
                       "finish_reason": "length"}).encode() + b"\n"


def test_one_torn_last_record_is_dropped_but_garbled_middle_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(result(1) + b"\x00\x00\x00\x00\n")  # a zero-filled last record (crash mid-write)
    assert repair_output(out) == ({"1"}, 5) and out.read_bytes() == result(1)
    out.write_bytes(b'{"id": 7, "prom')  # killed during the very first write
    assert repair_output(out) == (set(), 15) and out.read_bytes() == b""
    assert repair_output(out) == (set(), 0)
    for bad in (result(1) + b"not json\n" + result(2), result(1) + b'{"id": 2, "pr\n{"id": 3, "pro'):
        out.write_bytes(bad)  # a garbled line before the last record: not cut, refused
        with pytest.raises(ValueError, match="line 2 is not a result line"):
            repair_output(out)
        assert out.read_bytes() == bad


@pytest.mark.parametrize("text", [b"my notes\nthe last line", b"my notes\n", b'{"id": 1}\n',
                                  b'{"other": "tool"}\n{"id": 4', b"\n\n"])
def test_resume_touches_only_a_graphgen_result_file(tmp_path, text):
    out = tmp_path / "notes.txt"
    out.write_bytes(text)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}])
    with pytest.raises(ValueError, match="not a graphgen result file"):
        run_batch(FakeLLM(), inp, out, max_new_tokens=2, progress=False)
    assert out.read_bytes() == text and not (tmp_path / "notes.txt.errors.jsonl").exists()


def test_output_that_is_the_input_is_refused(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}])
    before = inp.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(inp)
    for out in (inp, tmp_path / "." / "in.jsonl", tmp_path / "link.jsonl"):
        with pytest.raises(ValueError, match="is the input file"):
            run_batch(FakeLLM(), inp, out, max_new_tokens=2, progress=False)
    assert inp.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["in.jsonl", "link.jsonl"]


def test_output_that_is_a_directory_is_refused_and_leaves_nothing(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, '{"bad'])
    (tmp_path / "outdir").mkdir()
    with pytest.raises(ValueError, match="job.output=.*is a directory"):
        run_batch(FakeLLM(), inp, tmp_path / "outdir", max_new_tokens=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "outdir"] and os.listdir(tmp_path / "outdir") == []


def test_a_refused_second_job_leaves_the_running_jobs_files_alone(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, '{"bad'])
    out = tmp_path / "out.jsonl"
    errors = tmp_path / "out.jsonl.errors.jsonl"
    run_batch(FakeLLM(), inp, out, max_new_tokens=2, progress=False)
    before = errors.read_bytes()
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"id": 1, "prompt": "a"}])
    with open(out, "ab") as running:
        lock_output(running)
        with pytest.raises(ValueError, match="being written by another running job"):
            run_batch(FakeLLM(), clean, out, max_new_tokens=2, progress=False)
        job = JobConfig(name="batch", input=str(clean), output=str(out), progress=False)
        with pytest.raises(SystemExit, match="another running job"):  # the CLI: a message, no traceback
            main(job, FakeLLM())
    assert errors.read_bytes() == before


def test_utf8_bom_is_not_a_bad_first_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": 1, "prompt": "a"}).encode() + b"\n")
    txt = tmp_path / "in.txt"
    txt.write_bytes(b"\xef\xbb\xbfhello\n")
    s = run_batch(FakeLLM(), inp, tmp_path / "out.jsonl", max_new_tokens=2, progress=False)
    assert s.generated == 1 and not s.bad_lines
    run_batch(FakeLLM(), txt, tmp_path / "out2.jsonl", max_new_tokens=2, progress=False)
    assert read_jsonl(tmp_path / "out2.jsonl")[0]["prompt"] == "hello"


def test_a_job_whose_every_line_was_rejected_fails(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", ['{"bad', {"id": 2}])
    job = JobConfig(name="batch", input=str(inp), output=str(tmp_path / "o.jsonl"), progress=False)
    with pytest.raises(SystemExit, match=r"(?s)no prompt of .* could run.*line 1: invalid JSON") as e:
        main(job, FakeLLM())
    assert e.value.code not in (0, None)
    assert not (tmp_path / "o.jsonl").exists() and len(read_jsonl(tmp_path / "o.jsonl.errors.jsonl")) == 2


def test_second_writer_on_the_same_output_is_refused(tmp_path):
    p = tmp_path / "out.jsonl"
    with open(p, "ab") as a, open(p, "ab") as b:
        lock_output(a)
        with pytest.raises(ValueError, match="another running job"):
            lock_output(b)


def test_logprobs_per_completion_token(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a", "stop": "\n"}])
    llm = FakeLLM({"a": "xy\nz"})
    run_batch(llm, inp, tmp_path / "out.jsonl", max_new_tokens=6, logprobs=True, progress=False)
    r = read_jsonl(tmp_path / "out.jsonl")[0]
    assert r["logprobs"] == {"tokens": ["x", "y", "\n"], "token_logprobs": [-0.5, -1.0, -1.5]}


def test_main_fills_settings_from_workload(tmp_path):
    from graphgen.config import WorkloadConfig
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "abc"}])
    job = JobConfig(name="batch", input=str(inp), output=str(tmp_path / "o.jsonl"), progress=False)
    llm = FakeLLM()
    main(job, llm, WorkloadConfig(gen_len=5, do_sample=True, temperature=0.5), seed=3)
    assert llm.calls[0]["max_new_tokens"] == 5 and llm.calls[0]["do_sample"] and llm.calls[0]["seed"] is not None
    with pytest.raises(ValueError, match="job.input=PATH"):
        resolve_job(JobConfig(name="batch"))


KILL_SCRIPT = """
import sys
sys.path[:0] = [{root!r}]
from tests.fake_llm import FakeLLM
from graphgen.apps.batch import run_batch
run_batch(FakeLLM(delay=0.15, block_size=3), sys.argv[1], sys.argv[2], max_new_tokens=5, progress=False)
"""


def wait_for_lines(path, n, proc, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    raise TimeoutError(f"{path} never reached {n} lines")


def test_sigkill_mid_run_then_rerun_writes_every_id_once(tmp_path):
    n = 30
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"prompt number {i}" + "!" * (i % 7)}
                                              for i in range(n)])
    out = tmp_path / "out.jsonl"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(root=str(ROOT))))
    for kill_after in (3, 12):  # two crashes at different points, each while blocks are in flight
        proc = subprocess.Popen([sys.executable, str(script), str(inp), str(out)], stderr=subprocess.PIPE,
                                text=True)
        wait_for_lines(out, kill_after, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        partial = read_jsonl(out)  # every line on disk is whole JSON
        assert len(partial) < n and len({r["id"] for r in partial}) == len(partial)
    s = run_batch(FakeLLM(block_size=3), inp, out, max_new_tokens=5, progress=False)
    assert s.already_done + s.generated == n and s.already_done >= 12
    assert ids_of(out) == sorted(f"q{i}" for i in range(n))  # each id exactly once


def test_job_yaml_files_fit_the_schema_and_unescape_stop():
    from omegaconf import OmegaConf
    for name in ("batch", "generate"):
        cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), OmegaConf.load(ROOT / "conf" / "job" / f"{name}.yaml"))
        assert OmegaConf.to_object(cfg).name == name
    j = resolve_job(JobConfig(name="batch", input="a", output="b", stop=[r"\n\nQ:", "."]))
    assert j.stop == ["\n\nQ:", "."] and j.max_new_tokens == 32
    with pytest.raises(ValueError, match="on_bad_input"):
        resolve_job(JobConfig(on_bad_input="ignore"))


# --- the real engine on a tiny random OPT checkpoint, transformers as the oracle ------------------

@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    from tests.fake_llm import make_opt_checkpoint
    return make_opt_checkpoint(tmp_path_factory.mktemp("tiny-opt"), max_positions=64)


def real_llm(path, *overrides):
    LLM = pytest.importorskip("graphgen").LLM
    return LLM(str(path), overrides=["model.dtype=float32", *overrides])


def test_real_engine_matches_transformers_through_the_batch_job(tiny_opt, tmp_path):
    from tests.fake_llm import HFLLM
    recs = [{"id": i, "prompt": "hello " * (i % 4 + 1) + str(i)} for i in range(9)]
    recs += [{"id": "long", "prompt": "x" * 60}, {"id": "short", "prompt": "hi", "max_new_tokens": 3}]
    inp = write_jsonl(tmp_path / "in.jsonl", recs)
    kw = dict(max_new_tokens=6, stop=["00"], progress=False)
    s = run_batch(real_llm(tiny_opt, "schedule=zigzag"), inp, tmp_path / "gg.jsonl", **kw)
    run_batch(HFLLM(tiny_opt), inp, tmp_path / "hf.jsonl", **kw)
    assert s.generated == 10 and [b.id for b in s.bad_lines] == ["long"]  # 60 + 6 > 64 positions
    by_id = lambda p: {r["id"]: r for r in read_jsonl(p)}  # noqa: E731
    assert by_id(tmp_path / "gg.jsonl") == by_id(tmp_path / "hf.jsonl")


def test_real_engine_sampling_is_reproducible_with_a_seed(tiny_opt, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"prompt {i}"} for i in range(5)])
    llm = real_llm(tiny_opt, "schedule=row")
    kw = dict(max_new_tokens=5, do_sample=True, temperature=0.9, top_p=0.9, seed=7, progress=False)
    run_batch(llm, inp, tmp_path / "a.jsonl", **kw)
    run_batch(llm, inp, tmp_path / "b.jsonl", **kw)
    assert read_jsonl(tmp_path / "a.jsonl") == read_jsonl(tmp_path / "b.jsonl")


REAL_KILL_SCRIPT = """
import sys
sys.path[:0] = [{root!r}]
from graphgen import LLM
from graphgen.apps.batch import run_batch
llm = LLM(sys.argv[3], overrides=["model.dtype=float32", "policy.gpu_batch_size=2", "policy.num_gpu_batches=1"])
run_batch(llm, sys.argv[1], sys.argv[2], max_new_tokens=8, progress=False)
"""


def test_real_engine_sigkill_then_rerun(tiny_opt, tmp_path):
    pytest.importorskip("graphgen").LLM
    n = 60
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "word " * (i % 9 + 1)} for i in range(n)])
    out = tmp_path / "out.jsonl"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(REAL_KILL_SCRIPT.format(root=str(ROOT))))
    proc = subprocess.Popen([sys.executable, str(script), str(inp), str(out), str(tiny_opt)],
                            stderr=subprocess.PIPE, text=True)
    wait_for_lines(out, 6, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(read_jsonl(out))
    assert 6 <= done_before < n, "the job finished before it could be killed: give it more prompts"
    s = run_batch(real_llm(tiny_opt, "policy.gpu_batch_size=2", "policy.num_gpu_batches=1"), inp, out,
                  max_new_tokens=8, progress=False)
    assert s.already_done == done_before and s.generated == n - done_before
    assert ids_of(out) == sorted(str(i) for i in range(n))


def test_messages_lines_use_the_chat_template_and_stop_at_end_of_turn(smollm2, tmp_path):
    """A `messages` line is written by the tokenizer's template; the reply ends at <|im_end|>
    (finish_reason eos) and the output line echoes the messages; bad messages are bad lines."""
    from graphgen.apps.batch import run_batch

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    write_jsonl(inp, [{"id": "chat", "messages": chat}, {"id": "plain", "prompt": "The capital of France is"},
                      {"id": "bad", "messages": [{"role": "user"}]},
                      {"id": "both", "prompt": "x", "messages": chat}])
    s = run_batch(smollm2, inp, out, max_new_tokens=12, progress=False)
    lines = {r["id"]: r for r in read_jsonl(out)}
    assert set(lines) == {"chat", "plain"} and len(s.bad_lines) == 2
    assert lines["chat"]["messages"] == chat and "prompt" not in lines["chat"]
    assert "Paris" in lines["chat"]["completion"] and lines["chat"]["finish_reason"] == "eos"
    errors = (tmp_path / "out.jsonl.errors.jsonl").read_text()
    assert "messages[0]" in errors and "not both" in errors
