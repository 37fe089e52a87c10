"""The scene-cut detector on its own: fast motion is not a cut, a cut fires once (the stream's
comparison starts afresh after it), and every statistic is per stream of a batch."""

import pytest
import torch

from evtrace.runtime.scene_cut import SceneCutDetector, cut_decision
from evtrace.tools import hard_video
from evtrace.tools.video import frames as video_frames
from tests.test_hard_video import fired, synthetic

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fit", ["resize", "letterbox"])
def test_fast_motion_of_the_whole_bikes_clip_is_not_a_cut(fit):
    """Squeezed to 224 x 224 the bikes clip speeds up around frames 96-108 (changes 0.24, 0.42,
    0.36 ... against 0.08 before); the detector used to fire on six consecutive frames there. It
    fires at the five labelled cuts and nowhere else."""
    frames = list(video_frames("bikes", size=224, patch_size=14, fit=fit))
    assert len(frames) == 250
    got = fired(frames)
    assert got == list(hard_video.BIKES_CUTS)


def test_a_burst_of_unrelated_frames_refreshes_once_then_the_stream_starts_afresh():
    """Three unrelated pictures in a row after a calm shot: the first is a cut; the next two are
    compared with a history that starts at the cut (none yet: no decision). A later cut in the
    new shot fires again."""
    frames = synthetic(45, (20, 21, 22, 35), seed=3)
    assert fired(frames) == [20, 35]


def test_a_cut_needs_a_jump_against_the_change_just_before_it():
    history = torch.tensor([[0.05, 0.05, 0.05, 0.25], [0.05, 0.05, 0.05, 0.05]])
    change = torch.tensor([0.45, 0.45])
    count = torch.tensor([4, 4])
    got = cut_decision(change, history, count, factor=4.0, min_change=0.3, warmup=2, jump=2.0)
    assert got.tolist() == [False, True]  # row 0 ramps up (0.25 -> 0.45): motion, not a cut
    assert cut_decision(change, history, count, 4.0, 0.3, 2, jump=0.0).tolist() == [True, True]


def test_the_median_is_per_stream_in_a_batch():
    """Two noise streams (every frame unrelated to the last) beside a calm stream with one cut:
    the noise streams never fire, and the calm stream's cut is measured against its own quiet
    history, not against the noise of the others."""
    calm = synthetic(30, (15,), seed=4)
    gen = torch.Generator().manual_seed(5)
    detector = SceneCutDetector()
    cuts = []
    for x in calm:
        noise = torch.randn((2,) + tuple(x.shape[1:]), generator=gen)
        cuts.append(detector.update(torch.cat([noise, x])))
    fired_rows = [[t for t, c in enumerate(cuts) if bool(c[row])] for row in range(3)]
    assert fired_rows == [[], [], [15]]


def test_jump_is_checked_and_shown():
    with pytest.raises(ValueError, match="jump"):
        SceneCutDetector(jump=-1.0)
    assert "jump=2" in repr(SceneCutDetector())
