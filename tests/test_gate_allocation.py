"""GateAllocation: one budget for the whole model, split across gates by accumulated error."""

import math

import pytest
import torch

import evtrace
from evtrace.runtime.policies import AdaptiveBudget, GateAllocation, Staleness, TopK, selected_mask
from tests.models import real_frames, small_vit

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (24, 24, 48)  # three gates of a pretend model
SCALES = (0.05, 1.0, 0.4)  # how much each gate's tokens change per frame


def drive(policy, frames: int, rows: int = 2, seed: int = 0, spikes: bool = False):
    """Run ``policy`` as a model with three gates would (start_frame, then one select per gate);
    errors of the tokens a gate left out carry over to the next frame, as a gate's would.
    Returns the tokens updated per frame, gate and row: (frames, gates, rows)."""
    gen = torch.Generator().manual_seed(seed)
    carried = [torch.zeros(rows, n) for n in SIZES]
    spent = []
    for t in range(frames):
        policy.start_frame()
        per_gate = []
        for g, (n, scale) in enumerate(zip(SIZES, SCALES)):
            boost = 6.0 if spikes and t % 13 == 7 else 1.0
            err = carried[g] + torch.rand(rows, n, generator=gen) * scale * boost
            updated = selected_mask(policy.select(err, torch.ones(rows, n)), n)
            carried[g] = err.masked_fill(updated, 0.0)
            per_gate.append(updated.sum(dim=1))
        spent.append(torch.stack(per_gate))
    return torch.stack(spent)


def test_the_total_over_gates_is_the_budget_every_frame_and_follows_the_error():
    spent = drive(GateAllocation(0.3), 40)
    total = round(0.3 * sum(SIZES))
    assert torch.all(spent[1:].sum(dim=1) == total)  # every frame, every row
    # the first sparse frame has no history: every gate takes the budget of its own tokens
    assert spent[0, :, 0].tolist() == [round(0.3 * n) for n in SIZES]
    steady = spent[5:].double().mean(dim=(0, 2))
    assert steady[1] > steady[2] > steady[0]  # gates that change more get more
    assert steady[1] > 0.3 * SIZES[1] and steady[0] < 0.3 * SIZES[0]
    lo = max(1, math.floor(0.3 / 4 * 24))
    assert int(spent[:, 0].min()) >= lo  # the floor holds


def test_adaptive_total_averages_its_target_and_never_exceeds_the_peaks():
    policy = GateAllocation(AdaptiveBudget(0.3, peak=0.6), peak=0.8)
    spent = drive(policy, 200, spikes=True).double()
    fraction = spent.sum(dim=1) / sum(SIZES)  # (frames, rows)
    assert fraction.max() > 0.45  # the spikes are given more
    for lo in (0, 100):
        mean = fraction[lo : lo + 100].mean(dim=0)
        assert torch.all((mean - 0.3).abs() <= 0.05 * 0.3), mean
    assert fraction.max() <= 0.6 + 1 / sum(SIZES)
    for g, n in enumerate(SIZES):
        assert spent[:, g].max() <= math.ceil(0.8 * n)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GateAllocation(0.25),
        lambda: GateAllocation(AdaptiveBudget(0.3), relative=True),
        lambda: Staleness(GateAllocation(0.2), 4),
    ],
    ids=["fixed", "adaptive", "staleness"],
)
def test_rows_are_independent(make):
    both, alone = make(), [make(), make()]
    gen = torch.Generator().manual_seed(4)
    for t in range(30):
        for p in (both, *alone):
            p.start_frame()
        for n, scale in zip(SIZES, SCALES):
            err = torch.rand(2, n, generator=gen) * scale * (1 + (t % 5))
            err[1] *= 3.0 if t % 7 == 2 else 0.5
            ref = torch.rand(2, n, generator=gen) + 0.5
            joint = selected_mask(both.select(err, ref), n)
            for b in range(2):
                single = selected_mask(alone[b].select(err[b : b + 1], ref[b : b + 1]), n)
                assert torch.equal(joint[b], single[0]), (t, n, b)


def test_bad_arguments_raise_clear_errors_and_leave_the_stream_unchanged():
    for make, match in (
        (lambda: GateAllocation(-0.2), "budget must be a fraction"),
        (lambda: GateAllocation(1.5), "budget must be a fraction"),
        (
            lambda: GateAllocation("half"),
            "budget must be a fraction of the tokens in \\(0, 1\\] or an AdaptiveBudget",
        ),
        (lambda: GateAllocation(0.5, peak=0.3), "peak must be >= the budget's target"),
        (lambda: GateAllocation(AdaptiveBudget(0.5), peak=0.4), "peak must be >= the budget's target"),
        (lambda: GateAllocation(0.5, low=0.7), "low must be <= the budget's target"),
        (lambda: GateAllocation(0.5, low=0), "low must be a fraction"),
        (lambda: GateAllocation(0.5, relative=1), "relative must be a bool"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            make()
    model, _ = small_vit()
    frames = real_frames(64, 6)
    emodel = evtrace.transform(model, frames[0], policy=GateAllocation(0.3))
    reference = evtrace.transform(model, frames[0], policy=GateAllocation(0.3))
    with torch.no_grad():
        for i, x in enumerate(frames):
            if i == 3:
                with pytest.raises(ValueError, match="peak must be"):
                    emodel.set_policy(GateAllocation(0.5, peak=0.2))
                assert repr(emodel.policy) == "GateAllocation(0.3, low=0.075, peak=1)"
            assert torch.equal(emodel(x), reference(x))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return small_vit()[0], real_frames(64, 8)


def _run(emodel, frames):
    with torch.no_grad():
        return [emodel(x) for x in frames]


@pytest.mark.parametrize(
    "policy",
    [GateAllocation(1.0), GateAllocation(AdaptiveBudget(1.0)), Staleness(GateAllocation(1.0), 3)],
    ids=repr,
)
def test_full_update_equals_the_original(vit, policy):
    model, frames = vit
    emodel = evtrace.transform(model, frames[0], policy=policy)
    for x, y in zip(frames, _run(emodel, frames)):
        with torch.no_grad():
            ref = model(x)
        assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize(
    "make",
    [
        lambda: GateAllocation(0.3),
        lambda: GateAllocation(AdaptiveBudget(0.3, buckets=3)),
        lambda: Staleness(GateAllocation(0.2), 4),
    ],
    ids=["fixed", "adaptive", "staleness"],
)
def test_batch_of_streams_equals_single_stream_runs(vit, make):
    model, frames = vit
    other = [f.flip(-1) * 0.9 for f in frames]
    batch = [torch.cat([a, b]) for a, b in zip(frames, other)]
    emodel = evtrace.transform(model, batch[0], policy=make())
    joint = _run(emodel, batch)
    for b, stream in enumerate((frames, other)):
        single = _run(evtrace.transform(model, stream[0], policy=make()), stream)
        for y, s in zip(joint, single):
            assert torch.allclose(y[b : b + 1], s, atol=1e-5, rtol=1e-4)


def test_a_stream_reset_in_a_batch_restarts_its_split_alone(vit):
    model, frames = vit
    other = [f.flip(-1) * 0.9 for f in frames]
    batch = [torch.cat([a, b]) for a, b in zip(frames, other)]
    emodel = evtrace.transform(model, batch[0], policy=GateAllocation(AdaptiveBudget(0.3)), scene_cut=None)
    with torch.no_grad():
        for x in batch[:4]:
            emodel(x)
        emodel.reset(stream=1)
        joint = [emodel(x) for x in batch[4:]]
    restarted = evtrace.transform(model, other[4], policy=GateAllocation(AdaptiveBudget(0.3)), scene_cut=None)
    single = _run(restarted, other[4:])
    for y, s in zip(joint, single):
        assert torch.allclose(y[1:2], s, atol=1e-5, rtol=1e-4)


def test_the_split_differs_between_gates_of_a_model_and_the_total_holds(vit):
    model, frames = vit
    policy = GateAllocation(0.3)
    emodel = evtrace.transform(model, frames[0], policy=policy, scene_cut=None)
    seen: dict[str, list[int]] = {}
    for name, region in emodel.regions().items():
        seen[name] = []
        region.register_forward_hook(
            lambda _m, _i, out, name=name: seen[name].append(None if out[-1] is None else out[-1].shape[1])
        )
    _run(emodel, frames + frames[::-1])
    sizes = {name: r.gate.tokens for name, r in emodel.regions().items()}
    counts = list(zip(*seen.values()))[2:]  # frame 0 is dense, frame 1 has no history yet
    assert len(counts) == 2 * len(frames) - 2 and all(None not in c for c in counts)
    total = round(0.3 * sum(sizes.values()))
    assert all(sum(c) == total for c in counts)
    assert any(len(set(c)) > 1 for c in counts)  # not one uniform r


def test_count_flops_prices_the_target_at_every_gate(vit):
    model, frames = vit
    x = frames[0]
    emodel = evtrace.transform(model, x, policy=TopK(4))
    # N = 17: ceil(0.25 * 17) = 5 per gate, as TopK(5); the peak (1.0) is N
    allocation = evtrace.count_flops(emodel, x, policy=GateAllocation(0.25))
    assert allocation.steady == evtrace.count_flops(emodel, x, policy=TopK(5)).steady
    assert set(allocation.tokens_per_gate.values()) == {5}
    assert GateAllocation(0.25).peak_tokens_per_frame(17) == 17
    assert GateAllocation(0.25, peak=0.5).peak_tokens_per_frame(17) == 9
