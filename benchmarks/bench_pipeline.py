"""1 process vs a 2-stage pipeline (torchrun, gloo) on this machine, one thread each, on a model that
does not fit one process's memory budget: measured and predicted tok/s side by side.

    python benchmarks/bench_pipeline.py [--model opt-350m] [--budget 450MB] [--gen 16]

One process holds what fits its hardware.device_mem budget and reads the rest of the weights from
disk every step (policy.percent: the largest device share, in steps of 5%, that the plan fits);
two processes each hold half the layers within the same budget. The prediction is the simulator
on this machine's measured profile (hardware=auto, measured with one thread) plus the link between
the two processes, measured here by a gloo ping-pong.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from graphgen import LLM, distributed  # noqa: E402
from graphgen.compile import compile, spec_for, workload_shape  # noqa: E402
from graphgen.config import compose  # noqa: E402
from graphgen.perf.costmodel import CostModel, simulate  # noqa: E402
from graphgen.perf.profile import hardware_profile  # noqa: E402
from graphgen.verify import PassError  # noqa: E402


def overrides(a, offload: str):
    return [f"model={a.model}", "model.weights=dummy", "model.dtype=bfloat16", f"workload.prompt_len={a.prompt}",
            f"workload.gen_len={a.gen}", f"policy.gpu_batch_size={a.gbs}", f"policy.num_gpu_batches={a.nb}",
            f"hardware.device_mem={a.budget}", "hardware.host_mem=0", f"hardware.offload_dir={offload}",
            "report.progress=false"]


def single_policy(a, offload: str):
    """The largest device share of the weights (rest on disk) whose plan fits the budget."""
    for p in range(100, -1, -5):
        cfg = compose(overrides(a, offload) + [f"policy.percent=[{p},0,100,0,100,0]", "parallel.stages=1"])
        try:
            compile(spec_for(cfg), cfg, workload_shape(cfg))
            return cfg
        except PassError:
            continue
    raise SystemExit(f"nothing fits hardware.device_mem={a.budget}: raise --budget")


def run(cfg) -> dict:
    w = cfg.workload
    ids = torch.randint(4, 1000, (cfg.policy.gpu_batch_size * cfg.policy.num_gpu_batches, w.prompt_len),
                        generator=torch.Generator().manual_seed(0))
    with LLM(config=cfg) as llm:
        llm.generate(ids[:, :4], max_new_tokens=2)  # warm-up: weights placed, kernels loaded
        llm.generate(ids, max_new_tokens=w.gen_len)
        st = distributed.gather_report(llm.last_stats)  # the measured call's figures only
    return st


def worker(a) -> None:
    offload = tempfile.mkdtemp(prefix="bench-pipeline-")
    cfg = distributed.setup(compose(overrides(a, offload) + ["policy.percent=[100,0,100,0,100,0]"]))
    net = distributed.measure_link(50)
    st = run(cfg)
    if distributed.is_reporter():
        Path(a.worker).write_text(json.dumps({"stats": st, "net": net}, default=str))
    distributed.teardown()


def predicted(cfg, profile) -> float:
    g = compile(spec_for(cfg), cfg, workload_shape(cfg))
    return simulate(g, CostModel(profile, cfg.model.dtype, "cpu")).total_tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-350m")
    ap.add_argument("--budget", default="450MB", help="hardware.device_mem of each process")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--gbs", type=int, default=4)
    ap.add_argument("--nb", type=int, default=2, help="GPU batches = micro-batches of the pipeline")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as offload:
        one_cfg = single_policy(a, offload)
        print(f"load before: {os.getloadavg()}; 1 process: policy.percent={list(one_cfg.policy.percent)} "
              f"within hardware.device_mem={a.budget}", flush=True)
        one = run(one_cfg)
        out = Path(offload) / "pipeline.json"
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(port.getsockname()[1]), __file__, "--worker", str(out)] + \
            [f"--{k}={v}" for k, v in vars(a).items() if k != "worker"]
        port.close()
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        res = json.loads(out.read_text())
        two, net = res["stats"], res["net"]
        profile = dict(hardware_profile(compose(["hardware=auto"])), **net)
        two_cfg = compose(overrides(a, offload) + ["policy.percent=[100,0,100,0,100,0]", "parallel.stages=2"])
        p1, p2 = predicted(one_cfg, profile), predicted(two_cfg, profile)
    print(f"link (gloo, measured): latency {net['net_latency_s'] * 1e6:.0f} us, {net['net_bw'] / 1e9:.2f} GB/s")
    print(f"{'':<14}{'measured tok/s':>15}{'predicted tok/s':>17}")
    print(f"{'1 process':<14}{one['total_tok_s']:>15.2f}{p1:>17.2f}")
    print(f"{'2 stages':<14}{two['total_tok_s']:>15.2f}{p2:>17.2f}   stages {two.get('stages') and [s['layers'] for s in two['stages']]}, "
          f"bubble fraction {two.get('bubble_fraction', 0):.0%}")
    print(f"{'2 / 1':<14}{two['total_tok_s'] / one['total_tok_s']:>15.2f}{p2 / p1:>17.2f}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
