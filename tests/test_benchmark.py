"""evtrace.benchmark: a user's model timed dense against eventful, interleaved, on real frames."""

from __future__ import annotations

import pytest
import torch

import evtrace
from evtrace.benchmarking import BenchmarkResult
from tests.models import real_frames, small_vit


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, _ = small_vit()
    frames = real_frames(64, count=6)
    return model, frames


def test_benchmark_times_every_runner_on_every_steady_frame_and_keeps_the_stream(setup):
    model, frames = setup
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(4))
    result = evtrace.benchmark(model, frames, emodel, warmup=2)
    assert isinstance(result, BenchmarkResult)
    assert all(len(t) == len(frames) - 2 for t in [*result.dense.values(), result.eventful])
    assert result.speedup == pytest.approx(result.dense_ms / result.eventful_ms)
    assert result.fastest_dense in result.dense
    # the eventful model saw the frames in order, as one stream: its state equals a fresh run's
    fresh = evtrace.transform(model, frames[0], policy=evtrace.TopK(4))
    with torch.no_grad():
        for x in frames:
            want = fresh(x)
    with torch.no_grad():
        again_fresh, again = fresh(frames[-1] * 0.9), emodel(frames[-1] * 0.9)
    assert torch.equal(again_fresh, again)
    assert want.shape == again.shape
    # the FLOP ratio is count_flops' own
    dense = evtrace.count_flops(model, frames[0]).gflops
    steady = evtrace.count_flops(emodel, frames[0]).gflops
    assert result.flop_ratio == pytest.approx(dense / steady)
    text = str(result)
    assert "fastest dense" in text and "speedup" in text and "FLOP ratio" in text


def test_benchmark_builds_the_eventful_model_with_the_given_options(setup):
    model, frames = setup
    result = evtrace.benchmark(model, frames[:4], policy=evtrace.TopK(4), warmup=1, count=False)
    assert result.flop_ratio is None and len(result.eventful) == 3
    assert any("noisy" in n for n in result.notes)


def test_benchmark_refuses_bad_arguments_with_clear_errors(setup):
    model, frames = setup
    with pytest.raises(ValueError, match="at least warmup \\+ 1 = 3 frames, got 2"):
        evtrace.benchmark(model, frames[:2], warmup=2)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        evtrace.benchmark(model, frames, warmup=-1)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(4))
    with pytest.raises(ValueError, match=r"transform options \['policy'\] given with an emodel"):
        evtrace.benchmark(model, frames, emodel, policy=3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        evtrace.benchmark(lambda x: x, frames)
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            evtrace.benchmark(model, frames)
    finally:
        model.eval()
