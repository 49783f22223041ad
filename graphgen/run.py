"""The run modes behind `python -m graphgen job=...`: generate (the default), batch, simulate, plan."""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch

from . import distributed
from .api import LLM
from .apps.batch import main as batch_main
from .chat_template import chat_ids, end_of_turn_ids
from .compile import checkpoint_of, compile, spec_for, workload_shape
from .config import TIERS, Config
from .perf.optimize import resolve_policy
from .perf.simulate import run_simulation
from .report import files
from .report.text import add_prediction, emit, gb
from .stopping import finish


def workload_prompts(cfg: Config, llm: LLM) -> Tuple[torch.Tensor, torch.Tensor, Optional[List[str]]]:
    """Token ids [N, S], mask and the prompt texts: from workload.prompts_file, else workload.prompts
    (with a tokenizer; chat turns when it has a template), else synthetic ids of prompt_len (no texts)."""
    w, p = cfg.workload, cfg.policy
    n = w.num_prompts or p.gpu_batch_size * p.num_gpu_batches
    if w.prompts and not w.prompts_file and llm.tokenizer is not None:
        tok = llm.tokenizer
        texts = (list(w.prompts) * (n // len(w.prompts) + 1))[:n]
        chat = getattr(tok, "chat_template", None) is not None
        rows = [chat_ids(tok, [{"role": "user", "content": t}]) if chat else list(tok(t)["input_ids"])
                for t in texts]
        enc = tok.pad({"input_ids": rows}, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], texts
    if w.prompts_file:
        if llm.tokenizer is None:
            raise ValueError("workload.prompts_file needs a checkpoint with a tokenizer "
                             "(set model.path to a Hugging Face checkpoint directory)")
        try:
            with open(w.prompts_file, encoding="utf-8-sig") as f:
                lines = [ln.rstrip("\r\n") for ln in f if ln.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"workload.prompts_file={w.prompts_file} is not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
        if not lines:
            raise ValueError(f"workload.prompts_file={w.prompts_file} has no prompts (no non-blank line): "
                             "write one prompt per line")
        lines = (lines * (n // len(lines) + 1))[:n] if w.num_prompts else lines
        enc = llm.tokenizer(lines, return_tensors="pt", padding=True, truncation=True, max_length=w.prompt_len)
        return enc["input_ids"], enc["attention_mask"], lines
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(4, llm.spec.vocab_size, (n, w.prompt_len), generator=g)
    return ids, torch.ones_like(ids), None


def run(cfg: Config) -> Dict:
    """Run the job cfg.job.name names (the one run-mode key: job=generate|batch|simulate|plan)."""
    if cfg.job.name not in JOBS:
        raise ValueError(f"job.name={cfg.job.name!r} is unknown: use job={' | job='.join(JOBS)}")
    cfg = distributed.setup(cfg)  # under torchrun: one pipeline stage per rank (graphgen/distributed.py)
    try:
        if cfg.job.name in ("simulate", "plan"):  # under torchrun: rank 0 only, with every rank's budgets
            cfg = distributed.for_prediction(cfg)
            if cfg is None:
                return {}
        return JOBS[cfg.job.name](cfg)
    finally:
        distributed.teardown()


def generate_job(cfg: Config) -> Dict:
    """The workload's prompts through the model once; the report (and any pictures) after."""
    if cfg.viz.timeline and not cfg.executor.trace:  # the timeline is drawn from the run's trace
        cfg = replace(cfg, executor=replace(cfg.executor, trace=True))
    with LLM(config=cfg) as llm:
        cfg = llm.cfg  # policy=auto resolved: the config that ran, from here on
        ids, mask, texts = workload_prompts(cfg, llm)
        w = cfg.workload
        out = llm.generate(ids, mask, max_new_tokens=w.gen_len, do_sample=w.do_sample,
                           temperature=w.temperature, top_k=w.top_k, top_p=w.top_p, seed=cfg.seed)
        st, out_dir = llm.last_stats, files.output_dir(cfg)
        st = distributed.gather_report(st)  # torchrun: every stage's figures, on rank 0
        traces = distributed.gather_traces(llm.executor.trace)  # and every rank's trace
        if not distributed.is_reporter():
            return st
        if texts:  # what the model said, before the numbers
            show_answers(llm, texts, ids, mask, out, file=sys.stderr if cfg.report.json else sys.stdout)
        add_prediction(st, cfg, llm.graph)
        if files.wanted(cfg):
            st["files"] = [str(f) for f in files.write_visuals(cfg, llm.graph, llm.executor.trace, out_dir, traces)]
        emit(st, cfg, out_dir)
        return st


def show_answers(llm: LLM, texts: List[str], ids: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
                 file, limit: int = 8) -> None:
    """Each prompt (once) and the text generated for it, cut at its end of turn."""
    tok, S = llm.tokenizer, ids.shape[1]
    eot = end_of_turn_ids(tok, llm.spec.eos_token_id)
    seen = set()
    for b, text in enumerate(texts):
        if text in seen or len(seen) == limit:
            continue
        seen.add(text)
        prompt = [int(t) for t, m in zip(ids[b], mask[b]) if m]
        c = finish(tok, prompt, out[b, S:].tolist(), eos_token_id=eot)
        print(f"> {text}\n  {c.text.strip()}", file=file)


def batch_job(cfg: Config) -> Dict:
    """job=batch: a prompts file -> JSONL results, resumable (graphgen/apps/batch.py)."""
    with LLM(config=cfg) as llm:
        return batch_main(cfg.job, llm, cfg.workload, cfg.seed)


def plan_job(cfg: Config) -> Dict:
    """job=plan: compile the workload's block and write the pictures of the plan; run nothing."""
    spec = spec_for(cfg, checkpoint_of(cfg))
    cfg = resolve_policy(cfg, spec=spec)
    graph = compile(spec, cfg, workload_shape(cfg))
    out = files.output_dir(cfg)
    stages = graph.graph.get("stage_layers") if graph.graph.get("num_stages", 1) > 1 else None
    written = files.write_visuals(replace(cfg, viz=replace(cfg.viz, timeline=False)), graph, None, out)
    st = {"model": cfg.model.name, "schedule": graph.graph["schedule"], "dry_run": True,
          "planned_peak_bytes": dict(graph.graph["peak_bytes"]), "budget_bytes": dict(graph.graph["budgets"]),
          "files": [str(f) for f in written], **({"stage_layers": list(stages)} if stages else {})}
    text = "\n".join([
        f"plan (job=plan): {cfg.model.name}, schedule {st['schedule']}; nothing was run",
        "planned peak  " + "   ".join(f"{t} {gb(st['planned_peak_bytes'][t])} of {gb(st['budget_bytes'][t])}"
                                      for t in TIERS) + (" (the stage nearest its budget)" if stages else "")]
        + ([f"pipeline      {len(stages)} stages of {', '.join(map(str, stages))} layers"] if stages else [])
        + [f"file          {f}" for f in st["files"]])
    emit(st, cfg, out, text)
    return st


JOBS = {"generate": generate_job, "batch": batch_job, "simulate": run_simulation, "plan": plan_job}
