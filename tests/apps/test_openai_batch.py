"""OpenAI batch files in the batch job: detection, response bodies the openai package parses,
per-line errors in the OpenAI shape, resume with every custom_id exactly once."""
import json

from openai.types import BatchError, Completion
from openai.types.chat import ChatCompletion

from tests.fake_llm import FakeLLM

from graphgen.apps.batch import run_batch
from graphgen.apps.batch_io import detect_format
from graphgen.apps.openai_batch import CHAT, COMPLETIONS

from .jsonl import read_jsonl, write_jsonl

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def chat_llm(script=None):
    llm = FakeLLM(script)
    llm.tokenizer.chat_template = TEMPLATE
    return llm


def req(cid, url=CHAT, **body):
    if url == CHAT and "messages" not in body:
        body["messages"] = [{"role": "user", "content": cid}]
    if url == COMPLETIONS and "prompt" not in body:
        body["prompt"] = cid
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "m", **body}}


def test_chat_and_completion_bodies_parse_with_the_openai_package(tmp_path):
    llm = chat_llm({"<user>hi\n<assistant>": " hello</s>", "Count": " 1 2 3 4 5"})
    inp = write_jsonl(tmp_path / "batch.jsonl", [
        req("c1", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=8),
        req("p1", COMPLETIONS, prompt="Count", max_tokens=8, stop=["3"]),
        req("p2", COMPLETIONS, prompt=["Count"], max_tokens=3, logprobs=0),
        req("c2", messages=[{"role": "user", "content": "hi"}], logprobs=True, max_tokens=8),
    ])
    s = run_batch(llm, inp, tmp_path / "out.jsonl", max_new_tokens=16, progress=False)
    assert s.generated == 4 and not s.bad_lines
    out = {r["custom_id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    assert set(out["c1"]) == {"id", "custom_id", "response", "error"} and out["c1"]["error"] is None
    assert out["c1"]["response"]["status_code"] == 200 and out["c1"]["response"]["request_id"]
    chat = ChatCompletion.model_validate(out["c1"]["response"]["body"])
    assert chat.choices[0].message.content == " hello" and chat.choices[0].finish_reason == "stop"
    assert chat.usage.prompt_tokens == len("<user>hi\n<assistant>")
    assert chat.usage.completion_tokens == len(" hello") + 1  # and eos
    assert chat.choices[0].logprobs is None
    cmp = Completion.model_validate(out["p1"]["response"]["body"])
    assert cmp.choices[0].text == " 1 2 " and cmp.choices[0].finish_reason == "stop"
    cmp2 = Completion.model_validate(out["p2"]["response"]["body"])
    assert cmp2.choices[0].text == " 1 " and cmp2.choices[0].finish_reason == "length"
    assert cmp2.choices[0].logprobs.tokens == [" ", "1", " "]
    assert cmp2.choices[0].logprobs.token_logprobs == [-0.5, -1.0, -1.5]
    assert cmp2.choices[0].logprobs.text_offset == [0, 1, 2]
    lp = ChatCompletion.model_validate(out["c2"]["response"]["body"]).choices[0].logprobs.content
    assert [x.token for x in lp][:3] == [" ", "h", "e"] and lp[0].logprob == -0.5


def test_format_is_detected_from_the_file(tmp_path):
    lines = [json.dumps(req("a")).encode()]
    assert detect_format(tmp_path / "x.jsonl", lines) == "openai"
    assert detect_format(tmp_path / "x", lines) == "openai"
    assert detect_format(tmp_path / "x.jsonl", [b'{"id": 1, "prompt": "p"}']) == "jsonl"
    assert detect_format(tmp_path / "x.txt", lines) == "text"  # a .txt file is prompts, whatever they say


BAD = [
    req("ok", COMPLETIONS, prompt="fine"),
    req("url", url="/v1/embeddings"),
    req("fields", COMPLETIONS, frequency_penalty=0.5, logit_bias={}),
    req("n", n=2),
    '{"custom_id": "broken", ',
    req("ok", COMPLETIONS, prompt="duplicate"),
    req("many", COMPLETIONS, prompt=["a", "b"]),
    req("top", logprobs=True, top_logprobs=3),
    req("empty", COMPLETIONS, prompt=""),
]


def test_bad_lines_become_openai_error_lines_and_the_rest_runs(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", BAD)
    s = run_batch(chat_llm(), inp, tmp_path / "out.jsonl", max_new_tokens=4, progress=False)
    assert s.generated == 1 and [r["custom_id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["ok"]
    errs = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [e["error"]["line"] for e in errs] == [2, 3, 4, 5, 6, 7, 8, 9]
    for e in errs:
        assert set(e) == {"id", "custom_id", "response", "error"} and e["response"] is None
        BatchError.model_validate(e["error"])
    by = {e["error"]["line"]: e for e in errs}
    assert "url \"/v1/embeddings\" is not supported" in by[2]["error"]["message"]
    assert "frequency_penalty, logit_bias" in by[3]["error"]["message"] and by[3]["custom_id"] == "fields"
    assert "n=2 is not supported" in by[4]["error"]["message"]
    assert by[5]["custom_id"] is None and "invalid JSON" in by[5]["error"]["message"]
    assert "duplicate id" in by[6]["error"]["message"]
    assert "list of 2 items" in by[7]["error"]["message"]
    assert "top_logprobs" in by[8]["error"]["message"]
    assert "empty prompt" in by[9]["error"]["message"]


def test_chat_without_a_template_is_a_line_error(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [req("c"), req("p", COMPLETIONS)])
    s = run_batch(FakeLLM(), inp, tmp_path / "out.jsonl", max_new_tokens=2, progress=False)
    assert s.generated == 1
    err = read_jsonl(tmp_path / "out.jsonl.errors.jsonl")[0]["error"]
    assert err["line"] == 1 and "chat template" in err["message"] and "/v1/completions" in err["message"]


def test_resume_writes_every_custom_id_once(tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [req(f"r{i}", COMPLETIONS, prompt="p" * (i + 1)) for i in range(10)])
    out = tmp_path / "out.jsonl"
    run_batch(chat_llm(), inp, out, max_new_tokens=2, progress=False, block_size=4)
    lines = out.read_bytes().split(b"\n")
    out.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:10])  # 3 whole lines and a torn one
    s = run_batch(chat_llm(), inp, out, max_new_tokens=2, progress=False, block_size=4)
    assert s.already_done == 3 and s.generated == 7 and s.repaired_bytes == 10
    assert sorted(r["custom_id"] for r in read_jsonl(out)) == sorted(f"r{i}" for i in range(10))


def test_request_settings_reach_generate(tmp_path):
    llm = chat_llm()
    inp = write_jsonl(tmp_path / "in.jsonl", [req("s", COMPLETIONS, temperature=0.7, top_p=0.9, seed=123, max_tokens=3),
                                       req("g", COMPLETIONS, temperature=0, max_tokens=5)])
    run_batch(llm, inp, tmp_path / "out.jsonl", max_new_tokens=16, progress=False)
    calls = {c["max_new_tokens"]: c for c in llm.calls}
    assert calls[3]["do_sample"] and calls[3]["temperature"] == 0.7 and calls[3]["seed"] == [123]
    assert not calls[5]["do_sample"]
