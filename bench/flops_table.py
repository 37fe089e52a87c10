"""FLOPs per frame of ViTDet-B and ViViT-B in the paper convention, beside the paper's figures.

    .venv/bin/python bench/flops_table.py [--skip-eventful]

Dense counts run on meta tensors (no arithmetic). The eventful ViTDet-B at 672 px ("temporal"
layout: delta attention in the 4 global blocks, gated token-wise ops everywhere) is transformed
once on real weights (random init; counts do not depend on values) and counted at each r with
``count_flops(..., policy=r)``, for our exact delta attention and the paper's scheme.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evtrace  # noqa: E402
from evtrace.cost.count import count_flops  # noqa: E402
from models_zoo import vitdet_b, vivit_b  # noqa: E402

PAPER_PUBLISHED = {512: 60.7, 1024: 115.1}  # ICCV 2023, ViTDet-B ImageNet VID, 672 px
PAPER_CODE = {256: 32.9, 512: 60.2, 1024: 114.9}  # its implementation's steady-state counts


def dense_rows() -> list[str]:
    rows = []
    for size, published in ((672, 174.5), (1024, 467.4)):
        with torch.device("meta"):
            model = vitdet_b(img_size=size, with_pyramid=False).eval()
        count = count_flops(model, torch.empty(1, 3, size, size, device="meta"))
        rows.append(f"| ViTDet-B backbone, dense, {size} px | {count.gflops:.2f} G | {published} G |")
    with torch.device("meta"):
        model = vivit_b(num_frames=32, img_size=320, num_classes=300).eval()
    count = count_flops(model, torch.empty(1, 3, 32, 320, 320, device="meta"))
    rows.append(f"| ViViT-B, one view (320 px, 32 frames) | {count.gflops:.1f} G | |")
    rows.append(f"| ViViT-B, 12 views | {12 * count.gflops / 1e3:.2f} T | 7.12 T |")
    return rows


def eventful_rows() -> list[str]:
    torch.manual_seed(0)
    model = vitdet_b(img_size=672, with_pyramid=False).eval()
    x = torch.randn(1, 3, 672, 672)
    rows = []
    for mode in ("exact", "paper"):
        start = time.perf_counter()
        emodel = evtrace.transform(model, x, policy=512, attention=mode)
        built = time.perf_counter() - start
        for r in (256, 512, 1024):
            count = count_flops(emodel, x, policy=r)
            rows.append(
                f"| eventful 672 px, attention={mode}, r={r} | {count.gflops:.2f} G "
                f"(first frame {count.first_frame / 1e9:.2f}) | {PAPER_PUBLISHED.get(r, '-')} G "
                f"| {PAPER_CODE[r]} G |"
            )
        report = emodel.report()
        rows.append(
            f"| state per stream, attention={mode} | ours {report.costs.state_bytes() / 1e9:.3f} GB "
            f"| paper layout {report.costs.paper_state_bytes() / 1e9:.3f} GB | (transform {built:.0f} s) |"
        )
    return rows


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-eventful", action="store_true", help="dense rows only (seconds)")
    options = parser.parse_args()
    print("| model | ours (paper convention) | paper | paper's code, steady |")
    print("|---|---|---|---|")
    for row in dense_rows():
        print(row, flush=True)
    if not options.skip_eventful:
        for row in eventful_rows():
            print(row, flush=True)


if __name__ == "__main__":
    main()
