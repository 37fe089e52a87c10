"""evtrace.runtime.selection: the random baseline, the budget-keeping threshold and keyframes.

RandomTokens and Keyframes run in an eventful model against the independent simulator
(tests/reference.py: its own draws for RandomTokens, ``refresh_every`` for keyframes);
BudgetedThreshold's counts and bank against a plain-Python reference of its rule written here.
"""

import math

import pytest
import torch

import evtrace
from evtrace.runtime.policies import SteeredThreshold, TopK, selected_mask
from evtrace.runtime.selection import BudgetedThreshold, Keyframes, RandomTokens
from tests.models import real_frames, small_vit
from tests.reference import ReferenceStream, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

N = 64
GATES = 3


# ----------------------------------------------------------------------------- RandomTokens


def test_random_tokens_are_distinct_forced_first_seeded_and_ignore_the_error():
    forced = torch.zeros(N, dtype=torch.bool)
    forced[:2] = True
    a, b = RandomTokens(10, seed=3), RandomTokens(10, seed=3)
    error = torch.rand(4, N)
    for _ in range(5):
        sa = a.select(error, None, forced)
        sb = b.select(torch.rand(4, N), None, forced)  # another error, the same draws
        assert sa.mask is None and sa.index.shape == (4, 10)
        assert torch.equal(sa.index.sort(1).values, sb.index.sort(1).values)
        for row in sa.index.tolist():
            assert len(set(row)) == 10 and {0, 1} <= set(row)
    other = RandomTokens(10, seed=4).select(error, None, forced).index.sort(1).values
    a.reseed()
    first = a.select(error, None, forced).index.sort(1).values
    assert torch.equal(first, RandomTokens(10, seed=3).select(error, None, forced).index.sort(1).values)
    assert not torch.equal(first, other)


def test_random_tokens_pick_every_token_about_equally_often():
    policy = RandomTokens(16, seed=0)
    counts = torch.zeros(N)
    draws = 2000
    for _ in range(draws):
        counts += selected_mask(policy.select(torch.rand(1, N)), N)[0].float()
    expected = draws * 16 / N  # 500; binomial sd about 19
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected * (1 - 16 / N))
    # the error plays no part: the tokens with the largest error are not favoured
    error = torch.arange(N, dtype=torch.float32)[None]
    top = sum(selected_mask(policy.select(error), N)[0, -16:].sum().item() for _ in range(200))
    assert top < 0.4 * 200 * 16


def test_random_tokens_reject_bad_arguments():
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        RandomTokens(0)
    with pytest.raises(TypeError, match="seed must be an int"):
        RandomTokens(3, seed=0.5)
    with pytest.raises(ValueError, match=r"r must be in \[1, N\] = \[1, 8\]"):
        RandomTokens(9).select(torch.rand(1, 8))


def _against_reference(policy, sim_policy, frames, refresh_every=None):
    model, _ = small_vit(depth=2)
    emodel = evtrace.transform(model, frames[0], policy=policy, scene_cut=None)
    sim = ReferenceStream(model, frames[0], sim_policy, refresh_every=refresh_every)
    errors = []
    with torch.no_grad():
        for x in frames:
            errors.append(relative_error(emodel(x), sim(x)))
        emodel.reset()
        partial = max(relative_error(emodel(x), model(x)) for x in frames)
    return errors, partial, sim


def test_random_tokens_in_an_eventful_model_equal_the_reference():
    frames = real_frames(64, 6)
    errors, partial, sim = _against_reference(RandomTokens(5, seed=1), RandomTokens(5, seed=1), frames)
    assert max(errors) <= 1e-5, errors
    assert partial > 1e-3  # really partial
    # the simulator drew for every gate of every sparse frame: 5 tokens each, not the top errors
    steady = [h for h in sim.history[1:]]
    assert all(len(sel[0]) == 5 for h in steady for sel in h.values())


# ----------------------------------------------------------------------------- Keyframes


def test_keyframes_equal_the_reference_with_a_refresh_every_k():
    frames = real_frames(64, 8)
    errors, partial, _ = _against_reference(Keyframes(TopK(5), 3), TopK(5), frames, refresh_every=3)
    assert max(errors) <= 1e-5, errors
    assert partial > 1e-3


def test_keyframes_select_everything_every_k_frames_and_announce_it():
    inner = SteeredThreshold(0.3)
    policy = Keyframes(inner, 3)
    calls = []
    inner.reset_state = lambda streams=None, batch=None, cut=False: calls.append(cut)
    policy.reset_state()  # a new stream: its dense frame 0 comes next
    widths = []
    for _ in range(10):
        policy.start_frame()
        widths.append(policy.select(torch.rand(1, N) * 0.01, torch.ones(1, N)).index.shape[1])
    assert [t for t, w in enumerate(widths) if w == N] == [3, 6, 9]
    assert calls == [False, True, True, True]  # the reset, then one announced refresh per keyframe
    with pytest.raises(ValueError, match="k must be an int >= 2"):
        Keyframes(TopK(3), 1)


# ----------------------------------------------------------------------------- BudgetedThreshold


def reference_budgeted(frames, dense, target, tau, rate, gain, bank, low, peak):
    """Per frame (None when dense) the per-gate counts of BudgetedThreshold, in plain Python:
    a frame's spend (a dense frame: 1) is settled into the bank when the next frame starts."""
    log_tau, money, pending, out = math.log(tau), 0.0, 0.0, []
    cap = bank * target
    for t, gates in enumerate(frames):
        step = pending + (target - 1.0 if t in dense else 0.0)
        money, pending = max(-cap, min(cap, money + step)), 0.0
        if t in dense:
            out.append(None)
            continue
        allowance = min(peak, max(low, round((target + gain * money) * N)))
        counts = []
        for err in gates:
            above = sum(1 for v in err[0].tolist() if v > math.exp(log_tau))
            counts.append(min(min(peak, max(low, above)), allowance))
        out.append(counts)
        spent = sum(counts) / (GATES * N)
        log_tau = min(math.log(1e2), max(math.log(1e-4), log_tau + rate * (spent - target) / target))
        pending = target - spent
    return out


def fast_video(frames: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.rand(1, N, generator=gen) * (0.3 + 0.1 * g) for g in range(GATES)] for _ in range(frames)]


def drive(policy, frames, dense):
    got = []
    for t, gates in enumerate(frames):
        if t in dense:
            policy.reset_state(cut=True)
            policy.start_frame()
            got.append(None)
            continue
        policy.start_frame()
        got.append([int(policy.select(e, torch.ones_like(e)).index.shape[1]) for e in gates])
    return got


def test_budgeted_threshold_counts_and_bank_match_a_plain_reference():
    frames, dense = fast_video(40), {10, 11, 25}
    policy = BudgetedThreshold(0.3, tau=0.1, rate=0.1, gain=0.3, bank=8.0)
    low, peak = policy._low_peak(N)
    assert drive(policy, frames, dense) == reference_budgeted(
        frames, dense, 0.3, 0.1, 0.1, 0.3, 8.0, low, peak
    )


def test_budgeted_threshold_keeps_the_budget_over_the_stream_dense_frames_included():
    """Fast video from the first frame and a dense frame every 10: SteeredThreshold overspends
    (its tau lags and the dense frames are not counted); the bank keeps the stream's average."""
    frames = fast_video(60, seed=1)
    dense = set(range(10, 60, 10))

    def spend(policy):
        counts = drive(policy, frames, dense)
        return sum(1.0 if c is None else sum(c) / (GATES * N) for c in counts) / len(counts)

    assert spend(SteeredThreshold(0.3, tau=0.1)) > 0.4
    assert abs(spend(BudgetedThreshold(0.3, tau=0.1)) - 0.3) < 0.03


def test_budgeted_threshold_spends_its_savings_on_a_spike():
    quiet = [[torch.full((1, N), 1e-4) for _ in range(GATES)] for _ in range(20)]
    spike = [[torch.rand(1, N) + 1.0 for _ in range(GATES)]]
    policy = BudgetedThreshold(0.25, peak=1.0)
    counts = drive(policy, quiet + spike, set())
    assert max(counts[-1]) > 0.5 * N  # the bank lets the spike through
    assert all(c <= policy._low_peak(N)[1] for c in counts[-1])


def test_budgeted_threshold_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gain must be a real number in"):
        BudgetedThreshold(0.3, gain=0.0)
    with pytest.raises(ValueError, match="bank must be a finite real number"):
        BudgetedThreshold(0.3, bank=-1)
    assert "BudgetedThreshold(target=0.3" in repr(BudgetedThreshold(0.3))


# ----------------------------------------------------------------------------- AttentionWeighted


def test_attention_weights_are_the_attention_sampled_queries_give_each_key():
    from evtrace.runtime.selection import AttentionWeighted
    from tests.models import small_dinov2

    model, x = small_dinov2(depth=2)
    frames = [x + 0.1 * t * torch.sin(x * (t + 1)) for t in range(4)]
    emodel = evtrace.transform(model, frames[0], policy=TopK(5), scene_cut=None)
    seen = {}
    for i, module in enumerate(emodel.attention_modules().values()):
        module.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, (args[0], args[1])))
    policy = AttentionWeighted(TopK(5), gamma=0.7, queries=4).attach(emodel)
    with torch.no_grad():
        for f in frames:
            emodel(f)
    for i, (q, k) in seen.items():
        q, k = q.double(), k.double()
        n, d = k.shape[2], k.shape[3]
        rows = sorted({round(j * (n - 1) / 3) for j in range(4)})
        received = torch.zeros(q.shape[0], n, dtype=torch.float64)
        for h in range(q.shape[1]):
            for r in rows:
                logits = torch.einsum("bd,bnd->bn", q[:, h, r], k[:, h]) / math.sqrt(d)
                received += torch.softmax(logits, dim=-1)
        received /= q.shape[1] * len(rows)
        want = (received * n).clamp_min(1e-3) ** 0.7
        assert torch.allclose(policy._weights[i].double(), want, rtol=1e-4, atol=1e-6)
    assert len(seen) == len(policy._weights) == 2


def test_attention_weighting_with_gamma_0_changes_nothing():
    from evtrace.runtime.selection import AttentionWeighted

    model, _ = small_vit(depth=2)
    frames = real_frames(64, 5)
    plain = evtrace.transform(model, frames[0], policy=TopK(5), scene_cut=None)
    weighted = evtrace.transform(model, frames[0], policy=TopK(5), scene_cut=None)
    policy = AttentionWeighted(TopK(5), gamma=0.0).attach(weighted)
    with torch.no_grad():
        for f in frames:
            assert torch.equal(plain(f), weighted(f))
    policy.detach()
    with pytest.raises(ValueError, match="gamma must be a finite real number >= 0"):
        AttentionWeighted(TopK(3), gamma=-1.0)


@pytest.mark.parametrize("wrap", ["Keyframes", "AttentionWeighted"])
def test_a_wrapped_stateful_policy_keeps_one_state_slot_per_gate(wrap):
    """The wrappers pass each frame on to the policy they wrap: a wrapped SteeredThreshold then
    keeps one state slot per gate, as it does alone (without frames it would reuse one slot)."""
    from evtrace.runtime.selection import AttentionWeighted

    model, _ = small_vit(depth=2)
    frames = real_frames(64, 4)
    inner = SteeredThreshold(0.5)
    if wrap == "Keyframes":
        policy = Keyframes(inner, k=3)
        emodel = evtrace.transform(model, frames[0], policy=policy, scene_cut=None)
    else:
        emodel = evtrace.transform(model, frames[0], policy=TopK(4), scene_cut=None)
        AttentionWeighted(inner).attach(emodel)
    with torch.no_grad():
        for x in frames[:2]:
            emodel(x)
    gates = len(emodel.regions())
    assert gates > 1 and len(inner._slots) == gates
