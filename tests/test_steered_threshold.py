"""SteeredThreshold: a relative threshold whose tau is steered to an average budget.

Checked against an independent per-frame reference written here (plain Python over the
frames), not against the policy's own code path: the tokens each gate selects, the controller's
tau after each frame, the average over long streams, the peak, batch independence, resets, the
full update, and bad arguments.
"""

import math

import pytest
import torch

import evtrace
from evtrace.runtime.policies import SteeredThreshold, TopFraction, selected_mask
from tests.models import real_frames, small_vit

pytestmark = pytest.mark.usefixtures("one_thread")

N = 64
GATES = 3


def demand(frames: int, rows: int = 2, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per frame, per gate, a (rows, N) relative error: quiet stretches, motion, spikes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(frames):
        scale = 0.02 if (t // 10) % 3 == 0 else 0.2
        if t % 17 == 5:
            scale = 2.0
        out.append([torch.rand(rows, N, generator=gen) * scale * (1 + g) for g in range(GATES)])
    return out


def run(policy, frames, rows: int | None = None):
    """The selected-token masks per frame and gate, driving the policy as EventfulModel does."""
    masks = []
    for gates in frames:
        policy.start_frame()
        per_gate = []
        for err in gates:
            err = err if rows is None else err[rows]
            per_gate.append(selected_mask(policy.select(err, torch.ones_like(err)), N))
        masks.append(per_gate)
    return masks


def reference_counts(frames, target, tau, rate, low, peak, levels=None):
    """Independent reference: per frame and gate, the per-row counts the policy must select
    (rounded up to the smallest of ``levels`` that holds them, when given)."""
    rows = frames[0][0].shape[0]
    log_tau = [math.log(tau)] * rows
    out = []
    for gates in frames:
        spent = [0] * rows
        per_gate = []
        for err in gates:
            counts = []
            for b in range(rows):
                above = sum(1 for v in err[b].tolist() if v > math.exp(log_tau[b]))
                count = min(peak, max(low, above))
                if levels is not None:
                    count = min(level for level in levels if level >= count)
                counts.append(count)
                spent[b] += counts[-1]
            per_gate.append(counts)
        out.append(per_gate)
        for b in range(rows):
            step = rate * (spent[b] / (GATES * N) - target) / target
            log_tau[b] = min(math.log(1e2), max(math.log(1e-4), log_tau[b] + step))
    return out


def test_selection_and_controller_match_an_independent_reference():
    frames = demand(60)
    policy = SteeredThreshold(0.3, tau=0.1, rate=0.1)
    masks = run(policy, frames)
    low, peak = math.floor(0.3 / 4 * N), math.ceil(0.6 * N)
    expected = reference_counts(frames, 0.3, 0.1, 0.1, low, peak)
    for t, (got, want) in enumerate(zip(masks, expected)):
        for g in range(GATES):
            assert got[g].sum(dim=1).tolist() == want[g], (t, g)
            # the selected tokens are the row's largest errors
            for b in range(2):
                chosen = frames[t][g][b][got[g][b]]
                left = frames[t][g][b][~got[g][b]]
                if chosen.numel() and left.numel():
                    assert chosen.min() >= left.max()


def test_buckets_round_each_count_up_to_a_capacity_level():
    frames = demand(60, seed=5)
    policy = SteeredThreshold(0.3, tau=0.1, rate=0.1, buckets=3)
    masks = run(policy, frames)
    low, peak = math.floor(0.3 / 4 * N), math.ceil(0.6 * N)
    levels = sorted({peak} | {round(low + (peak - low) * (i + 1) / 3) for i in range(3)})
    expected = reference_counts(frames, 0.3, 0.1, 0.1, low, peak, levels)
    seen = set()
    for t, (got, want) in enumerate(zip(masks, expected)):
        for g in range(GATES):
            counts = got[g].sum(dim=1).tolist()
            assert counts == want[g], (t, g)
            seen.update(counts)
    assert seen <= set(levels) and len(seen) > 1


def test_average_tracks_the_target_and_never_exceeds_the_peak():
    policy = SteeredThreshold(0.4, tau=0.5, peak=0.8, rate=0.1)
    masks = run(policy, demand(400, seed=1))
    spent = torch.stack([torch.stack([m.sum(dim=1) for m in gates]).sum(0) for gates in masks]).double()
    per_gate_max = max(int(m.sum(dim=1).max()) for gates in masks for m in gates)
    assert per_gate_max <= math.ceil(0.8 * N)
    mean = spent[100:].mean(dim=0) / (GATES * N)  # after the controller settles
    assert torch.all((mean - 0.4).abs() <= 0.05 * 0.4), mean
    assert spent.std(dim=0).min() > 0.05 * GATES * N  # the count follows the picture


def test_rows_are_independent_and_a_reset_restarts_tau():
    frames = demand(40, seed=3)
    joint = run(SteeredThreshold(0.3, rate=0.1), frames)
    for b in range(2):
        alone = run(SteeredThreshold(0.3, rate=0.1), frames, rows=slice(b, b + 1))
        for t in range(40):
            for g in range(GATES):
                assert torch.equal(joint[t][g][b], alone[t][g][0])
    policy = SteeredThreshold(0.3, rate=0.1)
    first = run(policy, frames[:20])
    run(policy, frames[20:])
    policy.reset_state(streams=[1], batch=2)
    again = run(policy, frames[:20])
    for t in range(20):
        for g in range(GATES):
            assert torch.equal(again[t][g][1], first[t][g][1])  # restarted from tau
    policy.reset_state()
    assert all(torch.equal(a, b) for x, y in zip(run(policy, frames[:20]), first) for a, b in zip(x, y))


def test_bad_arguments_raise_clear_errors():
    for make, match in (
        (lambda: SteeredThreshold(0.0), "target must be a fraction"),
        (lambda: SteeredThreshold(1.5), "target must be a fraction"),
        (lambda: SteeredThreshold(0.5, tau=0), "tau must be a finite real number > 0"),
        (lambda: SteeredThreshold(0.5, tau=float("inf")), "tau must be a finite real number > 0"),
        (lambda: SteeredThreshold(0.5, peak=0.3), "peak must be >= target"),
        (lambda: SteeredThreshold(0.5, low=0.6), "low must be <= target"),
        (lambda: SteeredThreshold(0.5, rate=0), "rate must be a fraction"),
        (lambda: SteeredThreshold(0.5, buckets=0), "buckets must be an int >= 1"),
        (lambda: SteeredThreshold(0.5, buckets=[]), "buckets must not be empty"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            make()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return small_vit()[0], real_frames(64, 8)


def test_full_update_equals_the_original(vit):
    model, frames = vit
    emodel = evtrace.transform(model, frames[0], policy=SteeredThreshold(1.0))
    with torch.no_grad():
        for x in frames:
            y, ref = emodel(x), model(x)
            assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_batch_of_streams_equals_single_stream_runs(vit):
    model, frames = vit
    other = [f.flip(-1) * 0.9 for f in frames]
    batch = [torch.cat([a, b]) for a, b in zip(frames, other)]
    emodel = evtrace.transform(model, batch[0], policy=SteeredThreshold(0.3, rate=0.2))
    with torch.no_grad():
        joint = [emodel(x) for x in batch]
    for b, stream in enumerate((frames, other)):
        single = evtrace.transform(model, stream[0], policy=SteeredThreshold(0.3, rate=0.2))
        with torch.no_grad():
            for y, x in zip(joint, stream):
                assert torch.allclose(y[b : b + 1], single(x), atol=1e-5, rtol=1e-4)


def test_count_flops_prices_the_target(vit):
    model, frames = vit
    steered = evtrace.transform(model, frames[0], policy=SteeredThreshold(0.5))
    fraction = evtrace.transform(model, frames[0], policy=TopFraction(0.5))
    assert evtrace.count_flops(steered, frames[0]).steady == evtrace.count_flops(fraction, frames[0]).steady


def test_a_scene_cut_keeps_tau_a_reset_does_not():
    frames = demand(40, seed=5)
    steady = SteeredThreshold(0.3, rate=0.1)
    cut = SteeredThreshold(0.3, rate=0.1)
    run(steady, frames[:20])
    run(cut, frames[:20])
    cut.reset_state(streams=[1], batch=2, cut=True)
    cut.reset_state(cut=True)
    after_steady, after_cut = run(steady, frames[20:]), run(cut, frames[20:])
    for a, b in zip(after_steady, after_cut):
        assert all(torch.equal(x, y) for x, y in zip(a, b))  # as if the cut had not happened
    fresh = run(SteeredThreshold(0.3, rate=0.1), frames[20:])
    assert any(not torch.equal(x, y) for a, b in zip(after_steady, fresh) for x, y in zip(a, b))


def test_the_eventful_model_passes_its_scene_cuts_on():
    from evtrace.tools import hard_video

    torch.manual_seed(0)
    model, _ = small_vit()
    stream = hard_video.stream("cuts", frames=12, size=64, patch=16)  # cuts at 3, 6, 9
    emodel = evtrace.transform(model, stream.frames[0], policy=SteeredThreshold(0.3, rate=0.3))
    policy = next(iter(emodel.regions().values())).gate.policy
    start = math.log(policy.tau)

    def tau_now():
        state = policy._streams.get(1)
        return start if state is None else float(state["log_tau"][0])

    seen = []
    with torch.no_grad():
        for x in stream.frames:
            before = emodel.refreshes
            emodel(x)
            seen.append((emodel.refreshes > before, tau_now()))
    cut_frames = [t for t, (refreshed, _) in enumerate(seen) if refreshed]
    assert cut_frames == list(stream.cuts)
    for t in cut_frames:
        # kept through the cut (not back at the start), and the dense cut frame spends nothing
        assert seen[t][1] != start and seen[t + 1][1] == seen[t][1]
    emodel.reset()
    assert policy._streams == {}  # a new stream starts from tau
