"""The naive baselines of the fidelity harness (evtrace.tools.fidelity): reuse the last output,
lower resolution, matched TopK, and the check of which points beat a family's curve."""

import math

import pytest
import torch

from evtrace.tools import fidelity as F
from evtrace.tools.hard_video import HardStream
from tests.models import small_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reuse_last_output_repeats_the_last_computed_frame():
    outs = [torch.full((1, 2), float(t)) for t in range(7)]
    got = [float(x[0, 0]) for x in F.reuse_last_output(outs, 3)]
    assert got == [0, 0, 0, 3, 3, 3, 6]
    assert F.reuse_last_output(outs, 1) == outs
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        F.reuse_last_output(outs, 0)


def test_reuse_is_priced_at_the_dense_frames_among_the_scored_ones():
    # frames 1..59 are scored; dense among them: 2, 4, ..., 58 (29) and 4, ..., 56 (14)
    assert F.reuse_dense_fraction(60, 2) == pytest.approx(29 / 59)
    assert F.reuse_dense_fraction(60, 4) == pytest.approx(14 / 59)
    assert F.reuse_dense_fraction(5, 1) == 1.0
    with pytest.raises(ValueError, match="frames must be >= 2"):
        F.reuse_dense_fraction(1, 2)


def test_resize_token_map_keeps_the_prefix_and_resamples_the_grid():
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)  # one channel, 4 x 4
    tokens = torch.cat([torch.full((1, 1, 1), -5.0), grid.reshape(1, 16, 1)], dim=1)
    out = F.resize_token_map(tokens, 8)
    assert out.shape == (1, 65, 1) and float(out[0, 0, 0]) == -5.0
    want = torch.nn.functional.interpolate(grid[None], size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(out[0, 1:, 0], want.flatten())
    assert F.resize_token_map(tokens, 4) is tokens
    with pytest.raises(ValueError, match="not a square grid"):
        F.resize_token_map(torch.zeros(1, 11, 3), 4)


def test_lower_resolution_keeps_a_constant_frame_constant():
    x = torch.full((1, 3, 28, 28), 0.7)
    y = F.lower_resolution(x, 14)
    assert y.shape == (1, 3, 14, 14) and torch.allclose(y, torch.full_like(y, 0.7))


def _point(policy, family, gflops, mean, worst, refreshes=(), tokens_mean=0.0):
    return F.HardPoint(
        stream="s",
        policy=policy,
        family=family,
        frames=11,
        cuts=(),
        tokens=100,
        tokens_mean=tokens_mean,
        tokens_peak=100,
        gflops_dense=8.0,
        gflops=gflops,
        cosine_mean=mean,
        cosine_worst=worst,
        cosine_worst_frame=1,
        cc_mean=math.nan,
        cc_worst=math.nan,
        refreshes=len(refreshes),
        refresh_frames=tuple(refreshes),
    )


def test_dominated_by_finds_the_points_above_the_family_curve():
    fam = [_point("a", "fam", 4.0, 0.99, 0.95), _point("b", "fam", 2.0, 0.97, 0.90)]
    above = _point("reuse", "base", 3.0, 0.985, 0.90)  # curve at 3.0: mean about 0.982
    below = _point("low", "base", 3.0, 0.95, 0.80)
    worst_only = _point("w", "base", 4.0, 0.98, 0.97)
    cheap = _point("c", "base", 1.0, 0.5, 0.4)  # cheaper than the whole family and worse
    cheap_good = _point("g", "base", 1.0, 0.975, 0.85)  # cheaper and better than its cheapest
    dense = _point("d", "base", 8.0, 1.0, 1.0)  # dearer than the whole family: not compared
    beaten = F.dominated_by(fam + [above, below, worst_only, cheap, cheap_good, dense], "fam")
    assert [p.policy for _, p, _, _ in beaten] == ["reuse", "w", "g"]
    assert beaten[2][2:] == (0.97, 0.90)
    _, _, mean, worst = beaten[0]
    assert mean == pytest.approx(F.at_saving(fam, 8.0 / 3.0, "cosine_mean"))
    assert worst == pytest.approx(F.at_saving(fam, 8.0 / 3.0, "cosine_worst"))


def test_stream_bench_baselines_and_matched_topk_on_a_small_model():
    model, _ = small_vit(depth=1, num_classes=0)
    gen = torch.Generator().manual_seed(0)
    frames = [torch.randn(1, 3, 64, 64, generator=gen)]
    for _ in range(4):
        frames.append(frames[-1] + 0.05 * torch.randn(1, 3, 64, 64, generator=gen))
    bench = F.StreamBench(model, HardStream("s", frames))  # num_classes=0: the token map
    p = bench.reuse(2)
    assert p.gflops == pytest.approx(bench.dense_gflops * 2 / 4)  # frames 2 and 4 of 1..4
    assert p.cosine_worst < 1.0 and p.cosine_mean > p.cosine_worst
    # the same refreshes at the default's spend: (mean x 4 - N x 1) / 3
    q = _point("d", "fam", 1.0, 1.0, 1.0, refreshes=(2,), tokens_mean=8.0)
    assert bench.matched_topk(q) == round((8.0 * 4 - bench.tokens) / 3)
