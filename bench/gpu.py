"""One prepared run on an accelerator: exactness, the fixed cost and the speed table, fp32 and bf16.

    python bench/gpu.py                                  # CUDA: vit_b16, dinov2_s14, vitdet_b
    python bench/gpu.py --models tiny --device cpu       # a dry run of the script itself
    python bench/gpu.py --markdown out/gpu.md

Per model and dtype, against the fastest dense variant of the same weights (explicit or SDPA
attention; the oneDNN-packed variants are CPU-only), all runners interleaved frame by frame in
one process, CUDA-synchronised wall times, medians:

- exactness: ``policy=All()`` against the original on every frame (max error relative to the
  output scale);
- fixed cost: the same frame again, a frame with one patch changed (default policy), as % of
  the fastest dense frame;
- speed on moving real frames: the default policy and ``TopK(N/4)``, speedup and the FLOP ratio
  of each (paper convention, steady state).

Sized to finish in under 8 minutes on one H100 with the defaults (a few frames per case).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evtrace  # noqa: E402
from evtrace.tools.bench import MODELS, _clip_frames, dense_variants  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.float().abs().max().clamp_min(1e-12)
    return float((got.float() - want.float()).abs().max() / scale)


def _one_patch_changed(x: torch.Tensor, patch: int) -> torch.Tensor:
    y = x.clone()
    y[..., :patch, :patch] += 0.5
    return y


def run_model(name: str, dtype_name: str, device: torch.device, frames_n: int, clip: str) -> list[dict]:
    spec = MODELS[name]
    dtype = DTYPES[dtype_name]
    model = spec.build().eval()
    frames = [x.to(device=device, dtype=dtype) for x in _clip_frames(spec, model, clip, frames_n + 2)]
    model = model.to(device=device, dtype=dtype)
    dense = {k: v.to(device=device, dtype=dtype) for k, v in dense_variants(model, packed=False).items()}
    rows = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = evtrace.transform(model, frames[0], policy=evtrace.All())
        exact = max(_relative(full(x), model(x)) for x in frames[:4])

        default = evtrace.transform(model, frames[0])
        topk = evtrace.transform(model, frames[0], policy=evtrace.TopK(max(1, spec.tokens // 4)))
        flops_dense = evtrace.count_flops(model, frames[0])
        ratios = {
            "default": flops_dense.gflops / evtrace.count_flops(default, frames[0]).gflops,
            "TopK(N/4)": flops_dense.gflops / evtrace.count_flops(topk, frames[0]).gflops,
        }
        for m in (default, topk):
            m.reset()
            m(frames[0])

        # the fastest dense variant, raced on the moving frames
        dense_times = {k: [] for k in dense}
        for i, x in enumerate(frames[1:]):
            for k in list(dense)[i % len(dense) :] + list(dense)[: i % len(dense)]:
                dense_times[k].append(_timed(lambda k=k, x=x: dense[k](x), device))
        fastest = min(dense_times, key=lambda k: statistics.median(dense_times[k]))
        dense_fn = dense[fastest]

        # moving frames: both policies and the fastest dense, interleaved
        moving = {"dense": [], "default": [], "TopK(N/4)": []}
        runners = {"dense": dense_fn, "default": default, "TopK(N/4)": topk}
        for i, x in enumerate(frames[1:]):
            order = list(runners)[i % 3 :] + list(runners)[: i % 3]
            for k in order:
                moving[k].append(_timed(lambda k=k, x=x: runners[k](x), device))
        d = statistics.median(moving["dense"])
        for k in ("default", "TopK(N/4)"):
            e = statistics.median(moving[k])
            rows.append(
                dict(
                    model=name,
                    dtype=dtype_name,
                    case=f"moving, {k}",
                    dense_ms=1e3 * d,
                    ms=1e3 * e,
                    speedup=d / e,
                    flop_ratio=ratios[k],
                    quotient=d / e / ratios[k],
                    exact=exact,
                    fastest=fastest,
                )
            )

        # fixed cost with the default policy: the same frame again, one patch changed
        last = frames[-1]
        same, one, dense_again = [], [], []
        for _ in range(frames_n):
            dense_again.append(_timed(lambda: dense_fn(last), device))
            same.append(_timed(lambda: default(last), device))
            changed = _one_patch_changed(last, spec.patch)
            one.append(_timed(lambda changed=changed: default(changed), device))
            default(last)
        d = statistics.median(dense_again)
        for case, times in (("same frame again", same), ("one patch changed", one)):
            e = statistics.median(times)
            rows.append(
                dict(
                    model=name,
                    dtype=dtype_name,
                    case=case,
                    dense_ms=1e3 * d,
                    ms=1e3 * e,
                    speedup=d / e,
                    flop_ratio=None,
                    quotient=None,
                    exact=exact,
                    fastest=fastest,
                    percent_of_dense=100 * e / d,
                )
            )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| model | dtype | case | fastest dense | dense ms | eventful ms | % of dense | speedup | "
        "FLOP ratio | speedup / FLOP ratio | All() max rel. error |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        ratio = "" if r["flop_ratio"] is None else f"{r['flop_ratio']:.2f}x"
        quotient = "" if r["quotient"] is None else f"{r['quotient']:.2f}"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['case']} | {r['fastest']} | {r['dense_ms']:.2f} | "
            f"{r['ms']:.2f} | {100 * r['ms'] / r['dense_ms']:.0f} % | {r['speedup']:.2f}x | {ratio} | "
            f"{quotient} | {r['exact']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_b16,dinov2_s14,vitdet_b")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--clip", default="bigbuckbunny")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for a dry run)")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; known: {sorted(MODELS)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}",
        flush=True,
    )
    rows = []
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            start = time.perf_counter()
            try:
                rows.extend(run_model(name, dtype_name, device, args.frames, args.clip))
            except Exception as error:  # one failing model is a line of the report, not the end of the run
                print(f"{name} {dtype_name}: FAILED {type(error).__name__}: {error}", flush=True)
            print(f"{name} {dtype_name}: {time.perf_counter() - start:.0f} s", flush=True)
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
