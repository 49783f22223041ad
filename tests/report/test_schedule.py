"""The schedule picture (graphgen/report/schedule.py): the grid read from a compiled graph, the
detail window with order numbers and path arrows, the whole-run and traversal panels at real size,
files, determinism and drawing time on an OPT-175B plan."""
from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from matplotlib.text import Annotation

from graphgen.build import build_graph
from graphgen.config import compose
from graphgen.models import build_spec, hf_config_from_arch
from graphgen.report.schedule import (BATCH_COLORS, Window, draw_schedule, save, schedule_grid, traversal_image,
                                      write_schedule)
from passes import run_pipeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OFFLOAD = "policy.percent=[0,50,50,50,100,0]"  # weights host/disk, half the caches on host


def compiled(schedule="zigzag", layers=1, tokens=3, batches=4, batch=2, prompt_len=8,
             policy=(OFFLOAD, "policy.cpu_attention=true")):
    """Default: the paper's figure, 3 tokens x 4 layers (embed, attn, mlp, head) x 4 GPU batches."""
    over = [f"model.arch.num_hidden_layers={layers}"] if layers else []
    model = [] if any(p.startswith("model=") for p in policy) else ["model=opt-125m"]
    cfg = compose([*model, f"schedule={schedule}", *over, *policy])
    spec = build_spec(hf_config_from_arch(cfg.model.arch), cfg.model.name)
    g = build_graph(spec, batch=batch, num_batches=batches, prompt_len=prompt_len, gen_len=tokens,
                    dtype=cfg.model.dtype)
    return run_pipeline(g, cfg)


def real(schedule):
    """opt-125m's own shape: 26 layers (embed, 12 x attn + mlp, head), 8 token steps, 4 GPU batches."""
    return compiled(schedule, layers=None, tokens=8, batches=4, batch=4, prompt_len=16)


def panels(fig):
    """(a) detail, (b) whole run, (c) traversal: the figure's axes by title, colour bars left out."""
    named = {ax.get_title(loc="left")[:3]: ax for ax in fig.axes}
    return named.get("(a)"), named.get("(b)"), named.get("(c)")


def numbers(ax):
    return sorted(int(t.get_text()) for t in ax.texts if t.get_text().isdigit())


def arrows(ax):
    """[(dx, dy, solid)] of the path arrows (y grows downwards: +dy = to a later layer)."""
    out = []
    for t in ax.texts:
        if isinstance(t, Annotation):
            (x1, y1), (x0, y0) = t.xy, t.xyann
            out.append((x1 - x0, y1 - y0, t.arrow_patch.get_linestyle() == "-"))
    return out


# --- the grid --------------------------------------------------------------------------------------

def test_row_and_zigzag_grids_differ():
    row, zig = schedule_grid(compiled("row")), schedule_grid(compiled("zigzag"))
    assert row.order.shape == zig.order.shape == (4, 3, 4)  # [layers, tokens, batches]
    assert zig.order[0, 0].tolist() == [0, 1, 2, 3]  # zig-zag: layer 0 of every batch first
    assert row.order[:, 0, 0].tolist() == [0, 1, 2, 3]  # row: batch 0 through every layer first
    # zig-zag loads each offloaded layer's weights once per token, row once per square
    assert len(zig.w_loads) == 4 * 3 and len(row.w_loads) == 4 * 3 * 4
    assert set(zig.w_home) <= {"host", "disk"} and set(zig.kv_home.values()) == {"device", "host"}
    # every KV cache on the host is stored there by its attention square, and never elsewhere
    host_kv = {(j, k) for (j, k), t in zig.kv_home.items() if t == "host"}
    assert {(j, k) for (_, j, k) in zig.marks["kv_store"]} == host_kv
    assert set(zig.marks["kv_store"].values()) == {"host"}


# --- small graphs: the whole grid in detail -------------------------------------------------------

def test_small_graph_is_numbered_square_by_square():
    fig = draw_schedule(compiled("zigzag"))
    a, b, c = panels(fig)
    assert len(fig.axes) == 1 and b is None and c is None  # the window is the whole grid
    assert numbers(fig.axes[0]) == list(range(48))
    assert len(arrows(fig.axes[0])) == 47


def test_schedule_picture_files_are_deterministic(tmp_path):
    g = compiled("zigzag")
    first = write_schedule(g, tmp_path / "one" / "sched", ["png", "svg"])
    again = write_schedule(g, tmp_path / "two" / "sched", ["png", "svg"])
    assert [p.suffix for p in first] == [".png", ".svg"]
    assert first[0].read_bytes()[:8] == PNG_MAGIC and ET.parse(first[1]).getroot().tag.endswith("svg")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]


# --- real size: opt-125m, 4 GPU batches -------------------------------------------------------------

@pytest.fixture(scope="module")
def real_figs():
    return {s: (schedule_grid(g := real(s)), draw_schedule(g)) for s in ("zigzag", "row")}


def test_real_size_detail_has_order_numbers_and_path(real_figs):
    for sched, (g, fig) in real_figs.items():
        assert g.order.shape == (26, 8, 4)
        a, b, c = panels(fig)
        assert a and b and c and b.images and c.images
        # (a): the first two token steps x the first 7 layers x all 4 batches, each square numbered
        assert numbers(a) == sorted(g.order[:7, :2, :].ravel().tolist())
        assert len(arrows(a)) == 7 * 2 * 4 - 1
        assert len(a.patches) > 7 * 2 * 4  # squares, corner marks, tier bars


def test_real_size_zigzag_and_row_look_different(real_figs):
    (zg, zfig), (rg, rfig) = real_figs["zigzag"], real_figs["row"]
    za, ra = panels(zfig)[0], panels(rfig)[0]
    # (a): zig-zag's solid arrows run across the batches of a layer, row's down the layers of a batch
    assert {(dx, dy) for dx, dy, solid in arrows(za) if solid} == {(1, 0)}
    assert {(dx, dy) for dx, dy, solid in arrows(ra) if solid} == {(0, 1)}
    # (a): the weight-load corners: once per layer and token in zig-zag, on every square in row
    assert len(zg.w_loads) == 26 * 8 and len(rg.w_loads) == 26 * 8 * 4
    # (c): row's columns each hold one batch's colour in runs; zig-zag changes batch every step
    batch_of = {tuple(np.round(to, 6)) for to in traversal_image(rg).reshape(-1, 3).tolist()}
    assert batch_of <= {(1.0, 1.0, 1.0)} | {tuple(np.round(_rgb(c), 6)) for c in BATCH_COLORS[:4]}
    assert not np.array_equal(traversal_image(zg), traversal_image(rg))


def _rgb(c):
    from matplotlib.colors import to_rgb

    return to_rgb(c)


def test_detail_into_a_given_axes(real_figs):
    from graphgen.report.schedule import new_figure

    ax = new_figure(8, 5).add_subplot()
    fig = draw_schedule(real("row"), ax=ax)
    assert fig.axes == [ax] and not ax.images  # panel (a) alone: no whole-run or traversal image
    assert numbers(ax) == sorted(real_figs["row"][0].order[:7, :2, :].ravel().tolist())
    assert "detail: tokens 0-1 of 8, layers 0-6 of 26, all 4 GPU batches" in ax.get_title()


def test_window_is_chosen_and_checked():
    g = real("zigzag")
    fig = draw_schedule(g, window=Window(range(3, 4), range(10, 14), range(1, 3)))
    a = panels(fig)[0]
    grid = schedule_grid(g)
    assert numbers(a) == sorted(grid.order[10:14, 3:4, 1:3].ravel().tolist())
    with pytest.raises(ValueError, match="layers=range\\(20, 30\\).*0..25"):
        draw_schedule(g, window=Window(range(2), range(20, 30), range(4)))


# --- big graphs: bounded drawing time -----------------------------------------------------------------

def test_opt_175b_plan_draws_in_seconds(tmp_path):
    """25k squares (194 layers x 16 tokens x 8 batches): the picture keeps (a) small and draws
    (b) and (c) as images, so it takes seconds; the traversal image mixes zig-zag's batches."""
    g = compiled("zigzag", layers=None, tokens=16, batches=8, batch=8, prompt_len=512,
                 policy=["model=opt-175b", "model.dtype=float16", "policy=disk-offload", "hardware.host_mem=2TB",
                        "hardware.disk_mem=10TB"])
    t0 = time.perf_counter()
    fig = draw_schedule(g)
    path, = save(fig, tmp_path / "big", ["png"])
    took = time.perf_counter() - t0
    assert took < 30, f"drawing 25k squares took {took:.1f} s"
    assert path.stat().st_size > 10_000
    a = panels(fig)[0]
    assert len(numbers(a)) == 2 * 7 * 8  # the window only, not 25k text labels
    img = traversal_image(schedule_grid(g))
    assert img.shape == (194, 1600, 3)
    pure = {tuple(np.round(_rgb(c), 6)) for c in BATCH_COLORS} | {(1.0, 1.0, 1.0)}
    assert any(tuple(np.round(px, 6)) not in pure for px in img.reshape(-1, 3).tolist())


def test_detail_window_from_config(tmp_path):
    from graphgen.report.files import detail_window, write_visuals

    g = real("zigzag")
    cfg = compose(["viz.schedule=true", "viz.formats=[png]", "viz.detail_tokens=[3,3]", "viz.detail_layers=[10,13]"])
    assert detail_window(cfg.viz, g) == Window(range(3, 4), range(10, 14), range(4))
    path, = write_visuals(cfg, g, out=tmp_path / "run")
    assert path.name == "schedule-zigzag.png" and path.read_bytes()[:8] == PNG_MAGIC
    bad = compose(["viz.schedule=true", "viz.formats=[png]", "viz.detail_layers=[20,30]"])
    with pytest.raises(ValueError, match=r"viz.detail_layers=\[20, 30\].*<= 25"):
        write_visuals(bad, g, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before anything was written
