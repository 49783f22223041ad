"""The `job` config group (schema: graphgen.config.JobConfig) resolved for the batch job.

    python -m graphgen job=batch job.input=prompts.jsonl job.output=out.jsonl

Generation settings left at None fall back to the `workload` group (gen_len,
do_sample, temperature, top_k, top_p) and to the root `seed`; see resolve_job.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Optional

from ..config import BAD_INPUT_MODES, INPUT_FORMATS, JOB_NAMES, JobConfig

def resolve_job(job: JobConfig, workload: Any = None, seed: Optional[int] = None) -> JobConfig:
    """Fill the None generation settings from the workload config and root seed; validate."""
    w = workload
    filled = replace(
        job,
        max_new_tokens=_pick(job.max_new_tokens, w, "gen_len", 32),
        do_sample=bool(_pick(job.do_sample, w, "do_sample", False)),
        temperature=float(_pick(job.temperature, w, "temperature", 1.0)),
        top_k=int(_pick(job.top_k, w, "top_k", 0)),
        top_p=float(_pick(job.top_p, w, "top_p", 1.0)),
        seed=job.seed if job.seed is not None else seed,
        stop=[unescape(x) for x in job.stop or []],
    )
    check_job(filled)
    return filled


def check_job(job: JobConfig) -> None:
    """Errors name the config key and the values that would fit."""
    if job.name not in JOB_NAMES:
        raise ValueError(f"job.name={job.name!r} is unknown; known: {', '.join(JOB_NAMES)}")
    if job.on_bad_input not in BAD_INPUT_MODES:
        raise ValueError(f"job.on_bad_input={job.on_bad_input!r}: use one of {', '.join(BAD_INPUT_MODES)}")
    if job.input_format not in INPUT_FORMATS:
        raise ValueError(f"job.input_format={job.input_format!r}: use one of {', '.join(INPUT_FORMATS)}")
    if job.max_new_tokens is not None and job.max_new_tokens < 1:
        raise ValueError(f"job.max_new_tokens={job.max_new_tokens} must be >= 1")
    if job.block_size is not None and job.block_size < 1:
        raise ValueError(f"job.block_size={job.block_size} must be >= 1 (or null for the policy's batch)")
    if job.name == "batch" and (not job.input or not job.output):
        raise ValueError("job=batch needs job.input=PATH (JSONL with id and prompt per line, or text "
                         "with one prompt per line) and job.output=PATH (JSONL results)")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(s: str) -> str:
    """Hydra passes '\\n' through literally: turn \\n, \\t, \\r, \\\\ into the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], s)


def _pick(value: Any, workload: Any, key: str, default: Any) -> Any:
    if value is not None:
        return value
    return getattr(workload, key, default) if workload is not None else default
