"""Latency-targeted budgets: the fitted time model, the choice, and the errors."""

import pytest
import torch

import evtrace
from evtrace.latency import LatencyModel, LatencyTargetError, budget_for_latency, measure_latency
from evtrace.runtime.policies import AdaptiveBudget, TopFraction, TopK
from tests.models import real_frames, small_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_line_fits_and_inverts():
    # 2 ms fixed + 10 ms for every token: by hand, 6 ms allows f = 0.4
    fractions = (0.1, 0.3, 0.5, 1.0)
    model = LatencyModel.fit(fractions, [0.002 + 0.01 * f for f in fractions], dense_seconds=0.02)
    assert model.fixed == pytest.approx(0.002)
    assert model.per_fraction == pytest.approx(0.01)
    assert model.predict(0.4) == pytest.approx(0.006)
    assert model.largest_fraction(0.006) == pytest.approx(0.4)
    assert model.largest_fraction(0.5) == 1.0  # never beyond the largest budget timed
    assert model.largest_fraction(0.0025) is None  # below the smallest budget timed
    noisy = LatencyModel.fit((0.1, 0.5), (0.004, 0.003), dense_seconds=0.01)
    assert noisy.per_fraction == 0.0  # noise never predicts a larger budget faster


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model, _ = small_vit()
    frames = real_frames(64, 4)
    return model, frames


def test_the_choice_meets_the_target_at_the_peak(vit):
    model, frames = vit
    emodel = evtrace.transform(model, frames[0], policy=TopK(3))
    fractions = (0.1, 0.3, 0.5, 1.0)
    n = 17
    timed = [-(-int(f * n * 1e9) // int(1e9)) / n for f in fractions]  # ceil(f N) / N by hand
    latency = LatencyModel.fit(timed, [0.002 + 0.01 * f for f in timed], dense_seconds=0.02)
    choice = budget_for_latency(emodel, frames[0], 6.0, latency=latency)
    # 6 ms allows 0.4 of the tokens: TopFraction(f) selects ceil(17 f) <= 6.8, i.e. 6 tokens
    assert choice.policy.tokens_per_frame(n) == 6
    assert isinstance(emodel.policy, TopFraction) and emodel.policy is choice.policy
    assert choice.predicted_ms <= 6.0 + 1e-9
    # AdaptiveBudget is held to the target at its peak (2x its target by default): 3 tokens
    adaptive = budget_for_latency(emodel, frames[0], 6.0, make=AdaptiveBudget, latency=latency, apply=False)
    assert adaptive.policy.peak_tokens_per_frame(n) == 6
    assert adaptive.average_ms < adaptive.predicted_ms <= 6.0 + 1e-9
    assert emodel.policy is choice.policy  # apply=False left it alone


def test_measured_on_a_copy_with_a_progress_line(vit):
    model, frames = vit
    emodel = evtrace.transform(model, frames[0], policy=TopK(3))
    with torch.no_grad():
        first = [emodel(x) for x in frames[:2]]
    lines = []
    latency = measure_latency(emodel, frames[0], (0.2, 1.0), warmup=1, repeats=3, progress=lines.append)
    assert len(lines) == 2 and "ms per steady frame" in lines[0]
    assert all(s > 0 for s in latency.seconds) and latency.dense_seconds > 0
    assert latency.fractions == (4 / 17, 1.0)  # ceil(0.2 * 17) = 4 tokens
    # the model's stream went on as if nothing had been measured
    fresh = evtrace.transform(model, frames[0], policy=TopK(3))
    with torch.no_grad():
        expected = [fresh(x) for x in frames]
        rest = [emodel(x) for x in frames[2:]]
    for y, e in zip(first + rest, expected):
        assert torch.equal(y, e)
    assert repr(emodel.policy) == "TopK(r=3)"


def test_bad_targets_and_unreachable_ones_leave_the_model_unchanged(vit):
    model, frames = vit
    emodel = evtrace.transform(model, frames[0], policy=TopK(3))
    latency = LatencyModel.fit((0.1, 1.0), (0.005, 0.015), dense_seconds=0.02)
    for ms, error, match in (
        (0, ValueError, "ms must be a finite number > 0"),
        (-3.0, ValueError, "ms must be a finite number > 0"),
        (float("nan"), ValueError, "ms must be a finite number > 0"),
        ("5", TypeError, "ms must be a finite number > 0"),
    ):
        with pytest.raises(error, match=match):
            budget_for_latency(emodel, frames[0], ms, latency=latency)
    with pytest.raises(LatencyTargetError, match=r"no budget meets ms=2 .* takes 5\.00 ms .*not changed"):
        budget_for_latency(emodel, frames[0], 2.0, latency=latency)
    with pytest.raises(ValueError, match="fractions must be"):
        measure_latency(emodel, frames[0], (0.0, 0.5))
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        measure_latency(emodel, frames[0], repeats=0)
    with pytest.raises(TypeError, match="make must be a callable"):
        budget_for_latency(emodel, frames[0], 5.0, make=0.5, latency=latency)
    assert repr(emodel.policy) == "TopK(r=3)"
