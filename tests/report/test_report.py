"""Pictures and exports (the schedule picture: test_schedule.py): timeline, Chrome trace, GraphML / DOT, the run's files,
the report (text and JSON) and the progress bar. Files are checked for being well formed."""
from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import networkx as nx
import pytest

from graphgen import LLM  # before executors: executors/base.py imports graphgen
from graphgen.build import build_graph, squares
from graphgen.config import compose
from graphgen.models import build_spec, hf_config_from_arch
from graphgen.progress import Progress
from graphgen.report.text import format_report
from graphgen.run import run
from graphgen.report.metrics import trace_metrics
from graphgen.report.timeline import chrome_trace, stages_chrome_trace, write_chrome_trace, write_timeline
from graphgen.report.files import write_dot, write_graphml
from executors.trace import Event, Trace
from passes import run_pipeline

from ..conftest import left_padded_batch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OFFLOAD = "policy.percent=[0,50,50,50,100,0]"  # weights host/disk, half the caches on host


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def is_svg(path: Path) -> bool:
    return ET.parse(path).getroot().tag.endswith("svg")


def compiled(schedule="zigzag", layers=1, tokens=3, batches=4, extra=()):
    """The paper's figure: 3 tokens x 4 layers (embed, attn, mlp, head) x 4 GPU batches; no weights."""
    cfg = compose(["model=opt-125m", f"schedule={schedule}", f"model.arch.num_hidden_layers={layers}", OFFLOAD,
                   "policy.cpu_attention=true", *extra])
    spec = build_spec(hf_config_from_arch(cfg.model.arch), cfg.model.name)
    g = build_graph(spec, batch=2, num_batches=batches, prompt_len=8, gen_len=tokens, dtype="float32")
    return run_pipeline(g, cfg)


# --- graph export ------------------------------------------------------------------------------------

def test_graphml_and_dot(tmp_path):
    g = compiled("zigzag")
    back = nx.read_graphml(write_graphml(g, tmp_path / "g.graphml"))
    assert (back.number_of_nodes(), back.number_of_edges()) == (g.number_of_nodes(), g.number_of_edges())
    assert back.nodes["(0, 1, 2)"]["kind"] == "attn" and back.nodes["(0, 1, 2)"]["order"] == 6
    dot = write_dot(g, tmp_path / "g.dot").read_text()
    assert dot.startswith("digraph graphgen {") and dot.rstrip().endswith("}")
    assert sum(" -> " in ln for ln in dot.splitlines()) == g.number_of_edges()
    assert dot.count('"') % 2 == 0


# --- trace: metrics, chrome trace, timeline ---------------------------------------------------

def ev(stream, start, end, nbytes=0, link="", name="x"):
    return Event(stream, name, start, end, nbytes, {"device": int(start * 100), "host": 5, "disk": 0}, link)


def test_trace_metrics_from_events():
    events = [ev("compute", 0, 2), ev("load", 1, 3, 2_000_000_000, "host->device"),
              ev("store", 3, 4, 1_000_000_000, "device->disk"), ev("disk-io-0", 3, 4)]
    m = trace_metrics(events)
    assert m["compute_busy_s"] == 2 and m["io_busy_s"] == 3
    assert m["overlap_fraction"] == pytest.approx(1 / 3)  # 1 s of the 3 s of I/O ran under compute
    assert m["link_bytes"] == {"host->device": 2_000_000_000, "device->disk": 1_000_000_000}
    assert m["link_gbps"] == {"host->device": 1.0, "device->disk": 1.0}
    assert trace_metrics([]) == {}


@pytest.fixture(scope="module", params=["reference", "async"])
def traced(request, opt_ckpt, tmp_path_factory):
    """A real run of the tiny random OPT with offloading and a trace: (llm, trace, graph, blocks)."""
    off = tmp_path_factory.mktemp("offload")
    llm = LLM(str(opt_ckpt[0]), ["model.dtype=float32", OFFLOAD, "policy.gpu_batch_size=2",
                                 "policy.num_gpu_batches=2", "executor.trace=true", f"hardware.offload_dir={off}",
                                 f"executor.name={request.param}"])
    ids, mask = left_padded_batch(6)
    with llm:
        llm.generate(ids, attention_mask=mask, max_new_tokens=3)
        yield llm, llm.executor.trace, llm.graph, 2  # 6 prompts = 2 blocks of 2 x 2


def test_trace_has_one_event_per_executed_op(traced, tmp_path):
    llm, trace, graph, blocks = traced
    assert len(trace.events) == blocks * len(graph.graph["ops"])
    data = json.loads(write_chrome_trace(trace, tmp_path / "trace.json", graph).read_text())
    xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(trace.events)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in xs)
    threads = {e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert threads == {"load", "compute", "store"}
    assert any(e["ph"] == "C" and set(e["args"]) == {"device", "host", "disk"} for e in data["traceEvents"])


def test_run_stats_carry_trace_metrics(traced):
    st = traced[0].last_stats
    assert 0.0 <= st["overlap_fraction"] <= 1.0
    moved = {k: v for k, v in st["bytes_moved"].items() if k.split("->")[0] != k.split("->")[1]}
    assert st["link_bytes"] == moved and set(st["link_busy_s"]) == set(moved)
    text = format_report(st)
    assert "overlap" in text and "GB/s" in text and "host->device" in text


def test_timeline_files(traced, tmp_path):
    _, trace, graph, _ = traced
    png, svg = write_timeline(trace, tmp_path / "timeline", ["png", "svg"], graph)
    assert is_png(png) and is_svg(svg)


def test_chrome_trace_of_any_executor_streams():
    """An async executor's trace (overlapping streams, disk I/O threads) exports too."""
    tr = Trace(t0=0.0)
    tr.events = [ev("load", 0, 1, 10, "disk->device", "('load', 'w', 1, 0)"), ev("compute", .5, 2, name="(0, 1, 0)"),
                 ev("disk-io-1", 0, 1, 10)]
    names = [e["args"]["name"] for e in chrome_trace(tr)["traceEvents"] if e["name"] == "thread_name"]
    assert names == ["load", "compute", "disk-io-1"]


def test_pipeline_trace_is_one_file_with_a_process_track_per_rank(tmp_path):
    """Under torchrun rank 0 writes every rank's events (graphgen/distributed.py gather_traces) into one
    trace.json: one process per rank, named, on one time axis (each rank's start on the wall clock)."""
    ranks = [{"rank": 0, "t0_wall": 100.0, "events": [ev("compute", 0, 1), ev("send", 1, 1.1, 64, "stage0->stage1")]},
             {"rank": 1, "t0_wall": 100.5, "events": [ev("recv", 0, 0.7, 64, "stage0->stage1"), ev("compute", .7, 2)]}]
    data = json.loads(write_chrome_trace(None, tmp_path / "trace.json", None, ranks).read_text())["traceEvents"]
    assert data == stages_chrome_trace(ranks)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in data if e["name"] == "process_name"}
    assert procs == {1: "stage 0 (rank 0)", 2: "stage 1 (rank 1)"}
    threads = {(e["pid"], e["args"]["name"]) for e in data if e["name"] == "thread_name"}
    assert threads == {(1, "compute"), (1, "send"), (2, "recv"), (2, "compute")}
    start = {(e["pid"], e["cat"]): e["ts"] for e in data if e["ph"] == "X"}
    assert start[(1, "compute")] == 0 and start[(2, "recv")] == pytest.approx(0.5e6)  # rank 1 began 0.5 s later
    assert {e["pid"] for e in data if e["ph"] == "C"} == {1, 2}  # memory per rank


# --- the CLI job: files in the run directory, JSON report, dry run, progress bar -------------

def cli_cfg(opt_ckpt, tmp_path, *extra):
    return compose([f"model.path={opt_ckpt[0]}", "model.name=opt-tiny", "model.dtype=float32", OFFLOAD,
                    "policy.gpu_batch_size=2", "policy.num_gpu_batches=2", "workload.prompt_len=6",
                    "workload.gen_len=3", f"hardware.offload_dir={tmp_path / 'off'}",
                    f"viz.out_dir={tmp_path / 'run'}", *extra])


def test_run_writes_every_file_and_json_report(opt_ckpt, tmp_path, capsys):
    cfg = cli_cfg(opt_ckpt, tmp_path, "viz.schedule=true", "viz.timeline=true", "viz.graph=true",
                  "report.json=true")
    st = run(cfg)
    names = sorted(Path(f).name for f in st["files"])
    assert names == ["graph.dot", "graph.graphml", "report.json", "schedule-zigzag.png", "schedule-zigzag.svg",
                     "timeline.png", "timeline.svg", "trace.json"]
    assert all(Path(f).parent == tmp_path / "run" for f in st["files"])
    out = capsys.readouterr()
    printed = json.loads(out.out)  # stdout is the JSON report alone; the text goes to stderr
    assert printed["total_tok_s"] > 0 and "overlap_fraction" in printed and "throughput" in out.err
    assert json.loads((tmp_path / "run" / "report.json").read_text())["gen_len"] == 3


def test_dry_run_draws_without_running(opt_ckpt, tmp_path, capsys):
    st = run(cli_cfg(opt_ckpt, tmp_path, "viz.schedule=true", "job=plan", "viz.formats=[png]"))
    assert st["dry_run"] and [Path(f).name for f in st["files"]] == ["schedule-zigzag.png"]
    assert is_png(Path(st["files"][0])) and "nothing was run" in capsys.readouterr().out


def test_bad_format_is_named(tmp_path):
    from graphgen.report.files import write_visuals

    cfg = compose(["model=opt-125m", "viz.schedule=true", "viz.formats=[jpg]"])
    with pytest.raises(ValueError, match="viz.formats"):
        write_visuals(cfg, compiled(), out=tmp_path)


def test_progress_counts_every_square_and_is_quiet_off_a_terminal(opt_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    calls = []

    class Spy(Progress):
        def __call__(self, node):
            calls.append(node)
            super().__call__(node)

    monkeypatch.setattr("graphgen.api.Progress", Spy)
    llm = LLM(str(opt_ckpt[0]), ["model.dtype=float32", "policy.gpu_batch_size=2", "policy.num_gpu_batches=1"])
    with llm:
        llm.generate(*left_padded_batch(4), max_new_tokens=2)
        per_block = sum(1 for _ in squares(llm.graph))
    assert len(calls) == 2 * per_block  # 4 prompts = 2 blocks
    bar = Progress(1, 10, 5)
    assert bar.bar.disable  # stderr is not a TTY: no bar
    bar.close()


def test_schedule_picture_shows_pipeline_stages():
    from graphgen.report.schedule import stages_title

    from ..passes.test_partition_stages import staged

    g, _ = staged(2, names=None, stage_layers=[5, 5])
    sends = [m for m in g.graph["ops"] if g.nodes[m].get("op") == "send"]
    assert f"2 pipeline stages of [5, 5] layers; {len(sends)} sends" in stages_title(g)
    assert stages_title(staged(1, names=None)[0]) == ""
