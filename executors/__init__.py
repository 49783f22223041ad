"""Runtimes that execute a compiled graph, registered by name (cfg.executor.name)."""
from __future__ import annotations

from typing import Dict, Type

from graphgen.config import num_stages

from .base import BlockInputs, Executor  # noqa: F401
from .async_streams import AsyncExecutor
from .reference import ReferenceExecutor
from .pipeline import STAGE_EXECUTORS, check_launched

EXECUTORS: Dict[str, Type[Executor]] = {"reference": ReferenceExecutor, "async": AsyncExecutor}


def make_executor(spec, weights, cfg) -> Executor:
    name = cfg.executor.name
    if name not in EXECUTORS:
        raise ValueError(f"executor.name={name!r} is unknown; known executors: {', '.join(sorted(EXECUTORS))}")
    stages = num_stages(cfg)
    if stages > 1:  # one pipeline stage per process (executors/pipeline.py)
        check_launched(cfg, stages)
        return STAGE_EXECUTORS[name](spec, weights, cfg)
    return EXECUTORS[name](spec, weights, cfg)
