"""Scene cuts on hard video: refresh at the cut frames, none elsewhere (fades, flashes, pans,
static holds, fast motion), per stream of a batch, and the harness's own bookkeeping."""

import pytest
import torch
import torch.nn.functional as F

import evtrace
from evtrace.runtime.scene_cut import SceneCutDetector, dissimilarity, frame_signature
from evtrace.tools import hard_video
from tests.models import small_vit

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


def synthetic(
    count: int, cuts: tuple[int, ...], seed: int = 0, letterbox: bool = False
) -> list[torch.Tensor]:
    """Smooth random scenes with a square moving across and sensor noise; a new scene at each cut."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for t in range(count):
        if t == 0 or t in cuts:
            texture = F.interpolate(torch.randn(1, 3, 8, 8, generator=gen), size=(SIZE, SIZE), mode="bicubic")
            colour = 2.0 * torch.randn(1, 3, 1, 1, generator=gen)
            start = t
        frame = texture.clone()
        x = 2 * (t - start) % (SIZE - 12)
        frame[..., 20:32, x : x + 12] = colour
        frame += 0.01 * torch.randn(frame.shape, generator=gen)
        if letterbox:
            frame[..., :20, :] = -2.0
            frame[..., -20:, :] = -2.0
        frames.append(frame)
    return frames


def fired(frames, detector=None) -> list[int]:
    detector = detector or SceneCutDetector()
    return [t for t, x in enumerate(frames) if bool(detector.update(x)[0])]


@pytest.mark.parametrize("letterbox", [False, True])
def test_synthetic_cuts_fire_at_the_cut_frames_only(letterbox):
    cuts = (12, 25, 40)
    assert fired(synthetic(50, cuts, letterbox=letterbox)) == list(cuts)


def test_fades_flashes_and_brightness_jumps_do_not_fire():
    frames = synthetic(40, ())
    faded = hard_video.fade(frames, low=0.05, flashes=(7, 30))
    assert fired(faded) == []
    jumps = [x * (1.5 if t % 9 == 4 else 1.0) + (0.8 if t % 11 == 6 else 0.0) for t, x in enumerate(frames)]
    assert fired(jumps) == []


def test_fade_through_black_to_a_new_scene_fires_when_content_returns():
    a, b = synthetic(12, (), seed=1), synthetic(12, (), seed=2)
    black = [torch.full_like(a[0], -2.0) for _ in range(4)]
    assert fired(a + black + b) == [16]


def test_signature_ignores_brightness_and_contrast():
    x = synthetic(1, ())[0]
    cells, content = frame_signature(x)
    cells2, content2 = frame_signature(0.3 * x - 1.0)
    assert float(dissimilarity(cells, content, cells2, content2)) < 1e-4
    other, content3 = frame_signature(synthetic(1, (), seed=5)[0])
    assert float(dissimilarity(cells, content, other, content3)) > 0.3


def test_batch_rows_cut_independently():
    s0, s1 = synthetic(30, (10,), seed=3), synthetic(30, (20,), seed=4)
    det = SceneCutDetector()
    got = [det.update(torch.cat([a, b])).tolist() for a, b in zip(s0, s1)]
    assert [t for t, g in enumerate(got) if g[0]] == [10]
    assert [t for t, g in enumerate(got) if g[1]] == [20]


def test_bad_detector_arguments_raise():
    for kwargs in ({"factor": 1.0}, {"factor": -2}, {"window": 0}, {"warmup": 0}, {"min_change": -1}):
        with pytest.raises(ValueError):
            SceneCutDetector(**kwargs)
    model, x = small_vit()
    with pytest.raises(ValueError, match="scene_cut must be"):
        evtrace.transform(model, x, scene_cut=0.5)


@pytest.fixture(scope="module")
def real():
    return {name: hard_video.stream(name, frames=16, size=SIZE, patch=16) for name in hard_video.STREAMS}


def test_harness_streams_know_their_cuts(real):
    assert real["cuts"].cuts == (4, 8, 12)
    assert real["fast8"].cuts == (8,)
    for s in real.values():
        assert len(s) == 16 or s.name in ("fast4", "fast8")
        assert all(0 < c < len(s) for c in s.cuts)
        assert {tuple(x.shape) for x in s.frames} == {(1, 3, SIZE, SIZE)}


def test_concatenated_real_clips_refresh_at_their_cuts_and_nowhere_else(real):
    for s in real.values():
        detector = SceneCutDetector()
        score = hard_video.score_cuts(s, lambda x, d=detector: bool(d.update(x)[0]))
        assert score.recall == 1.0 and score.false == 0, (s.name, score)


def test_eventful_model_detects_cuts_by_default_and_computes_the_cut_frame_densely(real):
    torch.manual_seed(0)
    model, _ = small_vit()
    s = real["cuts"]
    emodel = evtrace.transform(model, s.frames[0], policy=evtrace.TopK(4))
    refreshed = []
    with torch.no_grad():
        for t, x in enumerate(s.frames):
            before = emodel.refreshes
            y = emodel(x)
            if emodel.refreshes > before:
                refreshed.append(t)
                ref = model(x)
                assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert refreshed == list(s.cuts)
    for name in ("fade", "pan", "static"):
        quiet = evtrace.transform(model, real[name].frames[0], policy=evtrace.TopK(4))
        with torch.no_grad():
            for x in real[name].frames:
                quiet(x)
        assert quiet.refreshes == 0, name


def test_hard_suite_reports_worst_frame_tokens_and_refreshes():
    from evtrace.runtime.policies import AdaptiveBudget
    from evtrace.tools import fidelity

    torch.manual_seed(0)
    model, _ = small_vit()
    s = hard_video.HardStream("synthetic", synthetic(10, (5,)), (5,))
    specs = [
        ("TopK", "TopK(r=4)", lambda: evtrace.TopK(4), {}),
        ("AdaptiveBudget", "AdaptiveBudget(0.3)", lambda: AdaptiveBudget(0.3), {}),
        ("TopK, no scene cut (paper)", "TopK(r=4) no cut", lambda: evtrace.TopK(4), {"scene_cut": None}),
    ]
    points = fidelity.evaluate_hard(model, [s], specs)
    assert [p.refresh_frames for p in points] == [(5,), (5,), ()]
    for p in points:
        assert p.cosine_worst <= p.cosine_mean <= 1.0 + 1e-9
        assert p.tokens_mean <= p.tokens_peak <= p.tokens
        assert p.gflops < p.gflops_dense
    assert points[0].cosine_worst > points[2].cosine_worst  # the refresh repairs the cut frame
    for text in (
        fidelity.hard_stream_table(points),
        fidelity.hard_summary(points),
        fidelity.smallest_budget(points),
    ):
        assert "synthetic" in text
