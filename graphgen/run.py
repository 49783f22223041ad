"""The main job: compile, generate over the workload's prompts, print the report."""
from __future__ import annotations

import sys
from typing import Dict, Tuple

import torch

from .api import LLM
from .config import Config
from . import viz
from .report import add_prediction, emit


def workload_prompts(cfg: Config, llm: LLM) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, S] and mask: from workload.prompts_file, else synthetic ids of prompt_len."""
    w, p = cfg.workload, cfg.policy
    n = w.num_prompts or p.gpu_batch_size * p.num_gpu_batches
    if w.prompts_file:
        if llm.tokenizer is None:
            raise ValueError("workload.prompts_file needs a checkpoint with a tokenizer "
                             "(set model.path to a Hugging Face checkpoint directory)")
        with open(w.prompts_file) as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        lines = (lines * (n // len(lines) + 1))[:n] if w.num_prompts else lines
        enc = llm.tokenizer(lines, return_tensors="pt", padding=True, truncation=True, max_length=w.prompt_len)
        return enc["input_ids"], enc["attention_mask"]
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(4, llm.spec.vocab_size, (n, w.prompt_len), generator=g)
    return ids, torch.ones_like(ids)


def run(cfg: Config) -> Dict:
    if cfg.run == "simulate":
        from .simulate import run_simulation

        return run_simulation(cfg)
    if cfg.run != "generate":
        raise ValueError(f"run={cfg.run!r}: use run=generate (default) or run=simulate")
    if cfg.job.name == "batch":
        from .apps.batch import main as batch_main

        with LLM(config=cfg) as llm:
            return batch_main(cfg.job, llm, cfg.workload, cfg.seed)
    if cfg.viz.timeline:
        cfg.executor.trace = True  # the timeline is drawn from the run's trace
    if cfg.viz.dry_run:
        from .optimize import resolve_policy

        return viz.plan_only(resolve_policy(cfg))
    with LLM(config=cfg) as llm:  # policy=auto is resolved there (llm.cfg holds the chosen policy)
        ids, mask = workload_prompts(llm.cfg, llm)
        w = cfg.workload
        out = llm.generate(ids, mask, max_new_tokens=w.gen_len, do_sample=w.do_sample,
                           temperature=w.temperature, top_k=w.top_k, top_p=w.top_p, seed=cfg.seed)
        st, out_dir = llm.last_stats, viz.output_dir(cfg)
        add_prediction(st, cfg, llm.graph)
        if viz.wanted(cfg):
            st["files"] = [str(f) for f in viz.write_visuals(cfg, llm.graph, llm.executor.trace, out_dir)]
        emit(st, cfg, out_dir)
        if llm.tokenizer is not None:
            print("sample:", repr(llm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)),
                  file=sys.stderr if cfg.report.json else sys.stdout)
        return st
