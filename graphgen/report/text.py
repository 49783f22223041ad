"""The run report: throughput (prefill / decode / total), batch, peaks per tier, bytes and GB/s
per link, I/O-compute overlap (with a trace), the cost model's bound; as text or JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, Optional

from ..config import format_bytes
from ..perf.checks import prediction_warning
from ..perf.profile import remeasure_hint
from ..perf.simulate import predict


def gb(n: float) -> str:
    return format_bytes(n, 3)


def format_report(st: Dict) -> str:
    lines = [
        f"model {st['model']} ({st['weights']} weights{' from ' + st['checkpoint'] if st.get('checkpoint') else ''}), "
        f"schedule {st['schedule']}, executor {st['executor']}",
        f"prompts {st['num_prompts']} x prompt_len {st['prompt_len']} -> gen_len {st['gen_len']}; "
        f"effective batch {st['effective_batch']} = {st['gpu_batch_size']} x {st['num_gpu_batches']} GPU batches",
        *compression_line(st.get("compression") or {}),
        f"throughput  prefill {st['prefill_tok_s']:.1f} tok/s   decode {st['decode_tok_s']:.1f} tok/s   "
        f"total {st['total_tok_s']:.2f} tok/s   (prefill {st['prefill_s']:.2f} s, decode {st['decode_s']:.2f} s)",
    ]
    lines += memory_lines(st)
    moved = st.get("bytes_moved", {})
    real = {k: v for k, v in moved.items() if k.split("->")[0] != k.split("->")[1]}
    if real:
        lines.append(f"bytes moved   {'link':<14} {'bytes':>11}  {'GB/s over run':>13}   {'GB/s while busy':>15}")
        lines += [link_line(k, v, st) for k, v in sorted(real.items())]
    if "overlap_fraction" in st:
        both = st["overlap_fraction"] * st["io_busy_s"]
        span = st.get("trace_span_s") or 0.0
        lines.append(f"overlap       compute busy {st['compute_busy_s']:.2f} s, I/O busy {st['io_busy_s']:.2f} s, "
                     f"{st['overlap_fraction']:.0%} of I/O time hidden under compute; I/O and compute overlapped "
                     f"during {both / span if span else 0:.0%} of the run")
    if st.get("bound_tok_s"):
        lines.append(f"cost model    predicted {st['predicted_tok_s']:.2f} tok/s, bound {st['bound_tok_s']:.2f} tok/s "
                     f"({st.get('bottleneck', '?')}); measured reaches {st['total_tok_s'] / st['bound_tok_s']:.0%}"
                     " of the bound")
    lines += pipeline_lines(st)
    for n, f in enumerate(st.get("files", [])):
        lines.append(("files         " if n == 0 else " " * 14) + f)
    return "\n".join(lines)


def memory_lines(st: Dict) -> list:
    """Peaks per tier (planned, measured, budget) and the process's RAM; per stage in a pipeline."""
    stages = st.get("stages") or [st]
    out = [("peak memory   " + ("stage " if len(stages) > 1 else "")
            + "tier     planned      measured     budget")]
    for d in stages:
        label = f"{d['rank']:<5} " if len(stages) > 1 else ""
        for tier in ("device", "host", "disk"):
            out.append(f"              {label}{tier:<7}  {gb(d['planned_peak_bytes'][tier]):>11}  "
                       f"{gb(d['measured_peak_bytes'][tier]):>11}  {gb(d['budget_bytes'][tier]):>11}")
    for d in stages:
        if "rss_peak_bytes" in d:
            out += measured_lines(d, f"stage {d['rank']}: " if len(stages) > 1 else "")
    return out


def pipeline_lines(st: Dict) -> list:
    """Under torchrun (graphgen/distributed.py): each stage's time, the bubbles, bytes per link."""
    if not st.get("stages"):
        return []
    blocks = st["stages"][0].get("blocks", 1)
    out = [f"pipeline      {len(st['stages'])} stages; bubble fraction {st['bubble_fraction']:.0%} "
           f"(compute idle over stages x the slowest stage's wall time){f', over {blocks} blocks' if blocks > 1 else ''}"]
    for d in st["stages"]:
        busy = "  ".join(f"{k} {v:.2f} s" for k, v in sorted(d["busy_s"].items()))
        hidden = f"; {d['overlap_fraction']:.0%} of I/O hidden under compute" if d.get("io_busy_s") else ""
        out.append(f"  stage {d['rank']}     {d['layers']} layers, wall {d['wall_s']:.2f} s; busy {busy}{hidden}")
    out += [f"  link        {k} {gb(v)} sent" for k, v in sorted(st.get("link_bytes", {}).items())]
    return out


def measured_lines(st: Dict, who: str = "") -> list:
    """Measured peaks (the 'measured' column above is the tiers' accounting) against the plan."""
    planned = st["planned_peak_bytes"]
    ram_plan = planned["host"] + (planned["device"] if st.get("device_type") == "cpu" else 0)
    grew = st["rss_peak_bytes"] - st["rss_start_bytes"]
    limit = ram_plan + st["overhead_bytes"]
    what = "device + host" if st.get("device_type") == "cpu" else "host"
    out = [f"measured      {who}RAM: the process grew {gb(grew)} during the run (RSS peak {gb(st['rss_peak_bytes'])}); "
           f"plan ({what}) {gb(ram_plan)} + stated overhead {gb(st['overhead_bytes'])} = {gb(limit)}"]
    if grew <= limit:
        out.append("              within what the plan accounts for")
    else:  # RSS moves with the allocator from run to run: say what an excess means, not just OVER
        out.append(f"              {gb(grew - limit)} more than the plan accounts for: not an error (the tier budgets "
                   "hold the plan), memory outside it (allocator caches, libraries); if RAM is tight, "
                   f"lower hardware.host_mem{' / device_mem' if st.get('device_type') == 'cpu' else ''} by that much")
    if st.get("device_type") == "cuda":
        out.append(f"              GPU: CUDA max allocated {gb(st['cuda_peak_bytes'])}, plan {gb(planned['device'])}")
    return out


def compression_line(comp: Dict) -> list:
    """One line when weights or the cache are stored quantised (passes/compress.py), else none."""
    parts = [f"{what} {c['bits']}-bit g{c['group_size']} ({gb(c['bytes'])}, {c['ratio']:.0%} of dense)"
             for what, c in (("weights", comp.get("weight")), ("cache", comp.get("cache"))) if c]
    return ["compression   " + ", ".join(parts)] if parts else []


def link_line(link: str, nbytes: int, st: Dict) -> str:
    """Bytes over one link; GB/s over the whole generate time, and while that link was busy (trace)."""
    secs = st["prefill_s"] + st["decode_s"]
    busy = st.get("link_busy_s", {}).get(link)
    run_rate = f"{nbytes / secs / 1e9:.3f}" if secs else "-"
    busy_rate = f"{nbytes / busy / 1e9:.3f}" if busy else "-" if link.startswith("stage") else "- (no trace)"
    return f"              {link:<14} {gb(nbytes):>11}  {run_rate:>13}   {busy_rate:>15}"


def add_prediction(st: Dict, cfg, graph) -> None:
    """The cost model's prediction and bound for this graph, when hardware.profile is configured or
    hardware=auto (measured once, then cached; another empty profile is not measured behind a run's
    back); a warning on stderr (and in the report) when the run is more than 2x off its prediction."""
    hw = cfg.hardware
    if graph is None or not (hw.profile or hw.name == "auto"):
        return
    pr = predict(cfg, graph)
    st.update(predicted_tok_s=pr.total_tok_s, bound_tok_s=pr.bound_tok_s, bottleneck=pr.bottleneck)
    fix = (f"hardware={hw.name}'s profile describes another machine; for this one use hardware=auto"
           if hw.profile else f"the cached profile of this machine is stale or was measured under other load. "
           f"{remeasure_hint(hw.device)}")
    warning = prediction_warning(st.get("total_tok_s", 0.0), pr.total_tok_s, fix)
    if warning:
        st["prediction_warning"] = warning
        print(f"graphgen: warning: {warning}", file=sys.stderr)


def to_json(st: Dict) -> str:
    return json.dumps(st, indent=2, sort_keys=True)


def emit(st: Dict, cfg, out_dir=None, text: Optional[str] = None) -> None:
    """Print the report: text on stdout; with report.json, JSON on stdout (text on stderr) and report.json."""
    text = format_report(st) if text is None else text
    if not cfg.report.json:
        print(text)
        return
    print(text, file=sys.stderr)
    if out_dir is not None:
        path = Path(out_dir) / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        st["files"] = list(st.get("files", [])) + [str(path)]
        path.write_text(to_json(st) + "\n")
    print(to_json(st))
