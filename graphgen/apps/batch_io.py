"""Batch job input and output: read + validate the prompts file, repair + append the results file.

Input lines become Requests or BadLines (with 1-based line numbers); the results
file is append-only JSONL whose torn tail (a crash mid-write) is cut on resume.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from graphgen.chat_template import chat_ids, check_messages
from graphgen.apps import openai_batch
from graphgen.stopping import normalize_stops

MAX_SHOWN_ERRORS = 10
BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, which some editors put first
RECORD_START = b'{"id": '  # how append_durably begins every result line
RESULT_FIELDS = ("id", "completion", "finish_reason")  # a result line has at least these
OPENAI_RESULT_FIELDS = ("id", "custom_id", "response", "error")  # an OpenAI batch output line
Record = Tuple[int, Dict[str, Any], str]  # line number, parsed line, line text


class BadInputError(ValueError):
    """The input file has bad lines and on_bad_input=stop (or no good line): nothing was generated."""


class JobRefused(ValueError):
    """job.output cannot be written safely (another job's, not a result file, the input, a directory)."""


@dataclass(frozen=True)
class GenSettings:
    """What must be identical for prompts to share one generate call."""
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    logprobs: bool = False  # also record each chosen token's log-probability


@dataclass
class Request:
    line: int  # 1-based line number in the input file
    id: Any  # str or int, as given (text input: the line number)
    prompt: str
    ids: List[int]  # tokenised prompt
    gen: GenSettings
    stop: Tuple[str, ...] = ()
    messages: Optional[List[Dict[str, str]]] = None  # a conversation (chat template) instead of a prompt
    seed: Optional[int] = None  # the request's own sampling seed (OpenAI body.seed)
    openai: Optional[Dict[str, Any]] = None  # OpenAI batch request: {"url", "model"}; answered in its shape


@dataclass
class BadLine:
    line: int
    error: str
    id: Any = None
    text: str = ""

    def to_json(self) -> Dict[str, Any]:
        return {"line": self.line, "id": self.id, "error": self.error, "input": self.text[:200]}


# --- input: read and validate -------------------------------------------------------------

def detect_format(path: Path, lines: Sequence[bytes], fmt: str = "auto") -> str:
    """openai | jsonl | text: an OpenAI batch file by its first line (a request with custom_id and
    url/body), else by extension, else by whether the first non-blank line is a JSON object."""
    first = next((ln.strip() for ln in lines if ln.strip()), b"")
    if fmt == "jsonl" or (fmt == "auto" and path.suffix.lower() != ".txt"):
        try:
            if openai_batch.is_openai_request(json.loads(first)):
                return "openai"
        except ValueError:
            pass
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if path.suffix.lower() == ".txt":
        return "text"
    return "jsonl" if first.startswith(b"{") else "text"


def file_format(path: Path, fmt: str = "auto") -> str:
    """The format read_input reads path in (detect_format on the file's first non-blank line)."""
    with open(path, "rb") as f:
        first = next((ln for ln in f if ln.strip()), b"")
    return detect_format(path, [first.removeprefix(BOM)], fmt)


def read_input(path: Path, fmt: str = "auto") -> Tuple[List[Record], List[BadLine]]:
    """File -> ([(line number, {"id", "prompt", ...}, line text)], bad lines). Blank JSONL lines are
    ignored; OpenAI request lines become plain records (openai_batch.to_record)."""
    lines = path.read_bytes().removeprefix(BOM).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline does not start a line
    fmt = detect_format(path, lines, fmt)
    good, bad = [], []
    for n, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            bad.append(BadLine(n, f"not UTF-8 text ({e.reason} at byte {e.start})"))
            continue
        if fmt == "text":
            good.append((n, {"id": n, "prompt": text}, text))
        elif text.strip():
            rec = _parse_json_line(n, text, bad, fmt)
            if rec is not None:
                good.append((n, rec, text))
    return good, bad


def _parse_json_line(n: int, text: str, bad: List[BadLine], fmt: str = "jsonl") -> Optional[Dict[str, Any]]:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        bad.append(BadLine(n, f"invalid JSON: {e.msg} at column {e.colno}", text=text))
        return None
    if fmt == "openai":
        out, err = openai_batch.to_record(rec)
        if err:
            bad.append(BadLine(n, err, rec.get("custom_id") if isinstance(rec, dict) else None, text))
        return out
    if not isinstance(rec, dict):
        bad.append(BadLine(n, f"expected a JSON object with id and prompt, got {type(rec).__name__}", text=text))
        return None
    missing = [k for k in ("id", "prompt") if k not in rec and not (k == "prompt" and "messages" in rec)]
    if missing:
        bad.append(BadLine(n, f"missing field(s): {', '.join(missing)} (or messages instead of prompt)",
                           rec.get("id"), text))
        return None
    if "prompt" in rec and "messages" in rec:
        bad.append(BadLine(n, "give prompt or messages, not both", rec.get("id"), text))
        return None
    return rec


def validate(records: List[Record], tokenizer: Any, defaults: GenSettings,
             stop: Sequence[str], max_positions: Optional[int]) -> Tuple[List[Request], List[BadLine]]:
    """Records -> requests that can run, and bad lines (type errors, empty or too-long prompts, duplicates)."""
    checked, bad = [], []
    for n, rec, text in records:
        err = _check_fields(rec)
        if err:
            bad.append(BadLine(n, err, rec.get("id"), text))
        else:
            checked.append((n, rec, text))
    plain = [rec["prompt"] for _, rec, _ in checked if "messages" not in rec]
    token_ids = iter(_tokenize(tokenizer, plain))
    seen: Dict[str, int] = {}
    good = []
    for n, rec, text in checked:
        try:
            ids = chat_ids(tokenizer, rec["messages"]) if "messages" in rec else next(token_ids)
        except ValueError as e:  # no chat template: the line is bad, the others run
            bad.append(BadLine(n, str(e), rec["id"], text))
            continue
        req = _request(n, rec, ids, defaults, stop)
        err = _check_request(req, max_positions, seen)
        if err:
            bad.append(BadLine(n, err, rec["id"], text))
        else:
            seen[id_key(req.id)] = n
            good.append(req)
    bad.sort(key=lambda b: b.line)
    return good, bad


def _check_fields(rec: Dict[str, Any]) -> Optional[str]:
    i, p = rec["id"], rec.get("prompt")
    if isinstance(i, bool) or not isinstance(i, (str, int)):
        return f"id must be a string or an integer, got {json.dumps(i)}"
    if "messages" in rec:
        err = check_messages(rec["messages"])
        if err:
            return err
    elif not isinstance(p, str):
        return f"prompt must be a string, got {type(p).__name__}"
    elif not p.strip():
        return "empty prompt"
    m = rec.get("max_new_tokens")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
        return f"max_new_tokens must be an integer >= 1, got {json.dumps(m)}"
    t = rec.get("temperature")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf):
        return f"temperature must be a number >= 0 (0: greedy), got {json.dumps(t)}"
    s = rec.get("stop")
    if s is not None and not (isinstance(s, str) or (isinstance(s, list) and all(isinstance(x, str) for x in s))):
        return f"stop must be a string or a list of strings, got {json.dumps(s)}"
    tp = rec.get("top_p")
    if tp is not None and (isinstance(tp, bool) or not isinstance(tp, (int, float)) or not 0 < tp <= 1):
        return f"top_p must be a number in (0, 1], got {json.dumps(tp)}"
    sd = rec.get("seed")
    if sd is not None and (isinstance(sd, bool) or not isinstance(sd, int)):
        return f"seed must be an integer, got {json.dumps(sd)}"
    return None


def _request(n: int, rec: Dict[str, Any], ids: List[int], d: GenSettings, stop: Sequence[str]) -> Request:
    gen = d
    if rec.get("max_new_tokens") is not None:
        gen = GenSettings(rec["max_new_tokens"], gen.do_sample, gen.temperature, gen.top_k, gen.top_p)
    if rec.get("temperature") is not None:  # a request's temperature picks sampling (> 0) or greedy (0)
        t = float(rec["temperature"])
        gen = GenSettings(gen.max_new_tokens, t > 0, t if t > 0 else 1.0, gen.top_k, gen.top_p)
    if rec.get("top_p") is not None:
        gen = GenSettings(gen.max_new_tokens, gen.do_sample, gen.temperature, gen.top_k, float(rec["top_p"]))
    if rec.get("logprobs"):
        gen = GenSettings(gen.max_new_tokens, gen.do_sample, gen.temperature, gen.top_k, gen.top_p, True)
    stops = normalize_stops(rec["stop"]) if rec.get("stop") is not None else tuple(stop)
    return Request(n, rec["id"], rec.get("prompt", ""), ids, gen, stops, messages=rec.get("messages"),
                   seed=rec.get("seed"), openai=rec.get("openai"))


def _check_request(r: Request, max_positions: Optional[int], seen: Dict[str, int]) -> Optional[str]:
    if id_key(r.id) in seen:
        return f"duplicate id {json.dumps(r.id)} (first on line {seen[id_key(r.id)]})"
    if max_positions and len(r.ids) + r.gen.max_new_tokens > max_positions:
        return (f"prompt too long: {len(r.ids)} tokens + max_new_tokens {r.gen.max_new_tokens} > "
                f"the model's context of {max_positions}; shorten the prompt or lower max_new_tokens")
    return None


def _tokenize(tokenizer: Any, texts: List[str], chunk: int = 1024) -> List[List[int]]:
    out: List[List[int]] = []
    for i in range(0, len(texts), chunk):
        out.extend(list(x) for x in tokenizer(texts[i:i + chunk])["input_ids"])
    return out


def id_key(i: Any) -> str:
    """Ids compare by JSON form: 7 and "7" are different ids."""
    return json.dumps(i)


def write_errors(path: Path, bad: List[BadLine], fmt: str = "jsonl") -> None:
    """Rewrite the errors file (atomically) for this run's validation; remove it when clean.
    fmt=openai: OpenAI batch error lines (openai_batch.error_line)."""
    if not bad:
        path.unlink(missing_ok=True)
        return
    rows = [openai_batch.error_line(b.line, b.id, b.error) if fmt == "openai" else b.to_json() for b in bad]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def bad_input_message(bad: List[BadLine], input_path: Path, errors_path: Path, stopped: bool = True) -> str:
    """Why nothing was generated: bad lines with on_bad_input=stop, or no line that could run."""
    if not bad:
        return f"job.input={input_path} has no prompts: nothing to generate"
    shown = "\n".join(f"  line {b.line}: {b.error}" for b in bad[:MAX_SHOWN_ERRORS])
    more = f"\n  ... and {len(bad) - MAX_SHOWN_ERRORS} more" if len(bad) > MAX_SHOWN_ERRORS else ""
    if not stopped:
        return (f"no prompt of {input_path} could run: all {len(bad)} line(s) are bad; nothing was generated:"
                f"\n{shown}{more}\nAll of them are listed in {errors_path}.")
    return (f"{input_path}: {len(bad)} bad input line(s); nothing was generated "
            f"(job.on_bad_input=stop):\n{shown}{more}\nAll of them are listed in {errors_path}. "
            "Fix them, or set job.on_bad_input=skip to generate the good lines only.")


# --- output: resume and durable append ------------------------------------------------------

def check_output(input_path: Path, output_path: Path, errors_path: Path) -> None:
    """Refuse, before anything is written, an output that is a directory or the input file."""
    if output_path.is_dir():
        raise JobRefused(f"job.output={output_path} is a directory: name a file, e.g. "
                         f"job.output={output_path / 'results.jsonl'}")
    for path, what in ((output_path, "job.output"), (errors_path, f"the errors file of job.output={output_path},")):
        if path.exists() and input_path.exists() and os.path.samefile(path, input_path):
            raise JobRefused(f"{what} {path} is the input file job.input={input_path}: writing results there "
                             "would destroy the prompts; choose another job.output")


def missing_dirs(path: Path) -> List[Path]:
    """The directories mkdir(parents=True) would create, deepest first."""
    made = []
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    return made


def remove_dirs(dirs: List[Path]) -> None:
    for d in dirs:  # deepest first; only while empty
        try:
            d.rmdir()
        except OSError:
            break


def repair_output(path: Path, fmt: str = "jsonl") -> Tuple[set, int]:
    """Drop the torn last record of a crash mid-write; return (ids already written, bytes dropped).

    Only a graphgen result file is touched: every complete line but the last must be a result
    line, and only the last record (the bytes after the last newline, else the last line) is
    cut, when it is torn: NUL bytes (a crash after the size grew) or a partial result line.
    fmt=openai: OpenAI batch output lines, whose request id is custom_id."""
    fields, key = (OPENAI_RESULT_FIELDS, "custom_id") if fmt == "openai" else (RESULT_FIELDS, "id")
    if not path.exists():
        return set(), 0
    data = path.read_bytes()
    body, tail = data[:data.rfind(b"\n") + 1], data[data.rfind(b"\n") + 1:]
    lines = body.split(b"\n")[:-1]
    complete = not tail
    if complete and lines and not is_result_line(lines[-1], fields):  # a complete but garbled last line
        tail, lines = lines[-1] + b"\n", lines[:-1]
    done = set()
    for n, raw in enumerate(lines, start=1):
        if not is_result_line(raw, fields):
            raise JobRefused(f"{path} is not a graphgen result file (line {n} is not a result line: "
                             f"{raw[:80]!r}); job.output must name a new file or an earlier job's results: "
                             "move it away or choose another job.output") from None
        done.add(id_key(json.loads(raw)[key]))
    if tail and not is_torn(tail.removesuffix(b"\n"), complete):
        raise JobRefused(f"{path} is not a graphgen result file (its last line is not a result line: "
                         f"{tail[:80]!r}); job.output must name a new file or an earlier job's results: "
                         "move it away or choose another job.output")
    if tail:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(tail))
            f.flush()
            os.fsync(f.fileno())
    return done, len(tail)


def is_result_line(raw: bytes, fields: Tuple[str, ...] = RESULT_FIELDS) -> bool:
    try:
        rec = json.loads(raw)
    except ValueError:
        return False
    return isinstance(rec, dict) and all(k in rec for k in fields)


def is_torn(record: bytes, complete: bool) -> bool:
    """The last record cut short by a crash: it starts with zero bytes (the size grew, the data never
    came), or it is the start of a result line; a complete line then must not parse."""
    if record.startswith(b"\0"):
        return True
    if complete:
        return record.startswith(RECORD_START) and not _parses(record)
    return record.startswith(RECORD_START) or RECORD_START.startswith(record)


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False


def lock_output(f) -> None:
    """One writer per output file: a second job on the same file would write ids twice."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise JobRefused(f"job.output={f.name} is being written by another running job; wait for it, "
                         "or choose another job.output") from None


def append_durably(f, lines: Iterable[Dict[str, Any]]) -> None:
    """Append whole JSON lines in one write, then flush and fsync: on disk before the next block."""
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8"))
    f.flush()
    os.fsync(f.fileno())
