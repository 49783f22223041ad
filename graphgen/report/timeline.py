"""A run's trace (executors/trace.py) as a picture and a Chrome trace file (its numbers:
report/metrics.py).

- draw_timeline: Gantt chart of the streams (load / compute / store and any disk I/O threads)
  over time, and bytes in use per tier over time;
- chrome_trace: the trace as Chrome trace-event JSON (open in ui.perfetto.dev or chrome://tracing);
  under torchrun, stages_chrome_trace puts every rank's in one file, one process track per rank.
"""
from __future__ import annotations

import ast
import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..config import TIERS
from .metrics import Interval, _link, node_index, trace_metrics
from .schedule import TIER_COLORS, new_figure, save

STREAM_ORDER = ("load", "compute", "store")
COMPUTE_COLORS = {"prefill": "#444444", "decode": "#9a9a9a"}


# --- chrome trace -------------------------------------------------------------------------------

def streams_of(events: Sequence) -> List[str]:
    """load, compute, store first, then any other stream (disk I/O threads) by name."""
    seen = {ev.stream for ev in events}
    return [s for s in STREAM_ORDER if s in seen] + sorted(seen - set(STREAM_ORDER))


def _label(ev, nodes) -> str:
    a = (nodes or {}).get(ev.name)
    if a and "kind" in a:
        return f"{a['kind']} {ev.name}"
    return ev.name


def chrome_trace(trace, graph=None) -> Dict:
    """Trace-event JSON: one complete ("X") event per executed op, one thread per stream,
    and a counter track of MB in use per tier."""
    return _trace_file([(1, "graphgen", trace.events, 0.0)], graph)


def stages_chrome_trace(stages: Sequence[Optional[Dict]], graph=None) -> Dict:
    """A pipeline's traces (graphgen/distributed.py's gather_traces: {rank, t0_wall, events} per
    rank) in one file: one process track per rank, on one time axis (the wall clock at which each
    rank's trace began; across machines, as well as their clocks agree)."""
    got = [s for s in stages if s]
    t0 = min(s["t0_wall"] for s in got)
    return _trace_file([(s["rank"] + 1, f"stage {s['rank']} (rank {s['rank']})", s["events"], s["t0_wall"] - t0)
                        for s in got], graph)


def _trace_file(processes, graph) -> Dict:
    """processes: (pid, name, events, offset in seconds) each."""
    nodes = node_index(graph)
    out: List[Dict] = []
    for pid, name, events, offset in processes:
        out += _process(pid, name, list(events), offset, nodes)
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"producer": "graphgen", "schedule": (graph.graph.get("schedule") if graph else None)}}


def _process(pid: int, name: str, events, offset: float, nodes) -> List[Dict]:
    tid = {s: n + 1 for n, s in enumerate(streams_of(events))}
    out = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}},
           {"ph": "M", "pid": pid, "name": "process_sort_index", "args": {"sort_index": pid}}]
    for s, t in tid.items():
        out.append({"ph": "M", "pid": pid, "tid": t, "name": "thread_name", "args": {"name": s}})
        out.append({"ph": "M", "pid": pid, "tid": t, "name": "thread_sort_index", "args": {"sort_index": t}})
    last = None
    for ev in events:
        out.append({"ph": "X", "pid": pid, "tid": tid[ev.stream], "name": _label(ev, nodes), "cat": ev.stream,
                    "ts": (ev.start + offset) * 1e6, "dur": max(0.0, ev.end - ev.start) * 1e6,
                    "args": {"node": ev.name, "bytes": ev.bytes, "link": _link(ev, nodes)}})
        mem = {t: round(ev.tier_bytes.get(t, 0) / 1e6, 3) for t in TIERS}
        if mem != last:
            out.append({"ph": "C", "pid": pid, "name": "memory in use (MB)", "ts": (ev.end + offset) * 1e6,
                        "args": mem})
            last = mem
    return out


def write_chrome_trace(trace, path: Path, graph=None, stages: Optional[Sequence[Optional[Dict]]] = None) -> Path:
    """trace.json: this process's trace, or with stages (under torchrun) every rank's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = stages_chrome_trace(stages, graph) if stages and any(stages) else chrome_trace(trace, graph)
    path.write_text(json.dumps(data))
    return path


# --- timeline picture --------------------------------------------------------------------------

def _step_kind(ev, nodes) -> str:
    a = (nodes or {}).get(ev.name)
    if a and "step_kind" in a:
        return a["step_kind"]
    try:
        return "prefill" if ast.literal_eval(ev.name)[0] == 0 else "decode"
    except (ValueError, SyntaxError, TypeError, IndexError):
        return "decode"


def _color(ev, nodes) -> str:
    """Compute by phase (grey shades); transfers by the slow tier they touch."""
    if ev.stream == "compute":
        return COMPUTE_COLORS[_step_kind(ev, nodes)]
    link = _link(ev, nodes).split("->")
    tier = link[0] if ev.stream == "load" else link[-1]
    return TIER_COLORS.get(tier, "#bbbbbb")


def _time_unit(span: float):
    return ("ms", 1e3) if span < 2 else ("s", 1.0)


def draw_timeline(trace, graph=None, title: str = ""):
    """Gantt chart of the streams over time above bytes in use per tier; returns the Figure."""
    events, nodes = list(trace.events), node_index(graph)
    streams = streams_of(events)
    t0 = min(e.start for e in events)  # the first op: setup (placing weights) is not drawn
    span = max(e.end for e in events) - t0
    unit, scale = _time_unit(span)
    fig = new_figure(11, 2.2 + 0.45 * len(streams) + 2.4)
    gantt, mem = fig.subplots(2, 1, sharex=True, height_ratios=[0.5 + 0.45 * len(streams), 2.4])
    bars: Dict[Tuple[int, str], List[Interval]] = defaultdict(list)
    for ev in events:
        bars[(streams.index(ev.stream), _color(ev, nodes))].append(
            ((ev.start - t0) * scale, max(ev.end - ev.start, span * 2e-4) * scale))
    few = len(events) < 400 * len(streams)  # few ops: white edges separate back-to-back computes
    for (row, color), xs in bars.items():
        edge = "white" if few and color in COMPUTE_COLORS.values() else color
        gantt.broken_barh(xs, (row - .38, .76), facecolors=color, edgecolors=edge, linewidth=.4)
    gantt.set_yticks(range(len(streams)), streams)
    gantt.set_ylim(len(streams) - .5, -.5)
    _gantt_legend(gantt, events, nodes)
    _memory(mem, events, graph, t0, scale)
    mem.set_xlabel(f"time ({unit})")
    m = trace_metrics(events, graph)
    gantt.set_title((title + "\n" if title else "") + f"{len(events)} ops in {span:.3g} s; compute busy "
                    f"{m['compute_busy_s']:.3g} s, I/O busy {m['io_busy_s']:.3g} s, "
                    f"I/O hidden under compute {m['overlap_fraction']:.0%}", fontsize=9)
    return fig


def _gantt_legend(ax, events, nodes) -> None:
    from matplotlib.patches import Patch

    used = {_color(ev, nodes) for ev in events}
    items = [Patch(color=c, label=f"compute ({k})") for k, c in COMPUTE_COLORS.items() if c in used]
    items += [Patch(color=TIER_COLORS[t], label=f"to / from {t}") for t in TIERS if TIER_COLORS[t] in used]
    ax.legend(handles=items, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)


def _memory(ax, events, graph, t0: float, scale: float) -> None:
    """Bytes in use per tier after each op (a step line), with the plan's peak dashed."""
    evs = sorted(events, key=lambda e: e.end)
    xs = [0.0] + [(e.end - t0) * scale for e in evs]
    planned = graph.graph.get("peak_bytes", {}) if graph is not None else {}
    for t in TIERS:
        ys = [e.tier_bytes.get(t, 0) / 1e9 for e in evs[:1] + evs]  # from the first op's start
        if max(ys) == 0 and not planned.get(t):
            continue
        ax.step(xs, ys, where="post", color=TIER_COLORS[t], lw=1.2, label=f"{t} in use")
        if planned.get(t):
            ax.axhline(planned[t] / 1e9, color=TIER_COLORS[t], ls="--", lw=.8, label=f"{t} planned peak")
    ax.set_ylabel("GB in use")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)


def timeline_title(graph) -> str:
    return "" if graph is None else \
        f"{getattr(graph.graph.get('spec'), 'name', '')}: schedule {graph.graph.get('schedule', '?')}"


def write_timeline(trace, stem: Path, formats: Sequence[str] = ("png", "svg"), graph=None,
                   title: str = "") -> List[Path]:
    title = title or timeline_title(graph)
    return save(draw_timeline(trace, graph, title), stem, formats)
