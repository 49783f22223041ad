"""The schedule picture of a compiled graph, headless (no pyplot); the files a run writes
are in report/files.py. The grid is (token i, layer j, GPU batch k); every square's
execution step is its `order`.

- (a) detail: a window of squares (by default the first two token steps, the first few
  layers, every GPU batch) drawn one by one: shaded and numbered by execution step, the
  traversal path in red (solid to a neighbour, dashed for a jump), corner marks for the
  loads and stores of each square coloured by the tier on the other end, and side bars for
  where each layer's weights live (w_home) and each (layer, batch) KV cache lives (kv_home);
- (b) whole run: the same grid as an image shaded by execution step, with the window of (a)
  boxed and the tier bars beside it;
- (c) traversal: which layer runs at each execution step, coloured by GPU batch; zig-zag is
  one sweep of all layers per token step with the batches interleaved, row-by-row one
  sweep per (batch, token step) in batch-coloured blocks.
A graph of at most DETAIL_MAX_SQUARES squares is drawn as (a) alone, the window being the whole grid.
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
BATCH_COLORS = ["#332288", "#88ccee", "#44aa99", "#117733", "#999933", "#ddcc77", "#cc6677", "#882255"]
DETAIL_MAX_SQUARES = 320  # up to this many squares the whole grid is drawn square by square
WINDOW_TOKENS, WINDOW_LAYERS, WINDOW_BATCHES = 2, 7, 8  # the default detail window (a)
# corner marks: (x, y) offsets of a triangle in a unit square centred on 0 (y grows downwards)
CORNERS = {"w_load": [(-.45, -.45), (-.12, -.45), (-.45, -.12)], "kv_load": [(.45, -.45), (.12, -.45), (.45, -.12)],
           "act_store": [(-.45, .45), (-.12, .45), (-.45, .12)], "kv_store": [(.45, .45), (.12, .45), (.45, .12)]}
MARK_LABELS = {"w_load": "weights loaded from", "kv_load": "KV cache loaded from",
               "act_store": "activation stored to", "kv_store": "KV cache stored to"}


def new_figure(w: float, h: float):
    """A Figure not registered with pyplot: no display, no backend state, safe in threads."""
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def save(fig, stem: Path, formats: Sequence[str]) -> List[Path]:
    """fig -> stem.png / stem.svg ...; returns the paths written (byte-identical for the same figure)."""
    import matplotlib as mpl

    stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        with mpl.rc_context({"svg.hashsalt": "graphgen"}):  # fixed SVG ids; no date below
            fig.savefig(path, dpi=150 if fmt == "png" else None,
                        metadata={"Date": None} if fmt in ("svg", "pdf") else None)
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
    marks: Dict[str, Dict[tuple, str]]  # CORNERS key -> {square: tier at the other end of the transfer}


def schedule_grid(graph: nx.DiGraph) -> Grid:
    """Read the compiled graph's squares and I/O nodes into arrays for drawing."""
    T, L, nb = graph.graph["num_tokens"], graph.graph["num_layers"], graph.graph["num_batches"]
    order = np.full((L, T, nb), -1, dtype=np.int64)
    kinds, w_home, kv_home, attn_host = [""] * L, [""] * L, {}, set()
    marks: Dict[str, Dict[tuple, str]] = {m: {} for m in CORNERS}
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
            kind = a["tensor"][0]
            load_bytes[kind] += a["bytes"]
            if kind in ("w", "kv"):
                marks[f"{kind}_load"][a["square"]] = a["src"]
        elif a.get("op") == "store" and a["src"] != a["dst"]:
            marks[f"{a['tensor'][0]}_store"][a["square"]] = a["dst"]
    return Grid(order, kinds, w_home, kv_home, marks["w_load"], attn_host, load_bytes, marks)


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
            + (f"; planned peak {peak}" if peak else "") + stages_title(graph))


def stages_title(graph: nx.DiGraph) -> str:
    """Pipeline stages (passes/partition_stages.py): layers per stage and what crosses between them."""
    counts = graph.graph.get("stage_layers") or []
    if len(counts) < 2:
        return ""
    A = graph.nodes
    sends = [A[m] for m in graph.graph["ops"] if A[m].get("op") == "send"]
    return (f"\n{len(counts)} pipeline stages of {counts} layers; {len(sends)} sends "
            f"({_gb(sum(b['bytes'] for b in sends))})")


# --- the window drawn in detail ------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """The squares drawn one by one: token steps x layers x GPU batches (ranges of indices)."""
    tokens: range
    layers: range
    batches: range

    @property
    def size(self) -> int:
        return len(self.tokens) * len(self.layers) * len(self.batches)


def default_window(T: int, L: int, nb: int) -> Window:
    """The whole grid when it is small, else the first token steps and layers across the GPU batches."""
    if T * L * nb <= DETAIL_MAX_SQUARES:
        return Window(range(T), range(L), range(nb))
    return Window(range(min(T, WINDOW_TOKENS)), range(min(L, WINDOW_LAYERS)), range(min(nb, WINDOW_BATCHES)))


def check_window(w: Window, T: int, L: int, nb: int) -> Window:
    for name, r, n in (("tokens", w.tokens, T), ("layers", w.layers, L), ("batches", w.batches, nb)):
        if not len(r) or r.step != 1 or r.start < 0 or r.stop > n:
            raise ValueError(f"schedule window {name}={r} must be a non-empty range within 0..{n - 1}")
    if w.size > 4 * DETAIL_MAX_SQUARES:
        raise ValueError(f"schedule window has {w.size} squares, more than {4 * DETAIL_MAX_SQUARES} drawn in detail: "
                         f"narrow viz.detail_tokens / viz.detail_layers / viz.detail_batches")
    return w


# --- the figure ---------------------------------------------------------------------------------------

def draw_schedule(graph: nx.DiGraph, ax=None, title: bool = True, window: Optional[Window] = None):
    """Draw the schedule of a compiled graph; returns the Figure: panel (a) alone when the window is
    the whole grid or an `ax` is given to draw it into, else (a) + (b) + (c)."""
    g = schedule_grid(graph)
    L, T, nb = g.order.shape
    w = check_window(window or default_window(T, L, nb), T, L, nb)
    if ax is None and w.size < g.order.size:
        fig = _draw_overview(g, w)
        if title:
            fig.suptitle(schedule_title(graph, g), fontsize=10)
        return fig
    ax = ax or new_figure(*detail_size(len(w.tokens), len(w.batches), len(w.layers))).add_subplot()
    _draw_detail(ax, g, w)
    if title:
        part = "" if w.size == g.order.size else f"\ndetail: {_window_text(g, w)}"
        ax.set_title(schedule_title(graph, g) + part, fontsize=9)
    return ax.figure


def detail_size(T: int, nb: int, L: int):
    cols = T * (nb + 1) + nb + 3
    return max(6.0, 0.42 * cols + 1.5), max(3.0, 0.42 * L + 2.2)


def _draw_overview(g: Grid, w: Window):
    """(a) detail window and (b) the whole grid side by side, (c) the traversal strip below."""
    dw, dh = detail_size(len(w.tokens), len(w.batches), len(w.layers))
    fig = new_figure(dw + 7.5, max(dh, 5.5) + 3.2)
    gs = fig.add_gridspec(2, 2, width_ratios=[dw, 7.5], height_ratios=[max(dh, 5.5), 3.0])
    a = fig.add_subplot(gs[0, 0])
    _draw_detail(a, g, w)
    a.set_title(f"(a) detail: {_window_text(g, w)}\nnumber = execution step, red = traversal path",
                fontsize=9, loc="left")
    _draw_whole(fig.add_subplot(gs[0, 1]), g, w)
    draw_traversal(fig.add_subplot(gs[1, :]), g, w)
    return fig


# --- (a) detail --------------------------------------------------------------------------------------

def _draw_detail(ax, g: Grid, w: Window) -> None:
    """Numbered squares, the traversal path, load/store corner marks, tier side bars."""
    from matplotlib.patches import Polygon, Rectangle

    kw = len(w.batches)
    last = max(1, int(g.order.max()))
    cmap = _cmap()
    col = {(i, k): ti * (kw + 1) + ki for ti, i in enumerate(w.tokens) for ki, k in enumerate(w.batches)}
    centres = {}
    for j in w.layers:
        y = j - w.layers.start
        for (i, k), x in col.items():
            o = int(g.order[j, i, k])
            shade = o / last
            host = (i, j, k) in g.attn_host  # hatched, in a light colour that keeps the number legible
            ax.add_patch(Rectangle((x - .45, y - .45), .9, .9, facecolor=cmap(shade), lw=.5,
                                   edgecolor="#999" if host else "#555", hatch="///" if host else None))
            ax.text(x, y, str(o), ha="center", va="center", fontsize=7 if o < 1000 else 5.5,
                    color="white" if shade > .5 else "black")
            centres[o] = (x, y)
            for mark, corner in CORNERS.items():
                tier = g.marks[mark].get((i, j, k))
                if tier:
                    ax.add_patch(Polygon([(x + dx, y + dy) for dx, dy in corner], facecolor=TIER_COLORS[tier],
                                         edgecolor="none"))
    _draw_path(ax, sorted(centres.items()))
    right = (len(w.tokens) - 1) * (kw + 1) + kw - 1 + 1.1
    _side_bars(ax, g, w, left=-1.6, right=right)
    ax.set_xticks(list(col.values()), [str(k) for (_, k) in col], fontsize=7)
    for ti, i in enumerate(w.tokens):
        ax.text(ti * (kw + 1) + (kw - 1) / 2, -.6, "token 0 (prefill)" if i == 0 else f"token {i}",
                ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("GPU batch k, grouped by token step i", fontsize=8)
    _layer_axis(ax, g, w.layers, fontsize=7)
    ax.set_xlim(-2.2, right + 0.5 * kw + 0.2)
    ax.set_ylim(len(w.layers) - .4, -1.1)
    ax.set_aspect("equal")
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    _legend(ax, g, w)


def _window_text(g: Grid, w: Window) -> str:
    L, T, nb = g.order.shape
    return f"{_span('token', w.tokens, T)}, {_span('layer', w.layers, L)}, {_span('GPU batch', w.batches, nb)}"


def _span(name: str, r: range, n: int) -> str:
    if len(r) == n:
        return f"all {n} {name}{'es' if name.endswith('batch') else 's'}"
    return f"{name}s {r.start}-{r.stop - 1} of {n}" if len(r) > 1 else f"{name} {r.start} of {n}"


def _cmap():
    """Light grey (early) to dark grey (late): leaves the tier colours and the red path distinct."""
    import matplotlib as mpl
    from matplotlib.colors import LinearSegmentedColormap

    base = mpl.colormaps["Greys"]
    return LinearSegmentedColormap.from_list("order", [base(x) for x in np.linspace(.08, .85, 64)])


def _draw_path(ax, steps) -> None:
    """Red arrows between the window's squares in execution order: solid to a neighbour, dashed
    for a jump (the squares between the two numbers ran elsewhere, or the path turned back)."""
    for (o0, (x0, y0)), (o1, (x1, y1)) in zip(steps, steps[1:]):
        near = abs(x1 - x0) + abs(y1 - y0) <= 1 and o1 - o0 == 1
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(
            arrowstyle="-|>", color=PATH_COLOR, lw=1.0 if near else .7, ls="-" if near else (0, (3, 2)),
            alpha=.9 if near else .55, shrinkA=8, shrinkB=8, mutation_scale=7))


def _side_bars(ax, g: Grid, w: Window, left: float, right: float) -> None:
    """Weight home per layer at the left; KV cache home per (layer, batch) at the right."""
    from matplotlib.patches import Rectangle

    for j in w.layers:
        y = j - w.layers.start
        ax.add_patch(Rectangle((left - .3, y - .45), .6, .9, facecolor=TIER_COLORS[g.w_home[j]], edgecolor="w"))
        for ki, k in enumerate(w.batches):
            tier = g.kv_home.get((j, k))
            if tier:
                ax.add_patch(Rectangle((right + .5 * ki - .2, y - .45), .45, .9, facecolor=TIER_COLORS[tier],
                                       edgecolor="w", lw=.5))
    ax.text(left, -.6, "weights", ha="center", va="bottom", fontsize=7)
    ax.text(right + .25 * (len(w.batches) - 1), -.6, "KV cache", ha="center", va="bottom", fontsize=7)


def _layer_axis(ax, g: Grid, layers: range, fontsize: int) -> None:
    if len(layers) <= 40:
        ax.set_yticks(range(len(layers)), [f"{j} {g.kinds[j]}" for j in layers], fontsize=fontsize)
    else:  # one tick every few decoder blocks, at the block's first (attention) layer
        attn = [j for j in layers if g.kinds[j] == "attn"] or list(layers)
        step = max(1, len(attn) // 24)
        ax.set_yticks([j - layers.start for j in attn[::step]],
                      [f"block {b} ({j})" for b, j in enumerate(attn)][::step], fontsize=fontsize)
    ax.set_ylabel("layer j", fontsize=8)
    ax.tick_params(length=0)


def _legend(ax, g: Grid, w: Window) -> None:
    """Tiers, path, and the corner marks that occur in the window."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    inside = {(i, j, k) for i in w.tokens for j in w.layers for k in w.batches}
    marks = {m: {t for sq, t in g.marks[m].items() if sq in inside} for m in CORNERS}
    used = {g.w_home[j] for j in w.layers} | {g.kv_home[(j, k)] for j in w.layers for k in w.batches
                                               if (j, k) in g.kv_home}
    items = [Patch(color=TIER_COLORS[t], label=t) for t in TIERS if t in used.union(*marks.values())]
    items.append(Line2D([], [], color=PATH_COLOR, lw=1, marker=">", ms=4, label="execution order"))
    for mark, corner in CORNERS.items():
        if marks[mark]:
            sx, sy = np.sign(corner[0])  # the corner's right-angled triangle, filling half the marker
            verts = [(sx, -sy), (-sx, -sy), (sx, sy)]  # marker coordinates grow upwards
            items.append(Line2D([], [], ls="", marker=verts, color="#444", ms=7, label=MARK_LABELS[mark]))
    if inside & g.attn_host:
        items.append(Patch(facecolor="white", edgecolor="#999", hatch="///", label="attention on host"))
    from matplotlib.transforms import offset_copy

    below = offset_copy(ax.transAxes, fig=ax.figure, y=-30, units="points")  # under the x label
    ax.legend(handles=items, loc="upper center", bbox_to_anchor=(.5, 0), bbox_transform=below,
              ncol=min(len(items), 4), fontsize=7, frameon=False)


# --- (b) the whole run, (c) the traversal --------------------------------------------------------------

def _draw_whole(ax, g: Grid, w: Window) -> None:
    """The order grid as an image, tier bars as thin images beside it, the detail window boxed."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    L, T, nb = g.order.shape
    img = g.order.reshape(L, T * nb).astype(float)
    im = ax.imshow(img, cmap=_cmap(), aspect="auto", interpolation="nearest",
                   extent=(-.5, T * nb - .5, L - .5, -.5))
    if T <= 64 and nb > 1:
        for i in range(1, T):
            ax.axvline(i * nb - .5, color="white", lw=.6)
    tiers = ListedColormap([TIER_COLORS[t] for t in TIERS])
    idx = {t: n for n, t in enumerate(TIERS)}
    pad = max(1.0, T * nb / 40)
    ax.imshow(np.array([[idx[t]] for t in g.w_home], float), cmap=tiers, vmin=0, vmax=2, aspect="auto",
              interpolation="nearest", extent=(-2.5 * pad, -1.5 * pad, L - .5, -.5))
    kv = np.full((L, nb), np.nan)
    for (j, k), t in g.kv_home.items():
        kv[j, k] = idx[t]
    x0 = T * nb - .5 + pad
    ax.imshow(kv, cmap=tiers, vmin=0, vmax=2, aspect="auto", interpolation="nearest",
              extent=(x0, x0 + 2 * pad, L - .5, -.5))
    for i in w.tokens:  # the detail window: one box per token step (its batches are adjacent)
        ax.add_patch(Rectangle((i * nb + w.batches.start - .5, w.layers.start - .5), len(w.batches),
                               len(w.layers), fill=False, edgecolor=PATH_COLOR, lw=1.5))
    ax.set_xlim(-2.5 * pad, x0 + 2 * pad)
    step = max(1, T // 16)
    ax.set_xticks([-2 * pad] + [i * nb + (nb - 1) / 2 for i in range(0, T, step)] + [x0 + pad],
                  ["weights"] + [str(i) for i in range(0, T, step)] + ["KV"], fontsize=7)
    ax.set_xlabel(f"token step i (each spans its {nb} GPU batches)", fontsize=8)
    _layer_axis(ax, g, range(L), fontsize=6)
    ax.figure.colorbar(im, ax=ax, label="execution step", shrink=.8, pad=.01)
    ax.set_title("(b) whole run, shade = execution step; red box = (a)", fontsize=9, loc="left")


def draw_traversal(ax, g: Grid, w: Optional[Window] = None, max_cols: int = 1600) -> None:
    """Layer j against execution step, each square a cell coloured by its GPU batch; when several
    steps share an image column, the column shows the mean of their colours. The squares of the
    window w (if any) are marked by red bands."""
    from matplotlib.lines import Line2D

    L, T, nb = g.order.shape
    n = int(g.order.max()) + 1
    img = traversal_image(g, max_cols)
    ax.imshow(img, aspect="auto", interpolation="nearest", extent=(-.5, n - .5, L - .5, -.5))
    sub = g.order[w.layers.start:w.layers.stop, w.tokens.start:w.tokens.stop, w.batches.start:w.batches.stop] \
        if w else np.zeros(0, dtype=np.int64)
    for lo, hi in _runs(np.sort(sub.ravel())):  # at least 1/400 of the axis wide, to stay visible
        mid, half = (lo + hi) / 2, max(hi - lo + 1, n / 400) / 2
        ax.axvspan(mid - half, mid + half, color=PATH_COLOR, alpha=.18, lw=0)
    ax.set_xlim(-.5, n - .5)
    ax.set_xlabel("execution step", fontsize=8)
    ax.set_ylabel("layer j", fontsize=8)
    ax.tick_params(labelsize=7)
    shown = range(min(nb, len(BATCH_COLORS)))
    ax.legend(handles=[Line2D([], [], ls="", marker="s", color=BATCH_COLORS[b], label=f"batch {b}") for b in shown],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False,
              title="GPU batch" + (" (mod 8)" if nb > len(BATCH_COLORS) else ""), title_fontsize=7)
    ax.set_title("(c) traversal: which layer runs at each execution step (colour = GPU batch; mixed "
                 "colours = batches interleaved); red bands = the squares of (a)", fontsize=9, loc="left")


def traversal_image(g: Grid, max_cols: int = 1600) -> np.ndarray:
    """[L, cols, 3] RGB: row j, column = execution step (binned to at most max_cols columns),
    the mean batch colour of the squares of layer j in that column; white where none ran."""
    from matplotlib.colors import to_rgb

    L, T, nb = g.order.shape
    n = int(g.order.max()) + 1
    cols = min(n, max_cols)
    j, _, k = np.indices(g.order.shape)
    rgb = np.array([to_rgb(BATCH_COLORS[b % len(BATCH_COLORS)]) for b in range(nb)])[k.ravel()]
    cell = j.ravel() * cols + g.order.ravel() * cols // n
    img, hits = np.zeros((L * cols, 3)), np.zeros(L * cols)
    np.add.at(img, cell, rgb)
    np.add.at(hits, cell, 1)
    return np.where(hits[:, None] > 0, img / np.maximum(hits, 1)[:, None], 1.0).reshape(L, cols, 3)


def _runs(sorted_steps: np.ndarray):
    """[(first, last)] of the runs of consecutive integers."""
    if not sorted_steps.size:
        return []
    cut = np.flatnonzero(np.diff(sorted_steps) > 1)
    starts = np.r_[sorted_steps[0], sorted_steps[cut + 1]]
    ends = np.r_[sorted_steps[cut], sorted_steps[-1]]
    return list(zip(starts.tolist(), ends.tolist()))


def write_schedule(graph: nx.DiGraph, stem: Path, formats: Sequence[str] = ("png", "svg"),
                   window: Optional[Window] = None) -> List[Path]:
    """The schedule picture of a compiled graph -> stem.<format> for each format; returns the paths."""
    return save(draw_schedule(graph, window=window), stem, formats)
