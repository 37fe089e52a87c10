"""Adaptive budgets and the staleness bound: averages, peaks, ages, exactness, batch independence."""

import math
import warnings

import pytest
import torch

import evtrace
from evtrace.runtime.policies import AdaptiveBudget, Selection, Staleness, TopK, selected_mask
from tests.models import real_frames, small_vit

pytestmark = pytest.mark.usefixtures("one_thread")

N = 64


def demand_stream(frames: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(error, reference_norm) per frame for 2 rows: quiet stretches, motion and spikes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(frames):
        scale = 0.05 if (t // 10) % 3 == 0 else 1.0
        if t % 17 == 5:
            scale = 8.0
        err = torch.rand(2, N, generator=gen) * scale
        err[1] *= 0.5 + (t % 7) / 7
        out.append((err, torch.ones(2, N)))
    return out


def counts(selection: Selection) -> torch.Tensor:
    return selected_mask(selection, N).sum(dim=1)


@pytest.mark.parametrize("buckets", [None, 4])
def test_adaptive_average_tracks_the_target_and_never_exceeds_the_peak(buckets):
    policy = AdaptiveBudget(0.4, peak=0.8, buckets=buckets)
    spent = []
    for err, ref in demand_stream(200):
        sel = policy.select(err, ref)
        assert sel.index.shape[1] <= math.ceil(0.8 * N)
        spent.append(counts(sel))
    spent = torch.stack(spent).double()  # (frames, rows)
    assert spent.max() <= math.ceil(0.8 * N)
    for lo in (0, 100):  # two windows of 100 frames
        mean = spent[lo : lo + 100].mean(dim=0)
        assert torch.all((mean - 0.4 * N).abs() <= 0.05 * 0.4 * N), mean
    if buckets is not None:
        levels = set(torch.unique(spent).long().tolist())
        assert len(levels) <= buckets + 1


def test_adaptive_gives_frames_that_change_more_more_tokens():
    policy = AdaptiveBudget(0.3)
    gen = torch.Generator().manual_seed(1)
    got = []
    for t in range(30):
        scale = 10.0 if t == 20 else 1.0
        got.append(int(counts(policy.select(torch.rand(1, N, generator=gen) * scale, torch.ones(1, N)))))
    assert got[20] == math.ceil(0.6 * N)  # the spike takes the peak
    assert got[21] < 0.3 * N  # and is paid back next


def test_adaptive_and_staleness_rows_are_independent():
    for make in (
        lambda: AdaptiveBudget(0.3, buckets=3),
        lambda: Staleness(TopK(5), 4),
        lambda: Staleness(AdaptiveBudget(0.2), 3),
    ):
        both, alone = make(), [make(), make()]
        for err, ref in demand_stream(40, seed=3):
            joint = selected_mask(both.select(err, ref), N)
            for b in range(2):
                single = selected_mask(alone[b].select(err[b : b + 1], ref[b : b + 1]), N)
                assert torch.equal(joint[b], single[0])


@pytest.mark.parametrize("inner", [TopK(3), AdaptiveBudget(0.1)])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_staleness_bound_on_every_token(inner, k):
    policy = Staleness(inner, k)
    age = torch.zeros(2, N, dtype=torch.long)
    gen = torch.Generator().manual_seed(2)
    fixed = torch.rand(2, N, generator=gen)  # the same tokens always lead: the others only age
    for _ in range(30):
        updated = selected_mask(policy.select(fixed.clone(), torch.ones(2, N)), N)
        age = torch.where(updated, torch.zeros_like(age), age + 1)
        assert int(age.max()) < k  # no token went k frames without an update


def test_bad_arguments_raise_clear_errors_and_leave_the_stream_unchanged():
    for make, match in (
        (lambda: AdaptiveBudget(-0.5), "target must be a fraction"),
        (lambda: AdaptiveBudget(0.0), "target must be a fraction"),
        (lambda: AdaptiveBudget(0.5, peak=0.3), "peak must be >= target"),
        (lambda: AdaptiveBudget(0.5, low=0.6), "low must be <= target"),
        (lambda: AdaptiveBudget(0.5, buckets=0), "buckets must be an int >= 1"),
        (lambda: AdaptiveBudget(0.5, gain=0), "gain must be a fraction"),
        (lambda: Staleness(TopK(4), 0), "k must be an int >= 1"),
        (lambda: Staleness(TopK(4), 2.5), "k must be an int >= 1"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            make()
    torch.manual_seed(0)
    model, _ = small_vit()
    frames = real_frames(64, 6)
    emodel = evtrace.transform(model, frames[0], policy=Staleness(TopK(4), 3))
    reference = evtrace.transform(model, frames[0], policy=Staleness(TopK(4), 3))
    with torch.no_grad():
        for i, x in enumerate(frames):
            if i == 3:
                with pytest.raises(ValueError):
                    emodel.set_policy(AdaptiveBudget(0.5, peak=0.2))
                assert repr(emodel.policy) == "Staleness(TopK(r=4), k=3)"
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
    [AdaptiveBudget(1.0), Staleness(TopK(2), 1), Staleness(AdaptiveBudget(1.0), 3)],
    ids=repr,
)
def test_full_update_equals_the_original(vit, policy):
    model, frames = vit
    emodel = evtrace.transform(model, frames[0], policy=policy)
    with torch.no_grad():
        for x, y in zip(frames, _run(emodel, frames)):
            ref = model(x)
            assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize(
    "make",
    [
        lambda: AdaptiveBudget(0.3, buckets=3),
        lambda: Staleness(TopK(4), 3),
        lambda: Staleness(AdaptiveBudget(0.2), 4),
    ],
    ids=["adaptive", "staleness", "staleness(adaptive)"],
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


def test_staleness_holds_at_every_gate_of_a_model(vit):
    """One policy object serves every gate: its state is per gate (call slot), so the bound holds
    at each gate, and a reset restarts the ages."""
    model, frames = vit
    k = 3
    emodel = evtrace.transform(model, frames[0], policy=Staleness(TopK(2), k), scene_cut=None)
    seen: dict[str, list] = {}
    for name, region in emodel.regions().items():
        seen[name] = []
        region.register_forward_hook(lambda _m, _i, out, name=name: seen[name].append(out[-1]))
    stream = frames + frames[::-1]
    _run(emodel, stream)
    assert len(seen) >= 2
    for name, indices in seen.items():
        n = emodel.regions()[name].gate.tokens
        age = torch.zeros(n, dtype=torch.long)
        for index in indices[1:]:  # frame 0 is dense
            hit = torch.zeros(n, dtype=torch.bool)
            hit[index[0]] = True
            if index.shape[1] == 0:  # the repeated frame: nothing changed, every reference is current
                hit[:] = True
            age = torch.where(hit, torch.zeros_like(age), age + 1)
            assert int(age.max()) < k, name


# ----------------------------------------------------------------------------- pricing

# The small ViT by hand: N = 16 patches + 1 class token = 17 tokens, D = 64, MLP 256. Per token
# (paper convention, a linear = in out + out): region 0 is qkv (64 x 192 + 192) and the position
# embedding add (64); the last region is proj (64 x 64 + 64), fc1 (64 x 256 + 256), fc2
# (256 x 64 + 64) and two residual adds (2 x 64). The gates' subtractions c - p: 17 x 64 per entry.
N_VIT = 17
QKV_PER_TOKEN = 64 * 192 + 192 + 64
LAST_PER_TOKEN = (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64) + 2 * 64
GATE_SUB = N_VIT * 64
FIRST, LAST = "blocks.0.attn.qkv", "blocks.1.attn.proj..blocks.1.mlp.fc2"


def _by_hand(r: int) -> dict[str, int]:
    return {FIRST: r * QKV_PER_TOKEN + GATE_SUB, LAST: r * LAST_PER_TOKEN + 2 * GATE_SUB}


@pytest.mark.parametrize(
    "policy, r, peak",
    [
        (AdaptiveBudget(0.25), 5, 9),  # ceil(0.25 * 17) = 5 on average, ceil(0.5 * 17) = 9 at most
        (AdaptiveBudget(0.3, peak=1.0), 6, 17),
        (AdaptiveBudget(0.5, buckets=3), 9, 17),
        (Staleness(AdaptiveBudget(0.25), 4), 10, 14),  # + ceil(17 / 4) = 5 due tokens
        (Staleness(TopK(3), 8), 6, 6),
    ],
    ids=repr,
)
def test_count_flops_prices_the_average_and_keeps_the_peak(vit, policy, r, peak):
    model, frames = vit
    x = frames[0]
    emodel = evtrace.transform(model, x, policy=TopK(4))
    assert policy.mean_tokens_per_frame(N_VIT) == r
    assert policy.peak_tokens_per_frame(N_VIT) == peak
    count = evtrace.count_flops(emodel, x, policy=policy)
    for layer, flops in _by_hand(r).items():
        assert count.per_layer[layer] == flops, layer
    assert set(count.tokens_per_gate.values()) == {r}
    # the sympy cost model (inspect) prices it the same, and states the peak beside it
    report = evtrace.inspect(model, x, policy=policy)
    assert report.costs.steady() == count.steady
    assert report.costs.per_layer()[LAST] == _by_hand(r)[LAST]
    if peak != r:
        line = report.extra["steady FLOPs at the peak budgets (latency bound)"]
        at_peak = evtrace.count_flops(emodel, x, policy=TopK(peak)).steady
        assert f"{at_peak / 1e9:.3f} G" in line
    else:
        assert not report.extra


def test_report_and_savings_warning_use_the_average(vit):
    model, frames = vit
    x = frames[0]
    policy = AdaptiveBudget(0.3, peak=1.0)  # the peak is dense: priced there, it would warn
    with warnings.catch_warnings():
        warnings.simplefilter("error", evtrace.LowSavingsWarning)
        emodel = evtrace.transform(model, x, policy=policy)
    from evtrace.advice import savings

    assert savings(emodel.plan, policy) == pytest.approx(savings(emodel.plan, TopK(6)))
    report = emodel.report()
    assert report.costs.per_layer()[LAST] == _by_hand(6)[LAST]
    assert "1.00x fewer than dense" in report.extra["steady FLOPs at the peak budgets (latency bound)"]
    assert "latency bound" in str(report)
    assert "latency bound" not in str(evtrace.transform(model, x, policy=TopK(6)).report())


def test_the_default_is_a_steered_threshold_priced_as_half_the_tokens(vit):
    from evtrace.runtime.policies import SteeredThreshold

    model, frames = vit
    x = frames[0]
    emodel = evtrace.transform(model, x)
    assert isinstance(emodel.policy, SteeredThreshold) and emodel.policy.target == 0.5
    assert emodel.policy.peak == 1.0  # a frame that changes everywhere may update every token
    # priced at ceil(0.5 * 17) = 9 tokens per gate, as TopFraction(0.5) was
    assert evtrace.count_flops(emodel, x).per_layer[LAST] == _by_hand(9)[LAST]
    assert evtrace.transform(model, x).policy is not emodel.policy  # one per model: its own state
