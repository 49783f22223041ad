"""FlexGen's Table 3 (pipeline parallelism, 1 -> 4 machines x 1 T4) on graphgen's simulator:
predicted generation throughput for 1 and 4 stages next to the published figures.

    python benchmarks/flexgen_table3.py [--models 6.7b 30b 175b]

1 stage: conf/experiment/flexgen-opt-<m>-t4.yaml; 4 stages: flexgen-opt-<m>-4xt4.yaml (FlexGen's
own 4x1 benchmark policies; the network bandwidth is assumed, see those files). Published:
Sheng et al., ICML 2023, Table 3 (generation throughput, tok/s, prompt 512, gen 32).
"""
from __future__ import annotations

import argparse
import time

from graphgen.config import compose
from graphgen.perf.simulate import predict

PUBLISHED = {"6.7b": (25.26, 201.12), "30b": (7.32, 23.61), "175b": (0.69, 2.33)}


def row(m: str):
    out = []
    for exp in (f"flexgen-opt-{m}-t4", f"flexgen-opt-{m}-4xt4"):
        t0 = time.perf_counter()
        pr = predict(compose([f"experiment={exp}"]))
        out.append((pr, time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    args = ap.parse_args()
    print(f"{'model':<9}{'published 1 -> 4':>20}{'x':>7}   {'predicted 1 -> 4':>20}{'x':>7}   "
          f"{'pred/pub 1':>10}{'pred/pub 4':>11}   4-stage bubbles")
    for m in args.models:
        (p1, _), (p4, t4) = row(m)
        a, b = PUBLISHED[m]
        print(f"opt-{m:<5}{a:>9.2f} -> {b:>7.2f}{b / a:>7.2f}   {p1.total_tok_s:>9.2f} -> {p4.total_tok_s:>7.2f}"
              f"{p4.total_tok_s / p1.total_tok_s:>7.2f}   {p1.total_tok_s / a:>10.2f}{p4.total_tok_s / b:>11.2f}   "
              f"{p4.bubble_fraction:.0%} (simulated in {t4:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
