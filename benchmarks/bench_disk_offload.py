"""Disk offload: graphgen vs HF Accelerate disk offload, same checkpoint, budget and lengths.

Both read the same dummy-weight bf16 safetensors checkpoint (written once under --work-dir);
the same share of the weights (--disk-fraction, >= 50%) lives on disk, the rest in RAM:
- HF: from_pretrained(device_map="auto", max_memory={"cpu": RAM share of the weights},
  offload_folder=...): Accelerate reads the disk layers at every forward (from the checkpoint).
- graphgen: the same share on disk (read in place from the checkpoint with O_DIRECT, no copy),
  layers spread so that disk and RAM layers alternate (policy.weight_overrides: each disk read
  then overlaps the compute of RAM layers), the KV cache in RAM with CPU attention, a zig-zag
  block of --gbs x (as many GPU batches as the budget allows) sequences.
Honest disk: the page cache is dropped before each run; during HF's run the checkpoint's pages
are also dropped before every forward pass (--hf-page-cache drop; HF's RAM-resident layers are
private copies), as O_DIRECT keeps graphgen off the page cache: a "disk" layer is read from the
disk at every pass by both (this machine's RAM is much larger than the budget, so without that
the page cache would quietly hold the "disk" layers).
Memory: one RAM budget for both = the RAM share of the weights + --work-mem (KV cache,
activations, buffers). HF's batch counts only if its process's anonymous memory grows by no more
than that (sampled every 5 ms; file pages of the checkpoint are not counted against it);
graphgen takes the most GPU batches whose plan fits (host + device tiers, less the RAM-homed weights
the device tier counts again: on a CPU a host -> device "load" is the same memory); its measured
RSS growth is printed beside the budget.
Bound for graphgen's policy, per token pass i (prefill, then each decode step):
    t_i = max(disk bytes read at pass i / disk read GB/s,  compute time of pass i)
the disk rate measured in this run (cold O_DIRECT reads of the checkpoint), the compute time
measured by running the same schedule and batch with every weight in RAM (no I/O at all);
bound = generated tokens / sum(t_i). (The FLOP roofline, FLOPs / bf16 matmul peak, is printed
too: on a CPU, decode matmuls are bound by memory bandwidth, far below that.)

    python benchmarks/bench_disk_offload.py --model opt-6.7b          # the issue's size (hours here)
    python benchmarks/bench_disk_offload.py --model opt-1.3b          # what we ran (see docs/performance.md)
    python benchmarks/bench_disk_offload.py --model opt-125m --hf-batches 1,4 --gbs 4 --gen-len 4 --work-mem 0.3GB
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (LLM, Run, best, drop_page_cache, free, graphgen_generate, hf_dummy_model,  # noqa: E402
                    hf_generate, machine, matmul_peak, parse_ints, prompts)
from executors.memory import keep_freed_memory  # noqa: E402
from executors.disk_io import FileIO, aligned_empty  # noqa: E402
from graphgen.compile import BlockShape, compile, spec_for  # noqa: E402
from graphgen.config import compose, parse_bytes  # noqa: E402
from graphgen.verify import PassError  # noqa: E402


# --- setup --------------------------------------------------------------------------------------

def checkpoint(model: str, work: Path) -> Path:
    """A dummy-weight bf16 safetensors checkpoint of `model`, written once."""
    path = work / f"{model}-dummy-bf16"
    if not (path / "config.json").exists():
        t = time.perf_counter()
        m = hf_dummy_model(model, torch.bfloat16)
        m.save_pretrained(path, safe_serialization=True, max_shard_size="100GB")
        free(m)
        print(f"  wrote {path} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def weight_files(path: Path):
    return sorted(path.glob("*.safetensors"))


def disk_read_bw(path: Path, threads: int, limit: int = 2 << 30) -> float:
    """Cold sequential O_DIRECT read of the checkpoint, as the disk tier reads: bytes/s."""
    drop_page_cache()
    io = FileIO(threads, direct=True)
    f = str(weight_files(path)[0])
    n = min(os.path.getsize(f), limit) // 4096 * 4096
    buf = aligned_empty(n)
    t = time.perf_counter()
    io.read_into(f, [(0, buf, n)])
    bw = n / (time.perf_counter() - t)
    io.close()
    return bw


class AnonPeak:
    """Peak growth of this process's anonymous memory (RssAnon), sampled every 5 ms."""

    def __enter__(self):
        self.base = self.peak = _anon()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _anon())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _anon() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) * 1024


# --- HF Accelerate ---------------------------------------------------------------------------------

def drop_files(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def run_hf(args, ckpt: Path, batch: int, ram_weights: int, budget: int) -> Run:
    from transformers import AutoModelForCausalLM

    free()  # the previous run's memory back to the OS: a clean base to measure from
    drop_page_cache()
    with AnonPeak() as mem:
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="auto", max_memory={"cpu": ram_weights},
                                                     offload_folder=str(Path(args.offload_dir) / "hf"),
                                                     dtype=torch.bfloat16).eval()
        with torch.no_grad():  # RAM-resident layers as private copies, not pages of the checkpoint file
            for p in model.parameters():
                if p.device.type == "cpu":
                    p.data = p.data.clone()
        load = time.perf_counter() - t
        if args.hf_page_cache == "drop":
            files = weight_files(ckpt)
            model.register_forward_pre_hook(lambda *_: drop_files(files))
        drop_page_cache()
        r = hf_generate(model, prompts(batch, args.prompt_len), args.gen_len)
        on_disk = sum(d == "disk" for d in model.hf_device_map.values())
        n_mod = len(model.hf_device_map)
        del model
    over = mem.growth > budget
    r.note = (f"{on_disk}/{n_mod} modules on disk; load {load:.0f} s; anon memory +{mem.growth / 1e9:.2f} GB"
              + ("  OVER the budget" if over else ""))
    r.extra.update(over=over, growth=mem.growth)
    return r


# --- graphgen --------------------------------------------------------------------------------------

def interleaved(sizes, disk_fraction: float):
    """Layer homes with about disk_fraction of the bytes on disk, disk layers spread out: each layer
    goes where it keeps the running disk share closest to the target."""
    homes, disk, total = {}, 0, 0
    for j, size in enumerate(sizes):
        total += size
        if abs(disk + size - disk_fraction * total) < abs(disk - disk_fraction * total):
            homes[j], disk = "disk", disk + size
    return homes


def graphgen_config(args, ckpt: Path, nb: int, budget, in_ram: bool = False):
    """The run's typed config: every weight in RAM, then the interleaved disk layers (unless in_ram)."""
    cfg = compose(overrides(args, ckpt, 100, nb, budget))
    if not in_ram:
        spec = spec_for(cfg, ckpt)
        share = args.gg_disk_fraction if args.gg_disk_fraction is not None else args.disk_fraction
        cfg.policy.weight_overrides = interleaved([layer.numel for layer in spec.layers], share)
    return cfg


def overrides(args, ckpt: Path, percent_w_ram: int, nb: int, budget):
    return [f"model.path={ckpt}", f"model.name={ckpt.name}", "model.weights=hf", "model.dtype=bfloat16",
            f"executor.name={args.executor}", f"policy.percent=[0,{percent_w_ram},0,100,100,0]",
            "policy.cpu_attention=true",
            f"policy.gpu_batch_size={args.gbs}", f"policy.num_gpu_batches={nb}", f"hardware.host_mem={budget}",
            f"hardware.device_mem={budget}", f"hardware.offload_dir={Path(args.offload_dir) / 'graphgen'}",
            f"executor.prefetch={args.prefetch}", f"executor.io_threads={args.io_threads}", "executor.trace=true",
            "report.progress=false"]


def fitting_batches(args, ckpt: Path, budget: int) -> int:
    """The most GPU batches (of --gbs) whose plan keeps host + device tiers within the budget."""
    with LLM(config=graphgen_config(args, ckpt, 1, budget)) as llm:
        best_nb = 0
        for nb in range(1, args.max_batches + 1):
            try:
                g = compile(llm.spec, llm.cfg, BlockShape(args.prompt_len, args.gen_len, args.gbs, nb))
            except PassError:
                break
            peaks = g.graph["peak_bytes"]
            if peaks["host"] + peaks["device"] > budget + aliased(g):
                break
            best_nb = nb
    if not best_nb:
        raise SystemExit(f"graphgen: not even one GPU batch of {args.gbs} fits {budget / 1e9:.2f} GB: "
                         f"raise --work-mem or lower --gbs")
    return best_nb


def aliased(graph) -> int:
    """Bytes the plan counts twice on a CPU: the most RAM-homed weights in the device tier at once
    (a host -> device "load" on a CPU is the same memory). Bounded by prefetch + 1 layers."""
    loads = [a["bytes"] for _, a in graph.nodes(data=True) if a.get("op") == "load" and a["src"] == "host"
             and a["tensor"][0] == "w"]
    return sum(sorted(loads)[-(graph.graph.get("prefetch", 2) + 1):])


def run_graphgen(args, ckpt: Path, nb: int, budget, in_ram: bool, who: str) -> Run:
    free()
    with LLM(config=graphgen_config(args, ckpt, nb, budget, in_ram)) as llm:
        n = args.gbs * nb
        t = time.perf_counter()
        llm.generate(prompts(n, 4), max_new_tokens=1)  # places the weights (RAM share read, disk share in place)
        setup = time.perf_counter() - t
        drop_page_cache()
        r = graphgen_generate(llm, prompts(n, args.prompt_len), args.gen_len, who)
        r.note += f" setup {setup:.0f} s"
        r.extra["passes"] = passes(llm.graph)
        r.extra["disk_files"] = sorted(os.listdir(llm.executor.tiers["disk"].root))
    return r


def passes(graph):
    """Per token pass i: (disk bytes read, FLOPs), from the compiled graph."""
    out = {}
    for n, a in graph.nodes(data=True):
        i = a["square"][0] if "square" in a else n[0]
        io, fl = out.get(i, (0, 0.0))
        if a.get("op") == "load" and a["src"] == "disk":
            io += a["bytes"]
        elif "kind" in a:
            fl += a["flops"]
        out[i] = (io, fl)
    return [out[i] for i in sorted(out)]


# --- main -------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-1.3b")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--disk-fraction", type=float, default=0.5, help="share of the weights on disk (>= 0.5)")
    ap.add_argument("--gg-disk-fraction", type=float, default=None,
                    help="graphgen's share of the weights on disk (default: --disk-fraction); more on disk "
                         "leaves more of the same RAM budget to the KV cache, hence a larger batch")
    ap.add_argument("--work-mem", default="1GB", help="RAM beyond the RAM share of the weights, for both")
    ap.add_argument("--hf-batches", default="1,4,16,32,48")
    ap.add_argument("--gbs", type=int, default=16, help="graphgen GPU batch size")
    ap.add_argument("--max-batches", type=int, default=8, help="most GPU batches per zig-zag block tried")
    ap.add_argument("--executor", default="async")
    ap.add_argument("--prefetch", type=int, default=4, help="squares ahead (4 = two layers of a 2-batch block: a disk layer is read during the two layers before it)")
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--hf-page-cache", choices=["drop", "keep"], default="drop",
                    help="drop: checkpoint pages dropped before each HF forward (honest disk); keep: page cache allowed")
    ap.add_argument("--work-dir", default=os.environ.get("GRAPHGEN_BENCH_DIR", "/tmp/graphgen-bench"))
    ap.add_argument("--offload-dir", default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of HF-best / graphgen / compute-only, back to back")
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    args.offload_dir = args.offload_dir or str(work / "offload")
    print(f"machine: {machine()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"allocator: glibc keeps freed memory for reuse, for both sides: {keep_freed_memory()} "
          f"(graphgen's executor.keep_freed_memory; set here so HF runs the same way)")
    ckpt = checkpoint(args.model, work)
    w_bytes = sum(f.stat().st_size for f in weight_files(ckpt))
    ram_w = int(w_bytes * (1 - args.disk_fraction))
    budget = ram_w + parse_bytes(args.work_mem, "--work-mem")
    peak = matmul_peak(torch.bfloat16)
    disk_bw = disk_read_bw(ckpt, args.io_threads)
    print(f"{args.model}: {w_bytes / 1e9:.2f} GB of bf16 weights, {args.disk_fraction:.0%} on disk; prompt "
          f"{args.prompt_len}, gen {args.gen_len}; bf16 matmul peak {peak / 1e9:.1f} GFLOP/s; disk read "
          f"{disk_bw / 1e9:.2f} GB/s (cold O_DIRECT, {args.io_threads} threads)")
    print(f"RAM budget {budget / 1e9:.2f} GB = weights in RAM {ram_w / 1e9:.2f} GB + --work-mem {args.work_mem}",
          flush=True)
    if args.gg_disk_fraction is not None:
        if args.gg_disk_fraction < args.disk_fraction:
            raise SystemExit("--gg-disk-fraction must be >= --disk-fraction (the budget forces that share to disk)")
        print(f"graphgen puts {args.gg_disk_fraction:.0%} of the weights on disk (same RAM budget; the rest "
              f"goes to the KV cache: a larger batch)", flush=True)
    hf = []
    if not args.skip_hf:
        for b in parse_ints(args.hf_batches):
            hf.append(run_hf(args, ckpt, b, ram_w, budget))
            print("  " + hf[-1].row(), flush=True)
    nb = fitting_batches(args, ckpt, budget)
    h = best([r for r in hf if not r.extra.get("over")])
    gs, cs = [], []
    # side by side: the load of a shared machine drifts over minutes, so HF's best batch, graphgen and
    # the compute-only reference run back to back, --repeat times; each side's best run counts
    print(f"side by side, {args.repeat} rounds (HF at its best batch within the budget, graphgen, compute-only):")
    for _ in range(args.repeat):
        if h is not None and args.repeat > 1:
            hf.append(run_hf(args, ckpt, h.batch, ram_w, budget))
            print("  " + hf[-1].row(), flush=True)
        gs.append(run_graphgen(args, ckpt, nb, budget, False, "graphgen"))
        print("  " + gs[-1].row(), flush=True)
        cs.append(run_graphgen(args, ckpt, nb, "10TB", True, "in RAM"))  # the compute-only reference
        print("  " + cs[-1].row() + "  (compute only: every weight in RAM, outside the budget)", flush=True)
    report(args, hf, best(gs), best(cs), peak, disk_bw, budget)


def report(args, hf, g: Run, c: Run, peak: float, disk_bw: float, budget: int) -> None:
    st, per_pass = g.extra, g.extra["passes"]
    dec_c = (c.total_s - c.prefill_s) / max(1, len(per_pass) - 1)
    compute = [c.prefill_s] + [dec_c] * (len(per_pass) - 1)
    t_io = [io / disk_bw for io, _ in per_pass]
    t_bound = sum(max(a, b) for a, b in zip(t_io, compute))
    roof = sum(max(io / disk_bw, fl / peak) for io, fl in per_pass)
    tok = g.batch * g.gen_len
    print("\nresult")
    ok = [r for r in hf if not r.extra.get("over")]
    h = best(ok)
    if h:
        print(f"  HF Accelerate disk offload  best batch within the budget {h.batch:>4}: {h.tok_s:8.3f} tok/s "
              f"(best of its runs)")
    elif hf:
        print("  HF Accelerate disk offload: no batch tried fits the budget; best over it: "
              f"batch {best(hf).batch} {best(hf).tok_s:.3f} tok/s")
    print(f"  graphgen ({args.executor}) batch {g.batch:>4} ({args.gbs} x {g.batch // args.gbs}): {g.tok_s:8.3f} tok/s"
          f"   (prefill {g.prefill_s:.1f} s, decode {g.total_s - g.prefill_s:.1f} s)")
    if h:
        print(f"  ratio graphgen / HF: {g.tok_s / h.tok_s:.1f}x (target >= 10x)")
    print(f"  bound for graphgen's policy: {tok / t_bound:.3f} tok/s = {tok} tokens / {t_bound:.1f} s, summing over "
          f"token passes max(disk bytes / {disk_bw / 1e9:.2f} GB/s, compute time with no I/O):")
    print(f"    prefill: I/O {t_io[0]:.2f} s vs compute {compute[0]:.2f} s;  each of {len(per_pass) - 1} decode passes: "
          f"I/O {t_io[-1]:.2f} s vs compute {dec_c:.2f} s")
    busy_bw = st.get("link_gbps", {}).get("disk->device", 0) * 1e9
    if busy_bw > disk_bw:  # a virtual disk's rate drifts: the bound at the faster rate is the honest one
        t_fast = sum(max(io / busy_bw, b) for (io, _), b in zip(per_pass, compute))
        print(f"  at the {busy_bw / 1e9:.2f} GB/s the disk gave inside graphgen's run (faster than at the start): "
              f"bound {tok / t_fast:.3f} tok/s; graphgen reaches {t_fast / g.total_s:.0%} of it")
    print(f"  graphgen reaches {t_bound / g.total_s:.0%} of the bound (target >= 70%); FLOP roofline "
          f"(FLOPs / {peak / 1e9:.0f} GFLOP/s instead of measured compute): {tok / roof:.3f} tok/s, "
          f"{roof / g.total_s:.0%} of it")
    print(f"  graphgen disk reads: {st['bytes_moved'].get('disk->device', 0) / 1e9:.2f} GB at "
          f"{st.get('link_gbps', {}).get('disk->device', 0):.2f} GB/s while busy; {st.get('overlap_fraction', 0):.0%} "
          f"of I/O time under compute; files in the offload dir: {len(st['disk_files'])} (weights read in place)")
    grew = st.get("rss_peak_bytes", 0) - st.get("rss_start_bytes", 0)
    plan = st["planned_peak_bytes"]
    print(f"  graphgen memory: plan host {plan['host'] / 1e9:.2f} + device {plan['device'] / 1e9:.2f} GB "
          f"(budget {budget / 1e9:.2f} GB); measured RSS +{grew / 1e9:.2f} GB (stated overhead "
          f"{st.get('overhead_bytes', 0) / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
