"""Runtimes that execute a compiled graph, registered by name (cfg.executor.name)."""
from __future__ import annotations

from typing import Dict, Type

from .base import BlockInputs, Executor  # noqa: F401
from .async_streams import AsyncExecutor
from .reference import ReferenceExecutor

EXECUTORS: Dict[str, Type[Executor]] = {"reference": ReferenceExecutor, "async": AsyncExecutor}


def make_executor(spec, weights, cfg) -> Executor:
    name = cfg.executor.name
    if name not in EXECUTORS:
        raise ValueError(f"executor.name={name!r} is unknown; known executors: {', '.join(sorted(EXECUTORS))}")
    return EXECUTORS[name](spec, weights, cfg)
