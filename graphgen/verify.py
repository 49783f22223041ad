"""Graph invariants, checked after every pass for what that pass provided."""
from __future__ import annotations

from typing import Iterable, Optional

import networkx as nx

from .config import TIERS


class PassError(RuntimeError):
    """A pass or an invariant failed; the message says which and what to change."""


def verify(g: nx.DiGraph, changed: Optional[Iterable[str]] = None) -> None:
    """Raise PassError naming the first broken invariant; `changed` limits the checks
    to invariants over those attributes (None: check everything present)."""
    A = dict(g.nodes(data=True))  # plain dict access: views are slow at 100k+ nodes
    sq = [n for n, a in A.items() if "kind" in a]
    first = A[sq[0]] if sq else {}
    changed = set(changed) if changed is not None else set(first) | set(g.graph)
    if "ops" not in g.graph and not nx.is_directed_acyclic_graph(g):
        raise PassError("graph has a cycle: a square depends on itself")
    if "order" in changed and "order" in first:
        _check_order(g, A, sq, PassError)
    if changed & {"w_home", "kv_home", "act_home"} and "w_home" in first:
        _check_placed(A, sq, PassError)
    if "slot" in changed and "ops" in g.graph:
        _check_io(g, A, PassError)
    for tier, peak in g.graph.get("peak_bytes", {}).items():
        if peak > g.graph["budgets"][tier]:
            raise PassError(f"{tier} peak {peak} bytes exceeds its budget {g.graph['budgets'][tier]}")


def _check_order(g, A, sq, err):
    if sorted(A[n].get("order", -1) for n in sq) != list(range(len(sq))):
        raise err("every square needs a distinct order 0..n-1")
    for u, v, dep in g.edges(data="dep"):
        if dep in ("act", "kv", "token") and A[u]["order"] >= A[v]["order"]:
            raise err(f"order runs {v} before its {dep} producer {u}")


def _check_placed(A, sq, err):
    for n in sq:
        a = A[n]
        homes = [a.get("w_home"), a.get("act_home")] + ([a.get("kv_home")] if a["kind"] == "attn" else [])
        if any(h not in TIERS for h in homes):
            raise err(f"square {n} is not placed on a tier: {homes}")


def _check_io(g, A, err):
    for u, v, dep in g.edges(data="dep"):
        if dep == "io" and not (A[u]["slot"], A[u]["phase"]) < (A[v]["slot"], A[v]["phase"]):
            raise err(f"{u} must run before {v} in the schedule (loads before use, stores before reloads)")
