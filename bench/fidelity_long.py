"""Fidelity over a whole hard clip (issue 13's 250-frame measurement): DINOv2-S/14 (real weights)
and its saliency decoder on the whole ``bikes`` clip (fast motion, five scene cuts), every frame
against the dense model, for the default policy (SteeredThreshold) and a sweep of average budgets.

    python bench/fidelity_long.py [--clip bikes] [--fractions 0.5 0.4 0.3] [--out out/fidelity_long]

Prints and writes (``fidelity_long.md``) per policy the mean tokens per gate, GFLOPs, cosine and
saliency CC mean / worst frame, refreshes, and the smallest budget at which mean >= 0.99 and
worst >= 0.95 hold over the whole clip (the issue's question: at 50 % of the tokens per gate?).
Scene cuts are on (the default detector) for every policy but the paper's uniform TopK.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from evtrace.runtime.policies import AdaptiveBudget, SteeredThreshold, Threshold, TopK
from evtrace.tools import fidelity
from evtrace.tools.hard_video import continuous_clips
from models_zoo.dinov2_saliency import load_dinov2_saliency


def policies(tokens: int, fractions: list[float], taus: list[float]) -> list:
    specs = []
    for f in fractions:
        specs.append(
            ("SteeredThreshold", f"SteeredThreshold(target={f:g})", lambda f=f: SteeredThreshold(f), {})
        )
    for f in fractions:
        specs.append(("AdaptiveBudget", f"AdaptiveBudget(target={f:g})", lambda f=f: AdaptiveBudget(f), {}))
    for f in fractions:
        r = max(1, round(f * tokens))
        specs.append(("TopK", f"TopK(r={r})", lambda r=r: TopK(r), {}))
    r = round(0.5 * tokens)
    specs.append(
        ("TopK, no scene cut (paper)", f"TopK(r={r}), scene_cut=None", lambda: TopK(r), {"scene_cut": None})
    )
    for tau in taus:
        specs.append(
            (
                "Threshold (relative)",
                f"Threshold(tau={tau:g}, relative)",
                lambda t=tau: Threshold(t, relative=True),
                {},
            )
        )
    return specs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default="bikes", help="a whole clip of hard_video.continuous_clips")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.4, 0.3])
    p.add_argument("--taus", type=float, nargs="*", default=[0.12, 0.2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="out/fidelity_long")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    streams = [s for s in continuous_clips(args.size) if s.name == args.clip]
    if not streams:
        names = [s.name for s in continuous_clips(args.size)]
        raise SystemExit(f"--clip {args.clip!r} is not one of the whole clips {names}")
    model = load_dinov2_saliency(img_size=args.size).eval()
    tokens = (args.size // 14) ** 2 + 1
    points = fidelity.evaluate_hard(
        model.backbone,
        streams,
        policies(tokens, args.fractions, args.taus),
        decoder=model.decoder,
        progress=lambda m: print(m, flush=True),
    )
    seconds = time.perf_counter() - start
    stream = streams[0]
    text = (
        f"# Fidelity over the whole {stream.name} clip ({len(stream)} frames, cuts at "
        f"{', '.join(map(str, stream.cuts)) or 'none'}), {args.size} px\n\n"
        + fidelity.hard_stream_table(points)
        + "\n\n## Smallest budget with mean >= 0.99 and worst >= 0.95 (cosine and CC)\n\n"
        + fidelity.smallest_budget(points)
        + f"\n\nTotal time {seconds:.0f} s.\n"
    )
    (out / "fidelity_long.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
