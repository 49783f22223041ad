"""The schedule picture of a compiled graph, headless (no pyplot); the files a run writes
are in report/files.py.

Schedule picture: x = token step i (within it, GPU batch k), y = layer j; each square
is shaded and (small graphs) numbered by its execution step `order`, with the path of
the traversal in red. Left bar: where each layer's weights live (w_home); right bars:
where each (layer, batch) KV cache lives (kv_home); a triangle marks each square that
loads its layer's weights (coloured by the tier they come from). Big graphs are drawn
as an image of the same grid (matplotlib aggregates pixels) with the counts in the title.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import networkx as nx
import numpy as np

from ..config import TIERS

TIER_COLORS = {"device": "#2ca02c", "host": "#1f77b4", "disk": "#ff7f0e"}
PATH_COLOR = "#d62728"
ORDER_CMAP = "Greys"
DETAIL_MAX_SQUARES = 320  # above this the grid is drawn as an image, without numbers or path


def new_figure(w: float, h: float):
    """A Figure not registered with pyplot: no display, no backend state, safe in threads."""
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def save(fig, stem: Path, formats: Sequence[str]) -> List[Path]:
    """fig -> stem.png / stem.svg ...; returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=150 if fmt == "png" else None)
        out.append(path)
    return out


# --- the schedule grid ------------------------------------------------------------------------

@dataclass
class Grid:
    order: np.ndarray  # [L, T, nb] execution step of square (i, j, k), at [j, i, k]
    kinds: List[str]  # [L] layer kind
    w_home: List[str]  # [L]
    kv_home: Dict[tuple, str]  # (j, k) -> tier, attention layers only
    w_loads: Dict[tuple, str]  # square -> tier its layer's weights are loaded from
    attn_host: set  # squares whose attention runs on the host (CPU attention)
    load_bytes: Dict[str, int]  # bytes loaded per tensor kind (w, kv, act)


def schedule_grid(graph: nx.DiGraph) -> Grid:
    """Read the compiled graph's squares and I/O nodes into arrays for drawing."""
    T, L, nb = graph.graph["num_tokens"], graph.graph["num_layers"], graph.graph["num_batches"]
    order = np.full((L, T, nb), -1, dtype=np.int64)
    kinds, w_home, kv_home, w_loads, attn_host = [""] * L, [""] * L, {}, {}, set()
    load_bytes = {"w": 0, "kv": 0, "act": 0}
    for n, a in graph.nodes(data=True):
        if "kind" in a:
            i, j, k = n
            order[j, i, k] = a.get("order", -1)
            if i == 0:
                kinds[j], w_home[j] = a["kind"], a.get("w_home", "device")
                if "kv_home" in a:
                    kv_home[(j, k)] = a["kv_home"]
            if a.get("attn_device") == "host":
                attn_host.add(n)
        elif a.get("op") == "load":
            load_bytes[a["tensor"][0]] += a["bytes"]
            if a["tensor"][0] == "w":
                w_loads[a["square"]] = a["src"]
    return Grid(order, kinds, w_home, kv_home, w_loads, attn_host, load_bytes)


def _gb(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale / 10 or unit == "MB":
            return f"{n / scale:.3g} {unit}"


def schedule_title(graph: nx.DiGraph, g: Grid) -> str:
    spec = graph.graph["spec"]
    T, L, nb = graph.graph["num_tokens"], graph.graph["num_layers"], graph.graph["num_batches"]
    peaks = graph.graph.get("peak_bytes", {})
    peak = ", ".join(f"{t} {_gb(peaks[t])}" for t in TIERS if peaks.get(t))
    return (f"{getattr(spec, 'name', '') or 'model'}: schedule {graph.graph.get('schedule', '?')}, "
            f"{T} tokens x {L} layers x {nb} GPU batches of {graph.graph['shape'].batch}\n"
            f"{len(g.w_loads)} weight loads ({_gb(g.load_bytes['w'])}), cache loads {_gb(g.load_bytes['kv'])}"
            + (f"\nplanned peak {peak}" if peak else ""))


def draw_schedule(graph: nx.DiGraph, ax=None, detail: Optional[bool] = None, title: bool = True):
    """Draw the (token, layer, batch) grid of a compiled graph; returns the Figure."""
    g = schedule_grid(graph)
    L, T, nb = g.order.shape
    if detail is None:
        detail = g.order.size <= DETAIL_MAX_SQUARES
    if ax is None:
        w, h = detail_size(T, nb, L) if detail else (11, 7)
        ax = new_figure(w, h).add_subplot()
    (_draw_detail if detail else _draw_image)(ax, g)
    if title:
        ax.set_title(schedule_title(graph, g), fontsize=9)
    return ax.figure


def detail_size(T: int, nb: int, L: int):
    cols = T * (nb + 1) + nb + 3
    return max(6.0, 0.42 * cols + 1.5), max(3.0, 0.42 * L + 2.2)


def _col(i: int, k: int, nb: int) -> int:
    return i * (nb + 1) + k  # one blank column between token steps


def _draw_detail(ax, g: Grid) -> None:
    """Numbered squares, the traversal path, weight-load triangles, tier side bars."""
    from matplotlib.patches import Polygon, Rectangle

    L, T, nb = g.order.shape
    n_sq = max(1, int(g.order.max()) + 1)
    cmap = _cmap()
    centres = {}
    for j in range(L):
        for i in range(T):
            for k in range(nb):
                o = int(g.order[j, i, k])
                x, y = _col(i, k, nb), j
                shade = o / max(1, n_sq - 1)
                ax.add_patch(Rectangle((x - .45, y - .45), .9, .9, facecolor=cmap(shade), edgecolor="#555",
                                       lw=.5, hatch="///" if (i, j, k) in g.attn_host else None))
                ax.text(x, y, str(o), ha="center", va="center", fontsize=7,
                        color="white" if shade > .5 else "black")
                centres[o] = (x, y)
                if (i, j, k) in g.w_loads:
                    ax.add_patch(Polygon([(x - .45, y - .45), (x - .1, y - .45), (x - .45, y - .1)],
                                         facecolor=TIER_COLORS[g.w_loads[(i, j, k)]], edgecolor="none"))
    _draw_path(ax, [centres[o] for o in sorted(centres)])
    _side_bars(ax, g, left=-1.6, right=_col(T - 1, nb - 1, nb) + 1.1)
    ax.set_xticks([_col(i, k, nb) for i in range(T) for k in range(nb)],
                  [str(k) for _ in range(T) for k in range(nb)], fontsize=7)
    for i in range(T):
        ax.text(_col(i, (nb - 1) / 2, nb), -.6, "token 0 (prefill)" if i == 0 else f"token {i}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("GPU batch k, grouped by token step i", fontsize=8)
    _layer_axis(ax, g, fontsize=7)
    ax.set_xlim(-2.2, _col(T - 1, nb - 1, nb) + 1.1 + 0.5 * nb + 0.2)
    ax.set_ylim(L - .4, -1.1)
    ax.set_aspect("equal")
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    _legend(ax, g, detail=True)


def _cmap():
    """Light grey (early) to dark grey (late): leaves the tier colours and the red path distinct."""
    import matplotlib as mpl
    from matplotlib.colors import LinearSegmentedColormap

    base = mpl.colormaps[ORDER_CMAP]
    return LinearSegmentedColormap.from_list("order", [base(x) for x in np.linspace(.08, .85, 64)])


def _draw_path(ax, pts) -> None:
    """Red arrows between consecutive squares: solid to a neighbour, dashed for a jump."""
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        near = abs(x1 - x0) + abs(y1 - y0) <= 1
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(
            arrowstyle="-|>", color=PATH_COLOR, lw=1.0 if near else .7, ls="-" if near else (0, (3, 2)),
            alpha=.85 if near else .55, shrinkA=4, shrinkB=4, mutation_scale=7))


def _side_bars(ax, g: Grid, left: float, right: float) -> None:
    """Weight home per layer at the left; KV cache home per (layer, batch) at the right."""
    from matplotlib.patches import Rectangle

    L, _, nb = g.order.shape
    for j in range(L):
        ax.add_patch(Rectangle((left - .3, j - .45), .6, .9, facecolor=TIER_COLORS[g.w_home[j]], edgecolor="w"))
        for k in range(nb):
            tier = g.kv_home.get((j, k))
            if tier:
                ax.add_patch(Rectangle((right + .5 * k - .2, j - .45), .45, .9, facecolor=TIER_COLORS[tier],
                                       edgecolor="w", lw=.5))
    ax.text(left, -.6, "W", ha="center", va="bottom", fontsize=7)
    ax.text(right + .25 * (nb - 1), -.6, "KV", ha="center", va="bottom", fontsize=7)


def _layer_axis(ax, g: Grid, fontsize: int) -> None:
    L = len(g.kinds)
    if L <= 40:
        ax.set_yticks(range(L), [f"{j} {g.kinds[j]}" for j in range(L)], fontsize=fontsize)
    else:  # one tick every few decoder blocks, at the block's first (attention) layer
        attn = [j for j in range(L) if g.kinds[j] == "attn"] or list(range(L))
        step = max(1, len(attn) // 24)
        ax.set_yticks(attn[::step], [f"block {b} ({j})" for b, j in enumerate(attn)][::step], fontsize=fontsize)
    ax.set_ylabel("layer j", fontsize=8)
    ax.tick_params(length=0)


def _legend(ax, g: Grid, detail: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    used = set(g.w_home) | set(g.kv_home.values()) | set(g.w_loads.values())
    items = [Patch(color=TIER_COLORS[t], label=t) for t in TIERS if t in used]
    if detail:
        items.append(Line2D([], [], color=PATH_COLOR, lw=1, marker=">", ms=4, label="execution order"))
        if g.w_loads:
            items.append(Line2D([], [], ls="", marker="<", color="#444", ms=5,
                                label="weights loaded (from tier)"))
        if g.attn_host:
            items.append(Patch(facecolor="white", edgecolor="#555", hatch="///", label="attention on host"))
    ax.legend(handles=items, loc="upper center", bbox_to_anchor=(.5, -.12 if detail else -.08),
              ncol=len(items), fontsize=7, frameon=False)


def _draw_image(ax, g: Grid) -> None:
    """Big graphs: the order grid as an image, tier bars as thin images beside it."""
    from matplotlib.colors import ListedColormap

    L, T, nb = g.order.shape
    img = g.order.reshape(L, T * nb).astype(float)
    im = ax.imshow(img, cmap=_cmap(), aspect="auto", interpolation="nearest",
                   extent=(-.5, T * nb - .5, L - .5, -.5))
    if T <= 64 and nb > 1:
        for i in range(1, T):
            ax.axvline(i * nb - .5, color="white", lw=.4)
    tiers = ListedColormap([TIER_COLORS[t] for t in TIERS])
    idx = {t: n for n, t in enumerate(TIERS)}
    pad = max(1.0, T * nb / 40)
    w = np.array([[idx[t]] for t in g.w_home], float)
    ax.imshow(w, cmap=tiers, vmin=0, vmax=2, aspect="auto", extent=(-2.5 * pad, -1.5 * pad, L - .5, -.5))
    kv = np.full((L, nb), np.nan)
    for (j, k), t in g.kv_home.items():
        kv[j, k] = idx[t]
    x0 = T * nb - .5 + pad
    ax.imshow(kv, cmap=tiers, vmin=0, vmax=2, aspect="auto", extent=(x0, x0 + 2 * pad, L - .5, -.5))
    ax.set_xlim(-2.5 * pad, x0 + 2 * pad)
    step = max(1, T // 16)
    ax.set_xticks([-2 * pad] + [i * nb + (nb - 1) / 2 for i in range(0, T, step)] + [x0 + pad],
                  ["W"] + [str(i) for i in range(0, T, step)] + ["KV"], fontsize=7)
    ax.set_xlabel(f"token step i (each spans its {nb} GPU batches)", fontsize=8)
    _layer_axis(ax, g, fontsize=6)
    ax.figure.colorbar(im, ax=ax, label="execution step (order)", shrink=.8, pad=.01)
    _legend(ax, g, detail=False)


def write_schedule(graph: nx.DiGraph, stem: Path, formats: Sequence[str] = ("png", "svg")) -> List[Path]:
    return save(draw_schedule(graph), stem, formats)
