"""The fixed cost of an eventful frame: what a frame costs when little or nothing changed.

    python bench/overhead.py                          # zoo ViT-B/16 and the demo's DINOv2-S/14
    python bench/overhead.py --slow                   # + HF Dinov2Model and ViTDet-B 672
    python bench/overhead.py --models vit_b16 --frames 12 --markdown overhead.md

Per model, in one process and interleaved frame by frame (the order rotating each round), the
fastest dense variant (explicit or SDPA attention, with or without packed weights: raced first
on a few frames, as ``evtrace bench`` picks its baseline) against eventful streams of

* ``same frame``: the same frame fed again (nothing changed), default policy;
* ``one token``: two frames that differ in one patch, fed in turn (one token changed per
  frame), default policy;
* ``moving``: real frames (bikes from frame 60, fast motion) at the default policy and at
  ``TopK(N/4)``.

Each stream has its own eventful model (its own state); each is warmed up by two frames first.
Medians of the steady frames; ``% dense`` is the eventful median over the dense median.
Then a profile per case (torch.profiler over a few more frames, after the timing): the time of
the top-level aten ops grouped by where they ran (a gate, an attention module, the stream
control of ``EventfulModel``) and, elsewhere, by op (linears, scatter/gather, other ops); what
the ops leave of the wall time is Python and dispatch (``python``). The profiler adds a few us
per op, so the split is a share, not a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evtrace  # noqa: E402
from evtrace.eventful import EventfulModel  # noqa: E402
from evtrace.runtime import attention as attention_mod  # noqa: E402
from evtrace.runtime.gates import TokenGate  # noqa: E402
from evtrace.runtime.policies import TopK  # noqa: E402
from evtrace.tools.bench import MODELS, dense_variants  # noqa: E402

DEFAULT_MODELS = ("vit_b16", "dinov2_s14")
SLOW_MODELS = ("hf_dinov2_s14", "vitdet_b")
CATEGORIES = ("gates", "linears", "attention", "scatter/gather", "other ops", "stream", "python")

_LINEAR_OPS = ("aten::linear", "aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "aten::matmul")
_SCATTER_OPS = (
    "aten::index_select",
    "aten::index_copy_",
    "aten::index_copy",
    "aten::gather",
    "aten::scatter_",
    "aten::scatter",
    "aten::index",
    "aten::index_put_",
    "aten::masked_fill",
    "aten::where",
)


@dataclass
class Case:
    """One eventful stream: its label, policy label, model and frame source."""

    name: str
    policy: str
    model: EventfulModel
    frames: Callable[[int], torch.Tensor]  # round i -> the frame fed at that round
    times: list[float] = field(default_factory=list)
    split: dict[str, float] = field(default_factory=dict)
    tokens: float = 0.0  # mean tokens per gate of a steady frame (after its first two)


def _moving_frames(spec, count: int, start: int) -> list[torch.Tensor]:
    from evtrace.tools.video import frames

    out = list(frames("bikes", spec.size, patch_size=spec.patch, max_frames=count, start=start, fit=spec.fit))
    if len(out) < count:
        raise ValueError(f"bikes has only {len(out)} frames from {start}; {count} needed")
    return out


def one_token_changed(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``x`` with the pixels of one patch near the centre of the picture shifted (one token)."""
    y = x.clone()
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    row, col = h // 2, w // 2
    y[..., row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] += 0.5
    return y


def mean_tokens(em: EventfulModel, frames: list[torch.Tensor]) -> float:
    """The tokens per gate and stream an eventful stream updates on average over ``frames`` after
    its first (dense) frame, then a fresh stream."""
    counts: list[int] = []
    hooks = [
        region.register_forward_hook(
            lambda _m, _i, out: counts.append(0 if out[-1] is None else out[-1].shape[1])
        )
        for region in em.regions().values()
    ]
    gates = len(hooks)
    try:
        with torch.no_grad():
            em.reset()
            for x in frames:
                em(x)
    finally:
        for h in hooks:
            h.remove()
        em.reset()
    steady = counts[gates:]
    return sum(steady) / max(1, len(steady))


def _fastest_dense(model, x: torch.Tensor, rounds: int) -> tuple[str, Callable]:
    """The dense variant with the lowest median over ``rounds`` frames (interleaved)."""
    variants = dense_variants(model)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn(x)
        for _ in range(rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    best = min(times, key=lambda n: statistics.median(times[n]))
    return best, variants[best]


# ------------------------------------------------------------------------------ the profile


@contextlib.contextmanager
def _labelled() -> Iterator[None]:
    """Wrap the gate, attention and stream-control entry points in profiler ranges."""
    targets = [(TokenGate, "forward", "evtrace.gate")]
    for cls in (
        attention_mod.ExactDeltaAttention,
        attention_mod.GroupedDeltaAttention,
        attention_mod.PaperDeltaAttention,
    ):
        targets.append((cls, "forward", "evtrace.attention"))
    for name in ("_enter_frame", "_leave_frame"):
        targets.append((EventfulModel, name, "evtrace.stream"))
    saved = []
    for cls, name, label in targets:
        original = cls.__dict__.get(name)
        if original is None:
            continue

        def wrapped(*args, __original=original, __label=label, **kwargs):
            with torch.profiler.record_function(__label):
                return __original(*args, **kwargs)

        saved.append((cls, name, original))
        setattr(cls, name, wrapped)
    try:
        yield
    finally:
        for cls, name, original in reversed(saved):
            setattr(cls, name, original)


def _category(event) -> str | None:
    """The category of a top-level op event (None: an annotation, not an op)."""
    name = event.name
    if name.startswith("evtrace."):
        return None
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "evtrace.gate":
            return "gates"
        if parent.name == "evtrace.attention":
            return "attention"
        if parent.name == "evtrace.stream":
            return "stream"
        parent = parent.cpu_parent
    if name in _LINEAR_OPS:
        return "linears"
    if name in _SCATTER_OPS:
        return "scatter/gather"
    return "other ops"


def _is_top_op(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if not parent.name.startswith("evtrace."):
            return False  # inside another op: counted with it
        parent = parent.cpu_parent
    return not event.name.startswith("evtrace.")


def profile_split(fn: Callable[[int], object], rounds: range) -> dict[str, float]:
    """Fractions of the wall time of ``fn(i)`` for i in ``rounds`` per category."""
    from torch.profiler import ProfilerActivity, profile

    with _labelled(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in rounds:
            fn(i)
        wall = time.perf_counter() - t0
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        if _is_top_op(event):
            totals[_category(event)] += event.cpu_time_total * 1e-6
    ops = sum(totals.values())
    totals["python"] = max(0.0, wall - ops)
    return {k: v / wall for k, v in totals.items()}


# ------------------------------------------------------------------------------ one model


@dataclass
class ModelResult:
    model: str
    tokens: int
    dense_label: str
    dense_times: list[float]
    cases: list[Case]
    dense_split: dict[str, float]


def run_model(name: str, frames: int, profile_frames: int, note: Callable[[str], None]) -> ModelResult:
    spec = MODELS[name]
    note(f"{name}: building")
    model = spec.build().eval()
    moving = _moving_frames(spec, frames + 2 + profile_frames, start=60)
    x0 = moving[0]
    x1 = one_token_changed(x0, spec.patch)
    dense_label, dense = _fastest_dense(model, x0, rounds=3)
    note(f"{name}: fastest dense {dense_label}")
    n = spec.tokens
    cases = []
    for case, policy_label, policy, source in (
        ("same frame", "default", None, lambda i: x0),
        ("one token", "default", None, lambda i: x1 if i % 2 else x0),
        ("moving", "default", None, lambda i: moving[i % len(moving)]),
        ("moving", f"TopK(N/4={n // 4})", TopK(n // 4), lambda i: moving[i % len(moving)]),
    ):
        em = evtrace.transform(model, x0) if policy is None else evtrace.transform(model, x0, policy=policy)
        cases.append(Case(case, policy_label if policy is not None else repr(em.policy), em, source))
    # TopK at the default policy's own average count on the moving frames (its frames once, untimed)
    r = round(mean_tokens(cases[2].model, [cases[2].frames(i) for i in range(frames + 2)]))
    em = evtrace.transform(model, x0, policy=TopK(max(1, r)))
    cases.append(Case("moving", f"TopK(default's mean {r})", em, cases[2].frames))
    for c in cases:
        c.tokens = mean_tokens(c.model, [c.frames(i) for i in range(2, 6)])
    note(f"{name}: transformed")
    with torch.no_grad():
        for c in cases:  # warm-up: the dense first frame and one steady frame
            c.model(c.frames(0))
            c.model(c.frames(1))
        dense_times: list[float] = []
        runners: list[Callable[[int], None]] = [lambda i: dense(moving[i % len(moving)])]
        runners += [(lambda i, c=c: c.model(c.frames(i))) for c in cases]
        sinks = [dense_times] + [c.times for c in cases]
        gc.collect()
        for i in range(2, frames + 2):
            for j in range(len(runners)):
                k = (i + j) % len(runners)
                t0 = time.perf_counter()
                runners[k](i)
                sinks[k].append(time.perf_counter() - t0)
        end = frames + 2
        rounds = range(end, end + profile_frames)
        dense_split = profile_split(runners[0], rounds) if profile_frames else {}
        for c, run in zip(cases, runners[1:], strict=True):
            c.split = profile_split(run, rounds) if profile_frames else {}
    return ModelResult(name, n, dense_label, dense_times, cases, dense_split)


# ------------------------------------------------------------------------------ the table


def table(results: list[ModelResult], markdown: bool = True) -> str:
    head = ["model", "case", "policy", "tokens/gate", "eventful ms", "dense ms", "% of dense", "speedup"]
    head += [f"{c} %" for c in CATEGORIES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        dense_ms = statistics.median(res.dense_times) * 1e3
        for c in res.cases:
            ev_ms = statistics.median(c.times) * 1e3
            cells = [
                res.model,
                c.name,
                c.policy,
                f"{c.tokens:.0f} of {res.tokens}",
                f"{ev_ms:.1f}",
                f"{dense_ms:.1f} ({res.dense_label})",
                f"{100 * ev_ms / dense_ms:.1f}",
                f"{dense_ms / ev_ms:.2f}x",
            ]
            cells += [f"{100 * c.split[k]:.0f}" if c.split else "" for k in CATEGORIES]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--slow", action="store_true", help=f"also {', '.join(SLOW_MODELS)}")
    parser.add_argument("--frames", type=int, default=10, help="timed rounds per model (default 10)")
    parser.add_argument("--profile-frames", type=int, default=3, help="profiled frames per case (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", type=Path, help="write the table (and the command) to this file")
    args = parser.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    if args.slow:
        names += [m for m in SLOW_MODELS if m not in names]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    if args.frames < 1:
        parser.error(f"--frames must be >= 1, got {args.frames}")
    torch.set_num_threads(args.threads)

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    results = [run_model(name, args.frames, args.profile_frames, note) for name in names]
    text = table(results)
    print(text)
    if args.markdown:
        command = "python bench/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.markdown.write_text(f"`{command.strip()}` ({args.threads} threads)\n\n{text}\n")


if __name__ == "__main__":
    main()
