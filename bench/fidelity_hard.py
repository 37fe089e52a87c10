"""Fidelity on hard video (issue 13): DINOv2-S/14 (real weights) + its saliency decoder on every
stream of evtrace.tools.hard_video, for TopK, AdaptiveBudget, the paper's uniform TopK without
scene cuts, relative Threshold, AdaptiveBudget under a staleness bound, and GateAllocation (one
budget split across gates by accumulated error; fixed and AdaptiveBudget totals).

    python bench/fidelity_hard.py [--frames 40] [--out out/fidelity_hard]

Writes fidelity_hard.md, fidelity_hard.png and fidelity_hard.json (the same as
``evtrace fidelity --suite hard``), and the scene-cut precision/recall table (cuts.md): the
default detector against the previous one (input change energy against its running mean).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from evtrace.runtime.scene_cut import SceneCutDetector
from evtrace.tools import fidelity
from evtrace.tools.hard_video import continuous_clips, hard_streams, score_cuts


class EnergyDetector:
    """The detector evtrace had before issue 13: mean squared input change against its running
    mean (factor 4), reset after a cut."""

    def __init__(self, factor: float = 4.0):
        self.factor, self.previous, self.ema = factor, None, None

    def __call__(self, x: torch.Tensor) -> bool:
        if self.previous is None:
            self.previous = x.clone()
            return False
        change = float((x - self.previous).square().mean())
        self.previous = x.clone()
        if self.ema is not None and change > self.factor * max(self.ema, 1e-12):
            self.ema = None
            return True
        self.ema = change if self.ema is None else 0.9 * self.ema + 0.1 * change
        return False


def cut_table(size: int = 224) -> str:
    streams = hard_streams(40, size, 14) + continuous_clips(size, 14)
    rows = [
        "| stream | frames | cuts | default detector fired | caught / false "
        "| energy (old) fired | caught / false |",
        "|---|---|---|---|---|---|---|",
    ]
    totals = {"new": [0, 0, 0], "old": [0, 0, 0]}
    for s in streams:
        new = SceneCutDetector()
        a = score_cuts(s, lambda x, d=new: bool(d.update(x)[0]))
        b = score_cuts(s, EnergyDetector())
        for key, sc in (("new", a), ("old", b)):
            totals[key][0] += sc.caught
            totals[key][1] += len(s.cuts)
            totals[key][2] += sc.false
        rows.append(
            f"| {s.name} | {len(s)} | {', '.join(map(str, s.cuts)) or '-'} "
            f"| {', '.join(map(str, a.fired)) or '-'} "
            f"| {a.caught}/{len(s.cuts)} / {a.false} | {', '.join(map(str, b.fired)) or '-'} "
            f"| {b.caught}/{len(s.cuts)} / {b.false} |"
        )
    frames = sum(len(s) for s in streams)
    new, old = totals["new"], totals["old"]
    rows.append(
        f"| **all** | {frames} | {new[1]} | | {new[0]}/{new[1]} / {new[2]} | | {old[0]}/{old[1]} / {old[2]} |"
    )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", default="out/fidelity_hard")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cuts", action="store_true", help="skip the scene-cut table")
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.65, 0.55, 0.45, 0.35, 0.25, 0.15],
        help="average budgets (fractions of N) of the TopK and AdaptiveBudget sweeps",
    )
    p.add_argument(
        "--allocation",
        type=float,
        nargs="*",
        default=[0.45, 0.35, 0.25, 0.15],
        help="targets of the GateAllocation sweeps (a fixed total, and an AdaptiveBudget total)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not args.no_cuts:
        table = cut_table(args.size)
        (out / "cuts.md").write_text(table + "\n")
        print(table, flush=True)
    n = (args.size // 14) ** 2 + 1
    policies = fidelity.hard_policies(
        n,
        fractions=tuple(args.fractions),
        taus=(0.1, 0.15),
        stale=(0.35,),
        allocation=tuple(args.allocation),
        adaptive_allocation=tuple(args.allocation),
    )
    fidelity.run_hard(
        out, frames=args.frames, size=args.size, policies=policies, log=lambda m: print(m, flush=True)
    )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
