"""Compiler passes: functions (graph, cfg) -> graph, registered by name.

A pipeline is a list of names (cfg.pipeline). After each pass the graph's invariants
are verified; a failure names the passes that already ran.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import networkx as nx

from graphgen.verify import PassError, verify

PASSES: Dict[str, "Pass"] = {}
_MODULES = ("order", "place_tensors", "delegate_cpu_attention", "insert_io", "plan_memory", "compress",
            "partition_stages", "insert_comm")


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable
    requires: tuple = ()  # square attributes that must exist before
    provides: tuple = ()  # square attributes it sets


def register(name: str, requires: Sequence[str] = (), provides: Sequence[str] = ()):
    def deco(fn):
        PASSES[name] = Pass(name, fn, tuple(requires), tuple(provides))
        return fn
    return deco


def get_pass(name: str) -> Pass:
    _load_all()
    if name not in PASSES:
        raise PassError(f"unknown pass {name!r} in pipeline; known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def _load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"passes.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"passes.{m}":
                raise


def run_pipeline(graph: nx.DiGraph, cfg, names: List[str] | None = None) -> nx.DiGraph:
    """Run the named passes in order, verifying invariants after each."""
    names = list(cfg.pipeline if names is None else names)
    done: List[str] = []
    for name in names:
        p = get_pass(name)
        provided = graph.graph.setdefault("provided", set())
        missing = [a for a in p.requires if a not in provided]
        if missing:
            raise PassError(f"pass {name!r} requires square attributes {missing}, which no earlier "
                            f"pass provided (ran: {done or 'none'}); add their pass before it in pipeline")
        try:
            graph = p.fn(graph, cfg)
            verify(graph, p.provides)
        except PassError as e:
            raise PassError(f"{e}\n  (in pass {name!r}; passes already run: {done or 'none'})") from None
        done.append(name)
        provided.update(p.provides)
    return graph

