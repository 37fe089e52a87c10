"""Packed oneDNN linears against F.linear at the row counts of sparse and dense frames.

Prints a table: for the linear shapes of ViT-B (768 -> 2304, 768, 3072; 3072 -> 768) and
ViT-S (384 -> 1152), the median time of ``F.linear`` and of ``PackedLinear`` (the weight packed
once), and their ratio, from 1 to 1604 rows (r gathered tokens of one or a few streams; 197 and
401 are whole ViT-B frames). ``MAX_PACKED_ROWS`` in ``evtrace/runtime/packed.py`` comes from
this table. ``python bench/packed_linear.py [--threads 2] [--repeats 30]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evtrace.runtime.packed import PackedWeights, packing_available  # noqa: E402

SHAPES = ((768, 2304), (768, 768), (768, 3072), (3072, 768), (384, 1152))
ROWS = (1, 7, 32, 50, 64, 100, 197, 401, 800, 1604)


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def row(k: int, n: int, rows: int, weight: torch.Tensor, bias: torch.Tensor, repeats: int) -> str:
    x = torch.randn(rows, k)
    # the packed kernel called directly, bypassing the MAX_PACKED_ROWS cut-off: this table sets it
    packed_weight = PackedWeights().get(weight, rows)

    def packed_linear():
        return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")

    plain = median_ms(lambda: F.linear(x, weight, bias), repeats)
    packed = median_ms(packed_linear, repeats)
    reference = F.linear(x, weight, bias)
    diff = float((packed_linear() - reference).abs().max() / reference.abs().max())
    return f"| {k} -> {n} | {rows} | {plain:.3f} | {packed:.3f} | {plain / packed:.2f}x | {diff:.1e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not packing_available():
        sys.exit("this torch build has no oneDNN packed linear kernels (torch.backends.mkldnn)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU, {args.threads} threads, fp32, medians of {args.repeats}")
    print("| in -> out | rows | F.linear ms | packed ms | speedup | max relative difference |")
    print("|---|---|---|---|---|---|")
    for k, n in SHAPES:
        weight, bias = torch.randn(n, k), torch.randn(n)
        with torch.inference_mode():
            for rows in ROWS:
                print(row(k, n, rows, weight, bias, args.repeats), flush=True)


if __name__ == "__main__":
    main()
