"""The paper's ViViT setting: ViViT-B factorised encoder, eventful over the time steps of a view.

    .venv/bin/python bench/time_steps.py                    # counts, then speed (one view, CPU)
    .venv/bin/python bench/time_steps.py --skip-speed       # counts only (seconds)
    .venv/bin/python bench/time_steps.py --repeats 5 --threads 2 --out docs/time_steps.md

EPIC-Kitchens configuration of the paper's code (WISION-Lab/eventful-transformer): 32 frames at
320 px, 2x16x16 tubelets (16 time steps of 400 + 1 tokens), 12 views per video, random weights.
Counts: ``evtrace.count_flops`` per call (one view) in the paper convention, TopK(k) at every
gate, beside the paper's code (measured with it: dense 593.5 G, k = 60 / 100 / 140: 128.2 /
188.1 / 247.9 G per view) and the sympy model's value. Speed: one view on the CPU, the eventful
model against the fastest dense model for the same weights (explicit and SDPA attention), every
repeat timing all of them in turn (medians; ratios from the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evtrace  # noqa: E402
from evtrace.runtime.packed import packing_available, with_packed_linears  # noqa: E402
from evtrace.runtime.policies import TopK  # noqa: E402
from evtrace.tools.bench import compile_settings  # noqa: E402
from models_zoo import vivit_b  # noqa: E402

PAPER_CODE = {60: 128.2, 100: 188.1, 140: 247.9}  # G per view, the paper's code, its convention
PAPER_DENSE = 593.5
VIEWS_PER_VIDEO = 12


def _model(frames: int, size: int, sdpa: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return vivit_b(num_frames=frames, img_size=size, num_classes=300, use_sdpa=sdpa).eval()


def count_rows(frames: int, size: int) -> list[str]:
    model = _model(frames, size)
    clip = torch.randn(1, 3, frames, size, size)
    dense = evtrace.count_flops(model, clip).steady / 1e9
    rows = [
        "| setting | per view | per video (12 views) | fewer than dense | the paper's code, per view "
        "| ours / paper's code |",
        "|---|---|---|---|---|---|",
        f"| dense | {dense:.1f} G | {dense * VIEWS_PER_VIDEO / 1e3:.2f} T | 1.00x | {PAPER_DENSE} G | "
        f"{dense / PAPER_DENSE:.4f} |",
    ]
    for mode in ("paper", "exact"):
        for k in sorted(PAPER_CODE):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                emodel = evtrace.transform(model, clip, TopK(k), attention=mode, stream_axis="steps")
            count = evtrace.count_flops(emodel, clip).steady / 1e9
            formula = emodel.report().costs.steady() / 1e9
            assert abs(formula - count) < 1e-9, (formula, count)  # the sympy model agrees, exactly
            paper = PAPER_CODE[k] if mode == "paper" else None
            rows.append(
                f"| {mode} attention, k = {k} | {count:.1f} G | {count * VIEWS_PER_VIDEO / 1e3:.2f} T | "
                f"{dense / count:.2f}x | {paper if paper else '-'} G | "
                f"{f'{count / paper:.4f}' if paper else '-'} |"
            )
    return rows


def _median_time(fn, clip, repeats_done: list[float]) -> None:
    start = time.perf_counter()
    fn(clip)
    repeats_done.append(time.perf_counter() - start)


def speed_rows(
    frames: int, size: int, k: int, repeats: int, threads: int, compiled: bool = False
) -> list[str]:
    torch.set_num_threads(threads)
    explicit = _model(frames, size)
    sdpa = _model(frames, size, sdpa=True)
    sdpa.load_state_dict(explicit.state_dict())
    clip = torch.randn(1, 3, frames, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eventful = {
            mode: evtrace.transform(explicit, clip, TopK(k), attention=mode, stream_axis="steps")
            for mode in ("exact", "paper")
        }
    runners = {"dense (explicit attention)": explicit, "dense (SDPA)": sdpa}
    if packing_available():
        runners["dense (SDPA, packed linears)"] = with_packed_linears(sdpa)
    runners |= {f"eventful k={k}, {mode} attention": m for mode, m in eventful.items()}
    settings = contextlib.nullcontext()
    if compiled:  # both sides compiled the same way: inductor freezing packs the linears
        settings = compile_settings(freeze=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin = evtrace.transform(sdpa, clip, TopK(k), stream_axis="steps")
        runners["dense (SDPA), compiled, frozen"] = torch.compile(sdpa, fullgraph=True)
        runners[f"eventful k={k}, exact attention, compiled, frozen"] = torch.compile(twin, fullgraph=True)
    times: dict[str, list[float]] = {name: [] for name in runners}
    with settings, torch.no_grad() if compiled else torch.inference_mode():
        for name, run in runners.items():  # warm-up: two calls (the first call of a stream differs)
            start = time.perf_counter()
            run(clip)
            run(clip)
            if compiled:
                print(f"  warm-up {name}: {time.perf_counter() - start:.0f} s", flush=True)
        for repeat in range(repeats):
            for name, run in runners.items():
                _median_time(run, clip, times[name])
            print(
                f"  repeat {repeat + 1}/{repeats}: "
                + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items())
            )
    medians = {name: statistics.median(t) for name, t in times.items()}
    fastest_dense = min(medians[n] for n in medians if n.startswith("dense"))  # compiled ones too
    rows = ["| model | median s per view | vs the fastest dense |", "|---|---|---|"]
    for name, value in medians.items():
        rows.append(f"| {name} | {value:.2f} | {fastest_dense / value:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--k", type=int, default=100, help="tokens per gate for the speed rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time both models under torch.compile with inductor freezing (the eventful "
        "compile takes about 8 minutes here)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the tables as markdown here")
    args = parser.parse_args()
    lines = [f"### Counts: ViViT-B, {args.frames} frames at {args.size} px, one view (paper convention)", ""]
    print("counting ...", flush=True)
    lines += count_rows(args.frames, args.size)
    print("\n".join(lines), flush=True)
    if not args.skip_speed:
        speed = [
            "",
            f"### Speed: one view, CPU, {args.threads} threads, {args.repeats} repeats interleaved (medians)",
            "",
        ]
        speed += speed_rows(args.frames, args.size, args.k, args.repeats, args.threads, args.compile)
        print("\n".join(speed), flush=True)
        lines += speed
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
