"""OpenAI batch files (the format of OpenAI's Batch API and vLLM's `run-batch`) in the batch job.

Input line:  {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
              "body": {"model", "messages" | "prompt", "max_tokens", "temperature", ...}}
Output line: {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <ChatCompletion |
              Completion>}, "error": null}
Error line:  {"id", "custom_id", "response": null, "error": {"code", "message", "param", "line"}}
             (the shape of the openai package's BatchError), in <output>.errors.jsonl.

A request line becomes a plain batch record ({"id", "prompt" | "messages", ...}) that the
batch job validates and runs like any other; its result line is then dressed as the response.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Dict, Optional, Tuple

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
URLS = (CHAT, COMPLETIONS)
# body fields graphgen runs; n / stream / top_logprobs only at the values that ask for nothing more
COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "n", "stream", "user"}
SUPPORTED = {CHAT: COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
             COMPLETIONS: COMMON | {"prompt", "echo"}}
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # graphgen's reasons -> OpenAI's


def is_openai_request(rec: Any) -> bool:
    """An OpenAI batch request line (what format detection looks for on the first line)."""
    return isinstance(rec, dict) and "custom_id" in rec and ("body" in rec or "url" in rec)


def to_record(rec: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """A request line -> (plain batch record, None) or (None, what is wrong with it)."""
    if not isinstance(rec, dict):
        return None, f"expected a JSON object with custom_id, method, url and body, got {type(rec).__name__}"
    missing = [k for k in ("custom_id", "url", "body") if k not in rec]
    if missing:
        return None, f"missing field(s): {', '.join(missing)}"
    cid, url, body = rec["custom_id"], rec["url"], rec["body"]
    if not isinstance(cid, str) or not cid:
        return None, f"custom_id must be a non-empty string, got {json.dumps(cid)}"
    if rec.get("method", "POST") != "POST":
        return None, f"method {json.dumps(rec['method'])} is not supported: use \"POST\""
    if url not in URLS:
        return None, f"url {json.dumps(url)} is not supported: use {CHAT} or {COMPLETIONS}"
    if not isinstance(body, dict):
        return None, f"body must be a JSON object, got {type(body).__name__}"
    extra = sorted(set(body) - SUPPORTED[url])
    if extra:
        return None, (f"unsupported body field(s) for {url}: {', '.join(extra)} "
                      f"(supported: {', '.join(sorted(SUPPORTED[url]))})")
    err = _check_unsupported_values(url, body)
    if err:
        return None, err
    err = _check_prompt(url, body)
    if err:
        return None, err
    out: Dict[str, Any] = {"id": cid, "openai": {"url": url, "model": body.get("model")}}
    if url == CHAT:
        out["messages"] = body["messages"]
    else:
        p = body["prompt"]
        out["prompt"] = p[0] if isinstance(p, list) else p  # a list of one prompt is that prompt
    m = body.get("max_completion_tokens", body.get("max_tokens"))
    for key, value in (("max_new_tokens", m), ("temperature", body.get("temperature")),
                       ("top_p", body.get("top_p")), ("seed", body.get("seed")), ("stop", body.get("stop"))):
        if value is not None:
            out[key] = value
    out["logprobs"] = body.get("logprobs") is not None and body.get("logprobs") is not False
    return out, None


def _check_unsupported_values(url: str, body: Dict[str, Any]) -> Optional[str]:
    n = body.get("n")
    if n is not None and n != 1:
        return f"n={json.dumps(n)} is not supported: graphgen returns one choice per request; send n copies"
    if body.get("stream"):
        return "stream=true is not supported in a batch file: remove it"
    if body.get("echo"):
        return "echo=true is not supported: remove it"
    top = body.get("top_logprobs")
    if top:
        return f"top_logprobs={json.dumps(top)} is not supported: only the chosen tokens' logprobs (logprobs=true)"
    lp = body.get("logprobs")
    if url == COMPLETIONS and lp is not None and (isinstance(lp, bool) or lp != 0):
        return (f"logprobs={json.dumps(lp)} is not supported: graphgen returns the chosen tokens' logprobs "
                "(logprobs=0), not the top alternatives")
    if url == CHAT and lp is not None and not isinstance(lp, bool):
        return f"logprobs must be true or false, got {json.dumps(lp)}"
    a, b = body.get("max_tokens"), body.get("max_completion_tokens")
    if a is not None and b is not None and a != b:
        return f"max_tokens={a} and max_completion_tokens={b} disagree: give one"
    return None


def _check_prompt(url: str, body: Dict[str, Any]) -> Optional[str]:
    if url == CHAT:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "body.messages must be a non-empty list of {\"role\", \"content\"} objects"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"body.messages[{i}] must be an object with string role and content, got {json.dumps(m)[:80]}"
        return None
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        return None
    if isinstance(p, list):
        return (f"body.prompt is a list of {len(p)} items: send one request line per prompt "
                "(token-id prompts are not supported)")
    if not isinstance(p, str):
        return f"body.prompt must be a string, got {json.dumps(p)[:80]}"
    return None


# --- output ---------------------------------------------------------------------------------

def _short_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def response_line(result: Dict[str, Any], api: Dict[str, Any], model: str, logprobs: bool) -> Dict[str, Any]:
    """A plain result line (batch.generate_block) -> the OpenAI batch output line."""
    cid = result["id"]
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}
    reason = FINISH[result["finish_reason"]]
    lp = result.get("logprobs") if logprobs else None
    if api["url"] == CHAT:
        choice = {"index": 0, "message": {"role": "assistant", "content": result["completion"]},
                  "finish_reason": reason, "logprobs": _chat_logprobs(lp) if lp else None}
        body = {"id": "chatcmpl-" + _short_hash(cid), "object": "chat.completion"}
    else:
        choice = {"index": 0, "text": result["completion"], "finish_reason": reason,
                  "logprobs": _completion_logprobs(lp) if lp else None}
        body = {"id": "cmpl-" + _short_hash(cid), "object": "text_completion"}
    body.update(created=int(time.time()), model=model, choices=[choice], usage=usage)
    return {"id": "batch_req_" + _short_hash("line", cid), "custom_id": cid,
            "response": {"status_code": 200, "request_id": "req_" + _short_hash("req", cid), "body": body},
            "error": None}


def _chat_logprobs(lp: Dict[str, list]) -> Dict[str, Any]:
    return {"content": [{"token": t, "logprob": x, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                        for t, x in zip(lp["tokens"], lp["token_logprobs"])]}


def _completion_logprobs(lp: Dict[str, list]) -> Dict[str, Any]:
    offsets, at = [], 0
    for t in lp["tokens"]:
        offsets.append(at)
        at += len(t)
    return {"tokens": lp["tokens"], "token_logprobs": lp["token_logprobs"], "text_offset": offsets,
            "top_logprobs": None}


def error_line(line: int, custom_id: Any, message: str) -> Dict[str, Any]:
    """A bad input line -> an OpenAI batch error line (the openai package's BatchError in `error`)."""
    cid = custom_id if isinstance(custom_id, str) else None
    return {"id": "batch_req_" + _short_hash("line", cid, line), "custom_id": cid, "response": None,
            "error": {"code": "invalid_request", "message": message, "param": None, "line": line}}
