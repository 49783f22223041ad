"""Linear-layer kernels on this CPU, per weight shape and row count: what executors/packed.py picks.

For each matrix [N, K] (SmolLM2-135M's by default) and each number of input rows M, the best
time (ms) of y = x @ W.T, x [M, K] bf16, computed by:
  bf16         F.linear on the dense bf16 matrix
  bf16-onednn  the matrix prepacked once into oneDNN's layout (mkldnn._linear_pointwise)
  int4-kernel  torch's _weight_int4pack_mm_for_cpu (groups of 32 along K: GGUF Q4_0 / Q4_1's blocks)
  int4-dense   the same packed weight unpacked to bf16 (PackedWeight.dense), then F.linear
  int4-deq     graphgen's 4-bit group-wise format dequantised to bf16, then F.linear
  int8-kernel  torch's _weight_int8pack_mm (per-output-channel int8)
  int8-deq     per-channel int8 dequantised (codes * scale) to bf16, then F.linear
  q8_0-deq     GGUF Q8_0 (int8 codes, a scale per block of 32) dequantised to bf16, then F.linear
  q8_0-int4x2  Q8_0's codes as two int4 halves (16 hi + lo) on the int4 kernel, [M, 2K] input
  torchao-int8 torchao's Int8WeightOnlyConfig (--torchao). torchao 0.18's CPU int4 weight
               (prototype Int4OpaqueTensor) calls the same aten op as int4-kernel, so it is not repeated.
The weight bytes each kernel reads are printed beside, so the table shows where fewer bytes pay.
By default each matrix has distinct copies (--cold-mb of bf16 in all) used in turn, so its weights
come from RAM as in a decode step (30 layers: ~270 MB bf16), not from the 32 MB cache.

    python benchmarks/bench_packed_kernels.py --threads 2 [--rows 1,16,64] [--reps 10] [--cold-mb 64] [--torchao]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_ms  # noqa: E402
from executors.packed import PackedWeight, pack, wrap  # noqa: E402
from executors.quant import dequantize, quantize  # noqa: E402

SHAPES = {"qo 576x576": (576, 576), "kv 192x576": (192, 576), "up/gate 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}


def kernels(w: torch.Tensor, with_ao: bool):
    """name -> (weight bytes, fn(x)) for the float32 matrix w [N, K]; the packed ones as
    executors/packed.py stores and computes them (int4 from graphgen's 4-bit groups of 32, Q8_0
    from an 8-bit checkpoint's blocks of 32)."""
    N, K = w.shape
    wb = w.bfloat16()
    out = {"bf16": (wb.nbytes, lambda x: F.linear(x, wb))}
    pre = {}  # oneDNN's layout is chosen for the row count: reordered on the first call with x

    def onednn(x):
        if x.shape[0] not in pre:
            pre[x.shape[0]] = torch.ops.mkldnn._reorder_linear_weight(wb, x.shape[0])
        return torch.ops.mkldnn._linear_pointwise(x, pre[x.shape[0]], None, "none", [], "")
    out["bf16-onednn"] = (wb.nbytes, onednn)
    q4, q8 = quantize(w, 4, 32, -1), quantize(w, 8, 32, -1)
    i4 = packed_weight(w, 4)
    out["int4-kernel"] = (i4.a.nbytes + i4.b.nbytes, i4._int4)
    out["int4-dense"] = (i4.a.nbytes + i4.b.nbytes, lambda x: F.linear(x, i4.dense()))
    out["int4-deq"] = (q4.nbytes, lambda x: F.linear(x, dequantize(q4, torch.bfloat16)))
    i8 = packed_weight(w, 8)
    out["int8-kernel"] = (i8.a.nbytes + i8.b.nbytes, lambda x: torch.ops.aten._weight_int8pack_mm(x, i8.a, i8.b))
    out["int8-deq"] = (i8.a.nbytes + i8.b.nbytes, lambda x: F.linear(x, i8.dense()))
    out["q8_0-deq"] = (q8.nbytes, lambda x: F.linear(x, dequantize(q8, torch.bfloat16)))
    h = packed_weight(w, 8, stored=q8)
    out["q8_0-int4x2"] = (h.a.nbytes + h.b.nbytes, h._int4)
    if with_ao:
        out.update(torchao_kernels(wb))
    return out


def packed_weight(w: torch.Tensor, bits: int, stored=None) -> PackedWeight:
    """w as executors/packed.py holds it in bf16 (stored: a checkpoint's exact parts, e.g. Q8_0)."""
    comp = (bits, 32, -1)
    spec = SimpleNamespace(name="w", shape=tuple(w.shape), compressible=True)
    layer = SimpleNamespace(kind="mlp", weights=[spec], stored=comp if stored is not None else None)
    parts = None if stored is None else {"data": stored.data, "mins": stored.mins, "scales": stored.scales}
    return wrap(layer, pack(layer, spec, w, comp, parts), comp, torch.bfloat16)["w"]


def torchao_kernels(wb: torch.Tensor):
    """torchao's weight-only quantised linears on this CPU (each skipped, with why, if it fails)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_  # optional peer

    out = {}
    for name, cfg in (("torchao-int8", Int8WeightOnlyConfig),):
        lin = torch.nn.Linear(wb.shape[1], wb.shape[0], bias=False, dtype=torch.bfloat16)
        lin.weight.data.copy_(wb)
        try:
            quantize_(lin, cfg())
            lin(torch.randn(2, wb.shape[1], dtype=torch.bfloat16))
        except Exception as e:  # a config this torchao build cannot run on the CPU
            print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            continue
        out[name] = (0, lambda x, lin=lin: lin(x))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from: " + ", ".join(SHAPES))
    ap.add_argument("--torchao", action="store_true", help="also torchao's weight-only configs")
    ap.add_argument("--cold-mb", type=int, default=64,
                    help="bf16 MB of distinct copies per matrix, cycled (0: one copy, hot in the caches)")
    args = ap.parse_args()
    unknown = [n for n in args.shapes.split(",") if n not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {', '.join(map(repr, unknown))}; the names are: {', '.join(SHAPES)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.reps}, ms")
    with torch.no_grad():
        for name in args.shapes.split(","):
            N, K = SHAPES[name]
            w = torch.randn(N, K) * 0.02
            print(f"\n{name}: " + "".join(f"{'rows ' + str(r):>11}" for r in rows) + "   weight MB")
            # cold: enough distinct copies of each matrix that they cannot stay in the caches
            # (a decode step reads every layer's weights from RAM once), cycled call by call
            copies = max(1, min(32, -(-args.cold_mb * 2**20 // (N * K * 2)))) if args.cold_mb else 1
            sets = [kernels(w * (1 + c / 64), args.torchao) for c in range(copies)]
            table = {}
            for r in rows:
                x = torch.randn(r, K, dtype=torch.bfloat16)
                for kname, (nbytes, _) in sets[0].items():
                    fns = [s[kname][1] for s in sets]
                    ms = best_ms(lambda: [fn(x) for fn in fns], args.reps) / copies
                    table.setdefault(kname, [nbytes]).append(ms)
            for kname, (nbytes, *ms) in table.items():
                print(f"  {kname:<14}" + "".join(f"{t:11.3f}" for t in ms) + f"{nbytes / 1e6:11.2f}", flush=True)


if __name__ == "__main__":
    main()
