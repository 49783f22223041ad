"""Compile a config: model spec -> graph of squares -> the configured passes.

The one compile path: the Python API, the simulator, the optimiser, the plan job and the
benchmarks all go through `compile(spec, cfg, shape)`. A plan that does not fit the tier
budgets is refused here (plan_memory raises PassError), before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import networkx as nx

from passes import run_pipeline

from .build import build_graph
from .config import Config
from .models import ModelSpec, build_spec, hf_config_from_arch, hf_config_from_dir
from .models.gguf import is_gguf, load as load_gguf
from .models.weights import describe_missing, find_checkpoint
from .verify import PassError


@dataclass(frozen=True)
class BlockShape:
    """What one compiled graph computes: a block of num_batches GPU batches of `batch` sequences,
    prompt_len tokens each (after past_len cached ones), generating gen_len tokens."""
    prompt_len: int
    gen_len: int
    batch: int
    num_batches: int = 1
    past_len: int = 0  # tokens already in the KV cache (a chat session's earlier turns)
    cache_len: int = 0  # cache capacity to allocate (0: prompt + gen)
    score: bool = False  # log-likelihood: the prefill head scores every prompt position


def workload_shape(cfg: Config) -> BlockShape:
    """The block the workload and policy describe (the simulator's and the plan's unit)."""
    p, w = cfg.policy, cfg.workload
    return BlockShape(w.prompt_len, w.gen_len, p.gpu_batch_size, p.num_gpu_batches)


def checkpoint_of(cfg: Config) -> Optional[Path]:
    """The checkpoint directory model.path (or the hub id in the local cache) names, or None for
    random weights. A model.path that does not exist is an error."""
    m = cfg.model
    if m.weights == "dummy":
        return None
    ckpt = find_checkpoint(m.path, m.hf_id)
    if ckpt is None and (m.weights == "hf" or m.path):
        raise FileNotFoundError(f"model.weights={m.weights}: {describe_missing(m.hf_id, m.path)}")
    return ckpt


def spec_for(cfg: Config, checkpoint: Optional[Path] = None) -> ModelSpec:
    """The architecture spec: from the checkpoint's config.json (a GGUF file's metadata, with the
    compression its matrices are stored in) when there is one, else model.arch."""
    name = model_name(cfg, checkpoint)
    if checkpoint is not None and is_gguf(checkpoint):
        return load_gguf(checkpoint, name, cfg.model.keep_quantized)[0]
    hf = hf_config_from_dir(checkpoint) if checkpoint else hf_config_from_arch(cfg.model.arch)
    return build_spec(hf, name)


def model_name(cfg: Config, checkpoint: Optional[Path] = None) -> str:
    """A checkpoint named by model.path is reported by its directory (a GGUF by its file name
    without .gguf), not by the config's default model; else model.name."""
    if not (cfg.model.path and checkpoint):
        return cfg.model.name
    p = Path(cfg.model.path).expanduser().resolve()
    return p.stem if is_gguf(p) else p.name


def compile(spec: ModelSpec, cfg: Config, shape: BlockShape) -> nx.DiGraph:  # noqa: A001 (the compiler's verb)
    """Build the graph of `shape` for `spec` and run cfg.pipeline over it (verified after each pass)."""
    g = build_graph(spec, batch=shape.batch, num_batches=shape.num_batches, prompt_len=shape.prompt_len,
                    gen_len=shape.gen_len, dtype=cfg.model.dtype, past_len=shape.past_len,
                    cache_len=shape.cache_len, score=shape.score)
    try:
        return run_pipeline(g, cfg)
    except PassError as e:
        e.graph = g  # the partial graph: plan_memory leaves its per-tier peaks there (the optimiser reads them)
        raise
