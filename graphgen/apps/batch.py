"""Batch job: a prompts file in, one JSON line per prompt out; resumable after any crash.

    python -m graphgen job=batch job.input=prompts.jsonl job.output=out.jsonl

Stages: read + validate every line, lock the output (one job per file), check it is a
graphgen result file (or new) and repair its torn last record, report bad lines to
<output>.errors.jsonl (or stop; a job with no good line fails), skip ids already there, bucket the rest by
generation settings and prompt length, generate block by block, append each
finished block with write + flush + fsync. A SIGKILL at any moment loses at most
the block in flight, and re-running the same command writes every id exactly once.
"""
from __future__ import annotations

import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from graphgen import distributed
from graphgen.apps.batch_io import (BadInputError, BadLine, GenSettings, JobRefused, Request,  # noqa: F401
                                    append_durably, bad_input_message, check_output, file_format, id_key, lock_output,
                                    missing_dirs, read_input, remove_dirs, repair_output, validate,
                                    write_errors)
from graphgen.apps.job_config import resolve_job
from graphgen.chat_template import end_of_turn_ids
from graphgen.apps.openai_batch import response_line
from graphgen.api import stage_figures
from graphgen.report.text import pipeline_lines
from graphgen.stopping import finish, normalize_stops


@dataclass
class BatchSummary:
    total: int = 0  # valid prompts in the input
    already_done: int = 0  # found in the output at start
    generated: int = 0  # written by this run
    bad_lines: List[BadLine] = field(default_factory=list)
    completion_tokens: int = 0
    seconds: float = 0.0
    repaired_bytes: int = 0  # torn tail dropped from the output at start

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


# --- planning and generation ---------------------------------------------------------------

def plan_blocks(requests: List[Request], block_size: int) -> List[List[Request]]:
    """Group by generation settings, sort each group by prompt length (longest first: any
    out-of-memory shows at the start), cut into blocks: a block pads only to its own longest."""
    groups: Dict[GenSettings, List[Request]] = {}
    for r in requests:
        groups.setdefault(r.gen, []).append(r)
    blocks = []
    for reqs in groups.values():
        reqs = sorted(reqs, key=lambda r: (-len(r.ids), r.line))
        blocks.extend(reqs[i:i + block_size] for i in range(0, len(reqs), block_size))
    return blocks


def left_pad(rows: List[List[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids, attention_mask [B, S], padded on the left."""
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), S), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, S - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, S - len(r):] = 1
    return ids, mask


def block_seed(seed: Optional[int], block: List[Request]) -> Optional[List[int]]:
    """One seed per prompt: its own (OpenAI body.seed), else from the job seed and its id: a prompt
    samples the same tokens whichever block it lands in, so a resumed run equals an uninterrupted one."""
    if seed is None and all(r.seed is None for r in block):
        return None
    return [r.seed & 0x7FFF_FFFF if r.seed is not None else
            ((seed or 0) * 1_000_003 + zlib.crc32(id_key(r.id).encode())) & 0x7FFF_FFFF for r in block]


def supports_logprobs(llm: Any) -> bool:
    import inspect
    try:
        return "return_logprobs" in inspect.signature(llm.generate).parameters
    except (TypeError, ValueError):
        return False


def block_tokens(llm: Any, block: List[Request], *, seed: Optional[List[int]], logprobs: bool,
                 pad_id: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One generate call for a block -> (new tokens [B, T], their log p [B, T] or None)."""
    g = block[0].gen
    input_ids, mask = left_pad([r.ids for r in block], pad_id)
    kw = dict(attention_mask=mask, max_new_tokens=g.max_new_tokens, do_sample=g.do_sample,
              temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=seed)
    if logprobs:
        out, lps = llm.generate(input_ids, return_logprobs=True, **kw)  # [B, S+T], [B, T]
    else:
        out, lps = llm.generate(input_ids, **kw), None
    return out[:, input_ids.shape[1]:], lps


def generate_block(llm: Any, block: List[Request], *, seed: Optional[List[int]], logprobs: bool,
                   eos_id: Any, pad_id: int) -> List[Dict[str, Any]]:
    """One generate call for a block -> its output lines."""
    logprobs = logprobs or block[0].gen.logprobs
    new, lps = block_tokens(llm, block, seed=seed, logprobs=logprobs, pad_id=pad_id)
    lines = []
    for b, r in enumerate(block):
        c = finish(llm.tokenizer, r.ids, new[b].tolist(), eos_token_id=eos_id, stop=r.stop,
                   logprobs=None if lps is None else lps[b].tolist())
        line = {"id": r.id, **({"messages": r.messages} if r.messages is not None else {"prompt": r.prompt}),
                "completion": c.text, "prompt_tokens": len(r.ids), "completion_tokens": len(c.token_ids),
                "finish_reason": c.finish_reason}
        if logprobs:
            line["logprobs"] = {"tokens": c.tokens, "token_logprobs": c.logprobs}
        lines.append(line)
    return lines


def output_lines(llm: Any, block: List[Request], lines: List[Dict[str, Any]], logprobs: bool) -> List[Dict]:
    """Result lines in the shape each request came in: plain, or OpenAI batch output."""
    ckpt = getattr(llm, "checkpoint", None)  # the checkpoint dir's name, else the config's model name
    model = ckpt.name if ckpt is not None else getattr(llm.spec, "name", None) or "graphgen"
    return [response_line(ln, r.openai, model, logprobs or r.gen.logprobs) if r.openai else ln
            for r, ln in zip(block, lines)]


# --- the job ---------------------------------------------------------------------------------

def run_batch(llm: Any, input_path, output_path, *, max_new_tokens: int = 32, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0, do_sample: bool = False, seed: Optional[int] = None,
              stop: Sequence[str] = (), on_bad_input: str = "skip", logprobs: bool = False,
              block_size: Optional[int] = None, progress: bool = True,
              input_format: str = "auto") -> BatchSummary:
    """Generate a completion for every good prompt of input_path not yet in output_path.

    Under torchrun (a pipeline: graphgen/distributed.py) every rank calls this with the same
    arguments: rank 0 alone reads the input and writes the results, and sends each block to the
    other ranks, which run their stage of it (follow_blocks)."""
    if not distributed.is_reporter():
        return follow_blocks(llm)
    followers = Followers()
    try:
        summary = _lead(llm, input_path, output_path, followers, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample, seed=seed,
                        stop=stop, on_bad_input=on_bad_input, logprobs=logprobs, block_size=block_size,
                        progress=progress, input_format=input_format)
    except BaseException as e:  # noqa: B902 (Ctrl-C too: the other ranks stop with it)
        followers.stop(e)
        raise
    followers.done()
    return summary


def _lead(llm: Any, input_path, output_path, followers: "Followers", *, max_new_tokens: int, temperature: float,
          top_k: int, top_p: float, do_sample: bool, seed: Optional[int], stop: Sequence[str], on_bad_input: str,
          logprobs: bool, block_size: Optional[int], progress: bool, input_format: str) -> BatchSummary:
    input_path, output_path = Path(input_path), Path(output_path)
    errors_path = output_path.with_name(output_path.name + ".errors.jsonl")
    if on_bad_input not in ("skip", "stop"):
        raise ValueError(f"on_bad_input={on_bad_input!r}: use skip or stop")
    if llm.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer; the batch job needs one: point model.path "
                         "at a directory with tokenizer files (tokenizer.json, ...)")
    if logprobs and not supports_logprobs(llm):
        raise ValueError("job.logprobs=true needs LLM.generate(..., return_logprobs=True); "
                         "this LLM does not offer it: set job.logprobs=false")
    if not input_path.exists():
        raise FileNotFoundError(f"job.input={input_path} does not exist")
    check_output(input_path, output_path, errors_path)
    spec = llm.spec
    defaults = GenSettings(max_new_tokens, do_sample and temperature > 0, float(temperature) if temperature > 0
                           else 1.0, top_k, top_p)
    fmt = file_format(input_path, input_format)  # openai: results in OpenAI's batch output shape
    records, bad = read_input(input_path, fmt)
    requests, bad2 = validate(records, llm.tokenizer, defaults, normalize_stops(stop), spec.max_positions)
    bad = sorted(bad + bad2, key=lambda b: b.line)
    if any(r.gen.logprobs for r in requests) and not supports_logprobs(llm):
        raise ValueError("requests ask for logprobs, which need LLM.generate(..., return_logprobs=True); "
                         "this LLM does not offer it")
    made = missing_dirs(output_path.parent)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    created = not output_path.exists()
    with open(output_path, "ab") as out:
        lock_output(out)  # first: a job refused here touches none of the running job's files
        try:
            done, dropped = repair_output(output_path, fmt)  # refuses a file that is not a result file
            write_errors(errors_path, bad, fmt)
            if bad and on_bad_input == "stop" or not requests:
                raise BadInputError(bad_input_message(bad, input_path, errors_path, stopped=bool(requests)))
        except ValueError:
            if created:  # this job made the (empty) output file: it leaves none behind
                output_path.unlink()
                remove_dirs(made)
            raise
        summary = BatchSummary(total=len(requests), bad_lines=bad, repaired_bytes=dropped)
        pending = [r for r in requests if id_key(r.id) not in done]
        summary.already_done = len(requests) - len(pending)
        _announce(summary, output_path, errors_path)
        blocks = plan_blocks(pending, block_size or default_block_size(llm))
        _run_blocks(llm, blocks, out, summary, followers, seed=seed, logprobs=logprobs, progress=progress)
    _log(f"batch: {summary.generated} generated, {summary.already_done + summary.generated}/{summary.total} "
         f"done, {summary.completion_tokens} tokens in {summary.seconds:.1f} s "
         f"({summary.tokens_per_s:.1f} tokens/s) -> {output_path}")
    return summary


def _run_blocks(llm, blocks, out, summary: BatchSummary, followers: "Followers", *, seed, logprobs,
                progress) -> None:
    from tqdm import tqdm

    eos_id = end_of_turn_ids(llm.tokenizer, llm.spec.eos_token_id)  # replies end at the end of turn
    pad_id = llm.spec.pad_token_id if llm.spec.pad_token_id is not None else (llm.spec.eos_token_id or 0)
    show = progress and sys.stderr.isatty()
    bar = tqdm(total=summary.total, initial=summary.already_done, unit="prompt", disable=not show,
               file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    with bar:
        for block in blocks:
            seeds = block_seed(seed, block)
            followers.run(block, seeds, logprobs or block[0].gen.logprobs)
            lines = generate_block(llm, block, seed=seeds, logprobs=logprobs, eos_id=eos_id, pad_id=pad_id)
            followers.idle = True
            followers.blocks.append(stage_of(llm))
            append_durably(out, output_lines(llm, block, lines, logprobs))
            summary.generated += len(lines)
            summary.completion_tokens += sum(ln["completion_tokens"] for ln in lines)
            summary.seconds = time.perf_counter() - t0
            bar.update(len(lines))
            bar.set_postfix_str(f"{summary.tokens_per_s:.1f} tok/s")


# --- under torchrun: rank 0 leads, the other ranks follow ------------------------------------------

class Followers:
    """Rank 0's messages to the other ranks (torch.distributed, graphgen/distributed.py): each block
    to run, then done, or stop when rank 0 refused the job; without torchrun, nothing."""

    def __init__(self):
        self.active = distributed.world_size() > 1
        self.idle = True  # between blocks: the other ranks wait for a message
        self.blocks: List[Optional[Dict]] = []  # this rank's stage figures of each generate call

    def run(self, block: List[Request], seeds: Optional[List[int]], logprobs: bool) -> None:
        self._send(("block", block, seeds, logprobs))
        self.idle = False

    def done(self) -> None:
        self._send(("done",))
        if self.active:
            pipeline_summary(self.blocks)

    def stop(self, err: BaseException) -> None:
        """Rank 0 refused the job or failed between blocks: the others stop now (not after
        parallel.timeout_s). Inside a block they stop on their own (a receive from rank 0 fails);
        after a failed message there is nobody to tell."""
        if self.active and self.idle and not isinstance(err, ConnectionError):
            why = (str(err).strip().splitlines() or [type(err).__name__])[0]
            try:
                self._send(("stop", why))
            except ConnectionError:
                pass

    def _send(self, msg) -> None:
        if self.active:
            distributed.from_reporter(msg, "the next block of requests")


def follow_blocks(llm: Any) -> BatchSummary:
    """Ranks other than 0: run each block rank 0 sends (this rank's stage of the pipeline) until
    it says done; rank 0 writes the results."""
    pad_id = llm.spec.pad_token_id if llm.spec.pad_token_id is not None else (llm.spec.eos_token_id or 0)
    summary = BatchSummary()
    t0, stages = time.perf_counter(), []
    while True:
        msg = distributed.from_reporter(None, "the next block of requests")
        if msg[0] == "done":
            pipeline_summary(stages)
            return summary
        if msg[0] == "stop":
            raise JobRefused(f"rank {distributed.rank()}: rank 0 stopped the batch job: {msg[1]}")
        _, block, seeds, logprobs = msg
        block_tokens(llm, block, seed=seeds, logprobs=logprobs, pad_id=pad_id)
        stages.append(stage_of(llm))
        summary.generated += len(block)
        summary.seconds = time.perf_counter() - t0


def stage_of(llm: Any) -> Optional[Dict]:
    """This rank's stage figures of the LLM's last generate call (graphgen/api.py), if a pipeline."""
    return (getattr(llm, "last_stats", None) or {}).get("stage")


def pipeline_summary(calls: List[Optional[Dict]]) -> None:
    """After the job, every rank: rank 0 prints each stage's time over the whole job, the bubble
    fraction and the bytes sent per link (as the generate job's report does)."""
    mine = stage_figures([{"stage": c} for c in calls if c]).get("stage")
    everyone = distributed.to_reporter(mine, "its stage's figures for the report")
    if everyone and all(everyone):
        for line in pipeline_lines(distributed.pipeline_figures(everyone)):
            _log(line)


def default_block_size(llm: Any) -> int:
    """Prompts per generate call: the LLM's block (gpu_batch_size x num_gpu_batches), else 8."""
    n = getattr(llm, "block_size", None)
    if isinstance(n, int) and n > 0:
        return n
    policy = getattr(getattr(llm, "cfg", None), "policy", None)
    if policy is not None:
        return int(policy.gpu_batch_size) * int(policy.num_gpu_batches)
    return 8


def _announce(s: BatchSummary, output_path: Path, errors_path: Path) -> None:
    if s.bad_lines:
        _log(f"batch: skipping {len(s.bad_lines)} bad input line(s), listed in {errors_path}")
    if s.repaired_bytes:
        _log(f"batch: dropped a torn last line ({s.repaired_bytes} bytes) from {output_path}")
    if s.already_done:
        _log(f"batch: resuming, {s.already_done}/{s.total} prompts already in {output_path}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(job: Any, llm: Any, workload: Any = None, seed: Optional[int] = None) -> BatchSummary:
    """CLI entry (job=batch): typed JobConfig + loaded LLM; workload/seed fill unset settings."""
    j = resolve_job(job, workload, seed)
    try:
        return run_batch(llm, j.input, j.output, max_new_tokens=j.max_new_tokens, temperature=j.temperature,
                         top_k=j.top_k, top_p=j.top_p, do_sample=j.do_sample, seed=j.seed, stop=j.stop,
                         on_bad_input=j.on_bad_input, logprobs=j.logprobs, block_size=j.block_size,
                         progress=j.progress, input_format=j.input_format)
    except (BadInputError, JobRefused) as e:  # nothing to run, or an output it must not write
        raise SystemExit(f"graphgen: error: {e}") from None
