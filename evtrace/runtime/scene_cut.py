"""Scene-cut detection on the input frames, per stream, before anything is computed.

A cut is a frame whose content is unrelated to the previous one. The signal is the
*dissimilarity* of two consecutive frames at low resolution:

1. :func:`frame_signature`: average-pool each frame to a ``grid x grid`` map per channel and
   mark the cells with texture (flat cells, e.g. letterbox bars, are equal in any two frames
   and would make unrelated pictures look alike).
2. :func:`dissimilarity`: ``1 - Pearson correlation`` of two coarse maps over the cells where
   either has content, per channel (each frame standardised on its own), averaged over
   channels. A fade (pixels scaled towards black or white) and a flash (a global brightness /
   contrast jump) are affine per channel and drop out; a pan of a few pixels moves the coarse
   map little. 0 for the same picture up to brightness and contrast, about 1 for unrelated
   pictures, at most 2.
3. :func:`cut_decision`: a cut when the dissimilarity exceeds an absolute floor (``min_change``),
   ``factor`` times the median of the stream's recent dissimilarities (``window`` frames) AND
   ``jump`` times the change just before it. The median (not a running mean) is not pulled up
   by one earlier cut or a single flash, and a stream that is always very dissimilar (noise)
   never fires: it only fires on a jump against the stream's own recent behaviour. The last
   condition tells a cut from motion that speeds up: a cut follows a frame like its
   neighbours, while fast motion ramps up over a few frames (the whole bikes clip at 224 x 224:
   0.08, 0.10, 0.24, 0.42, 0.36 ... where its cuts jump from below 0.08 to 0.7 - 1.3).
4. A cut makes the stream's comparison start afresh: its history is cleared, so the stream
   needs ``warmup`` measured frames of the new shot before it can fire again (no history, no
   decision). One shot never refreshes on consecutive frames.

Near-flat frames (a fade to black: fewer than ``min_content`` of the cells with texture) carry
no content to compare: they are skipped and the last frame with content stays
the reference, so a cut hidden in a fade through black fires when content comes back.

Shapes: ``B`` streams, ``C`` channels, ``G`` grid cells per side, ``W`` history window.
Everything is per batch row: one stream's cut never refreshes another.
"""

from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "frame_signature",
    "dissimilarity",
    "cut_decision",
    "SceneCutDetector",
    "DEFAULT_FACTOR",
]

#: Default ``factor``: a cut changes the frame this many times more than the median recent change.
DEFAULT_FACTOR = 4.0


def _as_bchw(x: Tensor) -> Tensor:
    """Any frame tensor (B, ...) as (B, C, H, W): the last two dims are the picture, the dims
    between batch and them are channels (video clips (B, T, C, H, W) become (B, T*C, H, W));
    1-D signals (B, L) become (B, 1, 1, L)."""
    if x.dim() >= 4:
        return x.reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], 1, 1, -1)


def frame_signature(x: Tensor, grid: int = 16, texture: float = 0.02) -> tuple[Tensor, Tensor]:
    """Coarse picture of each frame and where it has content.

    x: (B, ...) a frame per stream (see :func:`_as_bchw`). Returns ``(cells, content)``: cells
    (B, C, G*G) float32, the mean of each cell per channel; content (B, G*G) bool, the cells
    with texture (a within-cell standard deviation above ``texture`` in some channel). Flat
    cells (letterbox bars, padding, a frame faded to black) are left out of the comparison:
    they are equal in any two frames and would make unrelated pictures look alike.
    """
    x = _as_bchw(x.detach()).float()
    h, w = x.shape[-2:]
    size = (min(grid, h), min(grid, w))
    mean = F.adaptive_avg_pool2d(x, size)
    var = (F.adaptive_avg_pool2d(x * x, size) - mean * mean).clamp_min(0.0)
    content = var.amax(dim=1).flatten(1) > texture * texture
    return mean.flatten(2), content


def _weighted_standardise(cells: Tensor, weight: Tensor) -> Tensor:
    """cells (B, C, M) standardised per channel over the cells where weight (B, M) is 1."""
    w = weight[:, None, :]
    total = w.sum(dim=2, keepdim=True).clamp_min(1.0)
    mean = (cells * w).sum(dim=2, keepdim=True) / total
    centred = (cells - mean) * w
    std = (centred.square().sum(dim=2, keepdim=True) / total).sqrt()
    return torch.where(std > 1e-6, centred / std.clamp_min(1e-6), torch.zeros_like(centred))


def dissimilarity(a: Tensor, content_a: Tensor, b: Tensor, content_b: Tensor) -> Tensor:
    """``1 - Pearson correlation`` of two coarse pictures (B, C, M) over the cells where either
    has content (B, M), per channel (each standardised on its own: brightness and contrast
    drop out), averaged over channels. Returns (B,) in [0, 2]; 0 where no cell has content."""
    weight = (content_a | content_b).float()
    sa, sb = _weighted_standardise(a, weight), _weighted_standardise(b, weight)
    cells = weight.sum(dim=1).clamp_min(1.0)[:, None]
    corr = (sa * sb).sum(dim=2) / cells
    out = (1.0 - corr).clamp(0.0, 2.0).mean(dim=1)
    return torch.where(weight.sum(dim=1) >= 4, out, torch.zeros_like(out))


def cut_decision(
    change: Tensor,
    history: Tensor,
    count: Tensor,
    factor: float,
    min_change: float,
    warmup: int,
    jump: float = 0.0,
) -> Tensor:
    """(B,) bool: which streams cut at this frame.

    change: (B,) this frame's dissimilarity; history: (B, W) the last W dissimilarities of each
    stream, oldest first (NaN where not filled yet); count: (B,) long, how many of them are
    filled. Every statistic is per row: one stream's motion never sets another's bar.
    """
    median = torch.nanmedian(history, dim=1).values if history.shape[1] else torch.zeros_like(change)
    median = torch.nan_to_num(median, nan=0.0)
    previous = torch.nan_to_num(history[:, -1], nan=0.0) if history.shape[1] else torch.zeros_like(change)
    return (count >= warmup) & (change > min_change) & (change > factor * median) & (change > jump * previous)


def _check_real(name: str, value, low: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(
            f"{name} must be a finite real number {'>' if strict else '>='} {low}, got {value!r}"
        )
    if (float(value) <= low) if strict else (float(value) < low):
        raise ValueError(
            f"{name} must be a finite real number {'>' if strict else '>='} {low}, got {value!r}"
        )
    return float(value)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class SceneCutDetector:
    """Per-stream scene-cut detector; :meth:`update` once per frame, before the model runs.

    State per stream (batch row): the signature of the last frame with content, the last
    ``window`` dissimilarities and how many are filled. A detected cut clears its stream's
    history (the new shot's changes are compared with the new shot's: the stream cannot fire
    again before ``warmup`` more measured frames). Tensors are replaced, never written in place
    (state made under ``torch.inference_mode`` stays usable outside it).

    Args:
        factor: a cut changes this many times more than the median recent change (> 1).
        min_change: absolute dissimilarity floor of a cut (in [0, 2]; unrelated pictures give ~1).
        window: how many recent changes the median is taken over (>= 1).
        warmup: measured frames a stream needs before it can fire, at its start and after each
            cut (>= 1).
        jump: a cut changes more than this many times the change of the frame before it (>= 0;
            0 turns the condition off): motion that speeds up ramps, a cut jumps.
        grid: cells per side of the coarse picture (>= 2).
        texture: a cell has content when its pixels vary more than this (input units).
        min_content: frames with fewer content cells than this fraction are skipped.
    """

    def __init__(
        self,
        factor: float = DEFAULT_FACTOR,
        min_change: float = 0.3,
        window: int = 4,
        warmup: int = 2,
        grid: int = 16,
        texture: float = 0.02,
        min_content: float = 0.05,
        jump: float = 2.0,
    ):
        self.factor = _check_real("scene_cut factor", factor, 1.0, strict=True)
        self.min_change = _check_real("min_change", min_change, 0.0, strict=False)
        self.window = _check_int("window", window, 1)
        self.warmup = _check_int("warmup", warmup, 1)
        self.grid = _check_int("grid", grid, 2)
        self.texture = _check_real("texture", texture, 0.0, strict=False)
        self.min_content = _check_real("min_content", min_content, 0.0, strict=False)
        self.jump = _check_real("jump", jump, 0.0, strict=False)
        self.reset()

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget every stream (``rows=None``) or only the given batch rows (a new stream there)."""
        if rows is None or self._previous is None:
            self._previous: Tensor | None = None
            self._previous_content: Tensor | None = None
            self._history: Tensor | None = None
            self._count: Tensor | None = None
            self._seen: Tensor | None = None
            return
        keep = torch.ones(self._count.shape[0], dtype=torch.bool)
        keep[list(rows)] = False
        keep = keep.to(self._count.device)
        self._history = torch.where(keep[:, None], self._history, torch.full_like(self._history, math.nan))
        self._count = torch.where(keep, self._count, torch.zeros_like(self._count))
        self._seen = self._seen & keep

    def state_tensors(self) -> list[Tensor] | None:
        """The state (previous picture, its content, history with NaN as -1, counts), None before a
        first frame: for snapshots that check a rejected frame changed nothing."""
        if self._previous is None:
            return None
        return [
            self._previous,
            self._previous_content,
            torch.nan_to_num(self._history, nan=-1.0),
            self._count,
        ]

    def update(self, x: Tensor) -> Tensor:
        """Measure frame ``x`` (B, ...) and return (B,) bool: the streams whose frame is a cut."""
        cells, content = frame_signature(x, self.grid, self.texture)
        b = cells.shape[0]
        has_content = content.float().mean(dim=1) >= self.min_content
        if self._previous is None or self._previous.shape != cells.shape:
            self._previous, self._previous_content = cells, content
            self._history = torch.full((b, self.window), math.nan, device=cells.device)
            self._count = torch.zeros(b, dtype=torch.long, device=cells.device)
            self._seen = has_content
            self.last_change = torch.zeros(b, device=cells.device)
            return torch.zeros(b, dtype=torch.bool, device=cells.device)
        measured = has_content & self._seen  # both this frame and its reference have content
        change = dissimilarity(cells, content, self._previous, self._previous_content)
        change = torch.where(measured, change, torch.zeros_like(change))
        cut = measured & cut_decision(
            change, self._history, self._count, self.factor, self.min_change, self.warmup, self.jump
        )
        shifted = torch.cat([self._history[:, 1:], change[:, None]], dim=1)
        self._history = torch.where(
            cut[:, None],
            torch.full_like(self._history, math.nan),
            torch.where(measured[:, None], shifted, self._history),
        )
        self._count = torch.where(cut, torch.zeros_like(self._count), self._count + measured.long())
        self._count = self._count.clamp_max(self.window)
        self._previous = torch.where(has_content[:, None, None], cells, self._previous)
        self._previous_content = torch.where(has_content[:, None], content, self._previous_content)
        self._seen = self._seen | has_content
        self.last_change = change
        return cut

    def __repr__(self) -> str:
        return (
            f"SceneCutDetector(factor={self.factor:g}, min_change={self.min_change:g}, "
            f"window={self.window}, warmup={self.warmup}, jump={self.jump:g})"
        )


def detector_from_option(option) -> SceneCutDetector | None:
    """The detector for a ``scene_cut=`` option: True the default, a factor, an instance (copied:
    each model or stream keeps its own state), None or False none."""
    if option is None or option is False:
        return None
    if isinstance(option, SceneCutDetector):
        return copy.deepcopy(option)
    if option is True:
        return SceneCutDetector()
    return SceneCutDetector(factor=float(option))
