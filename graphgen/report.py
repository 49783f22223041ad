"""The run report: throughput (prefill / decode / total), batch, peaks per tier, bytes moved."""
from __future__ import annotations

import json
from typing import Dict


def gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def format_report(st: Dict) -> str:
    lines = [
        f"model {st['model']} ({st['weights']} weights), schedule {st['schedule']}, executor {st['executor']}",
        f"prompts {st['num_prompts']} x prompt_len {st['prompt_len']} -> gen_len {st['gen_len']}; "
        f"effective batch {st['effective_batch']} = {st['gpu_batch_size']} x {st['num_gpu_batches']} GPU batches",
        f"throughput  prefill {st['prefill_tok_s']:.1f} tok/s   decode {st['decode_tok_s']:.1f} tok/s   "
        f"total {st['total_tok_s']:.2f} tok/s   (prefill {st['prefill_s']:.2f} s, decode {st['decode_s']:.2f} s)",
        "peak memory   tier     planned      measured     budget",
    ]
    for tier in ("device", "host", "disk"):
        lines.append(f"              {tier:<7}  {gb(st['planned_peak_bytes'][tier]):>11}  "
                     f"{gb(st['measured_peak_bytes'][tier]):>11}  {gb(st['budget_bytes'][tier]):>11}")
    moved = st.get("bytes_moved", {})
    real = {k: v for k, v in moved.items() if k.split("->")[0] != k.split("->")[1]}
    if real:
        lines.append("bytes moved   " + "   ".join(f"{k} {gb(v)}" for k, v in sorted(real.items())))
    return "\n".join(lines)


def to_json(st: Dict) -> str:
    return json.dumps(st, indent=2, sort_keys=True)
