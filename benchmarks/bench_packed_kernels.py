"""Linear-layer kernels on this CPU, per weight shape and row count: what executors/packed.py picks.

For each matrix [N, K] (SmolLM2-135M's by default) and each number of input rows M, the best
time (ms) of y = x @ W.T, x [M, K] bf16, computed by:
  bf16         F.linear on the dense bf16 matrix
  bf16-onednn  the matrix prepacked once into oneDNN's layout (mkldnn._linear_pointwise)
  int4-kernel  torch's _weight_int4pack_mm_for_cpu (groups of 32 along K: GGUF Q4_0 / Q4_1's blocks)
  int4-deq     graphgen's 4-bit group-wise format dequantised to bf16, then F.linear
  int8-kernel  torch's _weight_int8pack_mm (per-output-channel int8)
  int8-deq     per-channel int8 dequantised (codes * scale) to bf16, then F.linear
  q8_0-deq     GGUF Q8_0 (int8 codes, a scale per block of 32) dequantised to bf16, then F.linear
  torchao-int8 torchao's Int8WeightOnlyConfig (--torchao). torchao 0.18's CPU int4 weight
               (prototype Int4OpaqueTensor) calls the same aten op as int4-kernel, so it is not repeated.
The weight bytes each kernel reads are printed beside, so the table shows where fewer bytes pay.
By default each matrix has distinct copies (--cold-mb of bf16 in all) used in turn, so its weights
come from RAM as in a decode step (30 layers: ~270 MB bf16), not from the 32 MB cache.

    python benchmarks/bench_packed_kernels.py --threads 2 [--rows 1,16,64] [--reps 10] [--cold-mb 128] [--torchao]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from executors.quant import dequantize, quantize  # noqa: E402

SHAPES = {"qo 576x576": (576, 576), "kv 192x576": (192, 576), "up/gate 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576": (49152, 576)}


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def kernels(w: torch.Tensor, rows: int, with_ao: bool):
    """name -> (weight bytes, fn(x)) for the float32 matrix w [N, K]."""
    N, K = w.shape
    wb = w.bfloat16()
    out = {"bf16": (wb.nbytes, lambda x: F.linear(x, wb))}
    pre = torch.ops.mkldnn._reorder_linear_weight(wb, rows)
    out["bf16-onednn"] = (wb.nbytes, lambda x: torch.ops.mkldnn._linear_pointwise(x, pre, None, "none", [], ""))
    q4 = quantize(w, 4, 32, -1)
    codes = torch.cat([q4.data & 15, q4.data >> 4], -1).reshape(N, K).to(torch.int32)
    i4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([q4.scales[..., 0].float(), (q4.mins.float() + 8 * q4.scales.float())[..., 0]], -1)
    sz = sz.transpose(0, 1).contiguous().bfloat16()  # [K/32, N, 2]
    out["int4-kernel"] = (i4.nbytes + sz.nbytes, lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, i4, 32, sz))
    out["int4-deq"] = (q4.nbytes, lambda x: F.linear(x, dequantize(q4, torch.bfloat16)))
    scale = (w.abs().amax(1) / 127).bfloat16()
    i8 = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    out["int8-kernel"] = (i8.nbytes + scale.nbytes, lambda x: torch.ops.aten._weight_int8pack_mm(x, i8, scale))
    out["int8-deq"] = (i8.nbytes + scale.nbytes, lambda x: F.linear(x, i8.to(torch.bfloat16) * scale[:, None]))
    q8 = quantize(w, 8, 32, -1)
    out["q8_0-deq"] = (q8.nbytes, lambda x: F.linear(x, dequantize(q8, torch.bfloat16)))
    h4, hsz = q8_split(q8)
    out["q8_0-int4x2"] = (h4.nbytes + hsz.nbytes, lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
        torch.cat([x, x], -1), h4, 32, hsz))
    if with_ao:
        out.update(torchao_kernels(wb))
    return out


def q8_split(q8):
    """Q8_0-like codes (graphgen 8-bit, groups of 32) as two int4 halves on the int4 kernel: [N, 2K]."""
    N, K = q8.shape
    c = q8.data.reshape(N, K).to(torch.int32)  # 0..255, value = min + scale * c
    hi, lo = c >> 4, c & 15
    d, m = q8.scales[..., 0].float(), q8.mins[..., 0].float()  # [N, K/32]
    codes = torch.cat([hi, lo], 1)
    sz_hi = torch.stack([16 * d, m + 128 * d], -1)  # (hi - 8) * 16d + m + 128d = 16d * hi + m
    sz_lo = torch.stack([d, 8 * d], -1)
    sz = torch.cat([sz_hi, sz_lo], 1).transpose(0, 1).contiguous().bfloat16()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), sz


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
    ap.add_argument("--cold-mb", type=int, default=128,
                    help="bf16 MB of distinct copies per matrix, cycled (0: one copy, hot in the caches)")
    args = ap.parse_args()
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
            copies = max(1, min(64, -(-args.cold_mb * 2**20 // (N * K * 2)))) if args.cold_mb else 1
            table = {}
            for r in rows:
                x = torch.randn(r, K, dtype=torch.bfloat16)
                sets = [kernels(w * (1 + c / 64), r, args.torchao) for c in range(copies)]
                for kname, (nbytes, _) in sets[0].items():
                    fns = [s[kname][1] for s in sets]
                    ms = best_ms(lambda: [fn(x) for fn in fns], args.reps) / copies
                    table.setdefault(kname, [nbytes]).append(ms)
            for kname, (nbytes, *ms) in table.items():
                print(f"  {kname:<14}" + "".join(f"{t:11.3f}" for t in ms) + f"{nbytes / 1e6:11.2f}")


if __name__ == "__main__":
    main()
