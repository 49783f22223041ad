"""The files a run writes (viz.schedule / viz.timeline / viz.graph): the schedule picture,
the timeline and Chrome trace, and the compiled graph as GraphML / DOT for other tools."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import networkx as nx
import numpy as np

from .schedule import TIER_COLORS, Window, default_window, write_schedule
from .timeline import timeline_title, write_chrome_trace, write_timeline


# --- graph export -------------------------------------------------------------------------------

def _scalar(v):
    """GraphML holds str / int / float / bool only: everything else becomes its repr."""
    if isinstance(v, (bool, int, float, str)) and not isinstance(v, np.generic):
        return v
    return json.dumps(v) if isinstance(v, dict) and all(isinstance(k, str) for k in v) else str(v)


def flat_graph(graph: nx.DiGraph) -> nx.DiGraph:
    """A copy with string node ids and scalar attributes (None dropped), for other tools."""
    out = nx.DiGraph()
    out.graph.update({k: _scalar(v) for k, v in graph.graph.items()
                      if k not in ("ops", "spec", "provided") and v is not None})
    out.graph["model"] = getattr(graph.graph.get("spec"), "name", "")
    for n, a in graph.nodes(data=True):
        out.add_node(str(n), **{k: _scalar(v) for k, v in a.items() if v is not None},
                     node_type="square" if "kind" in a else a.get("op", "?"))
    out.add_edges_from((str(u), str(v), {k: _scalar(x) for k, x in d.items() if x is not None})
                       for u, v, d in graph.edges(data=True))
    return out


def write_graphml(graph: nx.DiGraph, path: Path) -> Path:
    nx.write_graphml(flat_graph(graph), path)
    return path


def _dot_attr(v) -> str:
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_dot(graph: nx.DiGraph, path: Path) -> Path:
    """Graphviz DOT text, written directly (no pydot needed); squares are boxes coloured by weight home."""
    flat = flat_graph(graph)
    lines = ["digraph graphgen {", "  node [style=filled, fontsize=8];"]
    for n, a in flat.nodes(data=True):
        if a["node_type"] == "square":
            style = {"shape": "box", "label": f"{n}\\n#{a.get('order', '')} {a['kind']}",
                     "fillcolor": TIER_COLORS.get(a.get("w_home"), "white")}
        else:
            style = {"shape": "ellipse", "label": f"{a['node_type']} {a.get('tensor', '')}\\n"
                     f"{a.get('src', '')}->{a.get('dst', '')}", "fillcolor": "#eeeeee"}
        attrs = {**{k: v for k, v in a.items() if k not in style}, **style}
        body = ", ".join(f"{k}={_dot_attr(v)}" for k, v in attrs.items()).replace('\\\\n', '\\n')
        lines.append(f"  {_dot_attr(n)} [{body}];")
    for u, v, d in flat.edges(data=True):
        lines.append(f"  {_dot_attr(u)} -> {_dot_attr(v)} [dep={_dot_attr(d.get('dep', ''))}];")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    return path


# --- what a run writes ---------------------------------------------------------------------------

def output_dir(cfg) -> Path:
    """viz.out_dir, else Hydra's run directory, else the current directory."""
    if cfg.viz.out_dir:
        return Path(cfg.viz.out_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not inside a Hydra app (tests, the Python API)
        return Path(os.getcwd())


def write_visuals(cfg, graph: nx.DiGraph, trace=None, out: Optional[Path] = None,
                  stage_traces: Optional[List] = None) -> List[Path]:
    """The files viz.schedule / viz.timeline / viz.graph ask for; returns their paths. stage_traces
    (under torchrun, graphgen/distributed.py's gather_traces): trace.json has every rank's track."""
    v = cfg.viz
    out = Path(out) if out is not None else output_dir(cfg)
    formats = list(v.formats)
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad:
        raise ValueError(f"viz.formats has {bad}: use png, svg or pdf")
    paths: List[Path] = []
    if v.schedule:
        paths += write_schedule(graph, out / f"schedule-{graph.graph.get('schedule', 'graph')}", formats,
                                detail_window(v, graph))
    if v.timeline:
        if trace is None or not trace.events:
            raise ValueError("viz.timeline needs a run trace: set executor.trace=true (run() does so)")
        title = timeline_title(graph)
        if stage_traces and len(stage_traces) > 1:  # the picture is this process's; the file has all ranks
            title += f"; pipeline stage 0 of {len(stage_traces)} (every stage's ops: trace.json)"
        paths += write_timeline(trace, out / "timeline", formats, graph, title)
        paths.append(write_chrome_trace(trace, out / "trace.json", graph, stage_traces))
    if v.graph:
        out.mkdir(parents=True, exist_ok=True)
        paths += [write_graphml(graph, out / "graph.graphml"), write_dot(graph, out / "graph.dot")]
    return paths


def detail_window(v, graph: nx.DiGraph) -> Window:
    """viz.detail_tokens / detail_layers / detail_batches ([first, last], null = default) as a Window."""
    T, L, nb = graph.graph["num_tokens"], graph.graph["num_layers"], graph.graph["num_batches"]
    default = default_window(T, L, nb)
    spans = []
    for key, n, d in (("detail_tokens", T, default.tokens), ("detail_layers", L, default.layers),
                      ("detail_batches", nb, default.batches)):
        val = getattr(v, key)
        if val is None:
            spans.append(d)
        elif len(val) == 2 and 0 <= val[0] <= val[1] < n:
            spans.append(range(val[0], val[1] + 1))
        else:
            raise ValueError(f"viz.{key}={list(val)}: give [first, last] with 0 <= first <= last <= {n - 1} "
                             f"(this plan has {n}), or null for the default")
    return Window(*spans)


def wanted(cfg) -> bool:
    return bool(cfg.viz.schedule or cfg.viz.timeline or cfg.viz.graph)
