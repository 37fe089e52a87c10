"""The eventful model against an independent reference of its semantics (tests/reference.py).

Every frame: outputs equal the dense simulation with references (<= 1e-5 relative), gate
references, exit buffers and exact-attention state satisfy their invariants, and the delta path
of exact attention was really taken (at these small N it would otherwise run plain attention).
Real frames (bigbuckbunny), small zoo and HF models, every policy, overrides, prefixes,
refreshes, resets and batches of two streams.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import evtrace
import models_zoo
from evtrace.runtime.attention import ExactDeltaAttention
from tests.models import (
    hf_models,
    real_clips,
    real_frames,
    small_dinov2,
    small_vit,
    small_vitdet,
    small_vivit,
)
from tests.reference import InvariantChecker, ReferenceStream, relative_error

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


class DeltaSpy:
    """Forces the delta path of every exact site and counts what each call did."""

    def __init__(self, emodel):
        self.delta = 0  # delta updates
        self.full = 0  # full softmax-state computations (initialisations and fallbacks)
        self.kept = 0  # calls where nothing changed: the last output returned again
        self.sites = [m for m in emodel.attention_modules().values() if isinstance(m, ExactDeltaAttention)]
        for m in self.sites:
            m.full_when_cheaper = False
            m._delta = self._count(m._delta, "delta")
            m._full_state = self._count(m._full_state, "full")
            m._kept_output = self._count(m._kept_output, "kept", lambda out: out is not None)

    def _count(self, fn, what, hit=lambda out: True):
        def counted(*args):
            out = fn(*args)
            if hit(out):
                setattr(self, what, getattr(self, what) + 1)
            return out

        return counted

    def fallbacks(self) -> int:
        return sum(int(m.stats["refresh_count"]) for m in self.sites)


def run_pair(model, frames, policy, steps=None, batch_frames=None, always_update_prefix=True, **options):
    """Run the eventful model and the reference side by side; returns (errors, spy, emodel, sim).

    ``steps``: {frame: callable(emodel, sim)} applied before that frame (policy changes, resets).
    """
    emodel = evtrace.transform(
        model,
        frames[0],
        policy=policy,
        attention=options.pop("attention", "exact"),
        always_update_prefix=always_update_prefix,
        **options,
    )
    spy = DeltaSpy(emodel)
    sim = ReferenceStream(
        model,
        frames[0],
        policy,
        always_update_prefix=always_update_prefix,
        refresh_every=options.get("refresh_every"),
    )
    checker = InvariantChecker(emodel, always_update_prefix=always_update_prefix)
    errors = []
    with torch.no_grad():
        for i, frame in enumerate(frames):
            if steps and i in steps:
                steps[i](emodel, sim)
            got, want = emodel(frame), sim(frame)
            checker.check()
            errors.append(relative_error(got, want))
    assert checker.checks == len(frames)
    assert max(errors) <= TOL, errors
    return errors, spy, emodel, sim


def assert_partial_and_delta(model, frames, emodel, spy, dense_frames=1):
    """Every non-dense frame took the delta path at every exact site, with no fallback and no
    hidden full recompute, and the stream was really partial (it differs from the original)."""
    sites = len(spy.sites)
    assert sites > 0
    assert spy.delta == (len(frames) - dense_frames) * sites, (spy.delta, len(frames), sites)
    assert spy.fallbacks() == 0
    assert spy.full == dense_frames * sites, (spy.full, dense_frames, sites)  # initialisations only
    with torch.no_grad():
        emodel.reset()
        worst = max(relative_error(emodel(f), model(f)) for f in frames)
    assert worst > 1e-3, "the policy updated everything: the comparison proves nothing"


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def vit():
    model, _ = small_vit(depth=3)
    return model, real_frames(64, 6)


POLICIES = [
    evtrace.TopK(5),
    evtrace.TopFraction(0.3),
    evtrace.Threshold(0.3),
    evtrace.Threshold(0.05, relative=True),
    evtrace.FixedCapacityThreshold(1.0, capacity=6),
]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_vit_equals_the_reference_under_every_policy(vit, policy):
    model, frames = vit
    _, spy, emodel, sim = run_pair(model, frames, policy)
    assert_partial_and_delta(model, frames, emodel, spy)
    selected = [len(t) for frame in sim.history[1:] for s in frame.values() for t in s]
    assert 0 < sum(selected) < 17 * len(selected)  # partial
    if isinstance(policy, evtrace.FixedCapacityThreshold):  # some slots were masked
        assert min(selected) < policy.capacity, selected


def test_dense_attention_mode_equals_the_reference(vit):
    model, frames = vit
    run_pair(model, frames[:4], evtrace.TopK(4), attention="dense")


def test_dinov2_registers_are_forced_and_equal_the_reference():
    model, _ = small_dinov2()  # class token + 2 registers
    frames = real_frames(56, 5, patch_size=14)
    _, spy, emodel, sim = run_pair(model, frames, evtrace.TopK(5))
    assert_partial_and_delta(model, frames, emodel, spy)
    for name, chosen in sim.selected.items():
        assert all({0, 1, 2} <= set(tokens) for tokens in chosen), name


def test_prefix_not_forced_equals_the_reference():
    model, _ = small_dinov2()
    frames = real_frames(56, 5, patch_size=14)
    _, _, emodel, sim = run_pair(model, frames, evtrace.TopK(3), always_update_prefix=False)
    # with the prefix free, some gate leaves a prefix token out on some frame
    assert any(not {0, 1, 2} <= set(t) for s in sim.selected.values() if s for t in s)


@pytest.mark.parametrize("policy", [evtrace.TopK(20), evtrace.Threshold(0.5)], ids=repr)
def test_vitdet_windowed_and_global_equal_the_reference(policy):
    model, _ = small_vitdet()
    frames = real_frames(160, 5)
    _, spy, emodel, _ = run_pair(model, frames, policy)
    assert_partial_and_delta(model, frames, emodel, spy)


def test_vivit_equals_the_reference():
    model, _ = small_vivit()
    frames = real_clips(32, 5, 4)
    _, spy, emodel, _ = run_pair(model, frames, evtrace.TopK(3))
    assert_partial_and_delta(model, frames, emodel, spy)


@pytest.mark.parametrize("name,patch", [("hf_vit", 8), ("hf_dinov2", 7)])
def test_hf_models_equal_the_reference(name, patch):
    make, example, _ = hf_models()[name]
    model = make()
    frames = real_frames(example.shape[-1], 5, patch_size=patch)
    _, spy, emodel, _ = run_pair(model, frames, evtrace.TopK(4))
    assert emodel.report().frontend == "export"
    assert_partial_and_delta(model, frames, emodel, spy)


def test_peaky_attention_is_repaired_and_equals_the_reference():
    """Logit spreads as in real weights (q and k scaled up): a changed key can take most of a
    row's weight with it (cancellation); the repair rows recompute those rows, so that no
    fallback is needed and the stream equals the reference."""
    torch.manual_seed(0)
    model = models_zoo.vit(
        img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=0
    ).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:128].mul_(6.0)  # the q and k rows of the fused projection
    frames = real_frames(64, 8)
    _, spy, emodel, _ = run_pair(model, frames, evtrace.TopK(4))
    assert min(float(m.stats["worst_ratio_seen"]) for m in spy.sites) < 1e-3  # cancellation happened
    assert_partial_and_delta(model, frames, emodel, spy)


# ----------------------------------------------------------------------------- control


@pytest.mark.parametrize("gates", ["blocks.1", "blocks.1.mlp.fc1", ["blocks.0.attn.qkv", "blocks.2.mlp"]])
def test_per_gate_overrides_hit_the_regions_the_reference_names(vit, gates):
    model, frames = vit
    override = evtrace.TopK(2)
    hits = {}

    def set_override(emodel, sim):
        emodel.set_policy(override, gates=gates)
        hits["sim"] = sim.set_policy(override, gates=gates)

    _, _, emodel, sim = run_pair(model, frames, evtrace.TopK(8), steps={2: set_override})
    changed = sorted(name for name, r in emodel.regions().items() if r.gate.policy is override)
    assert changed == sorted(hits["sim"]) and 0 < len(changed) < len(emodel.regions())
    for name in changed:
        assert all(len(t) == 2 for t in sim.selected[name])


def test_budget_changes_and_resets_mid_stream_equal_the_reference(vit):
    model, frames = vit
    frames = frames + frames[::-1]

    def budget(emodel, sim):
        emodel.set_policy(evtrace.Threshold(0.2))
        sim.set_policy(evtrace.Threshold(0.2))

    def reset(emodel, sim):
        emodel.reset()
        sim.reset()

    _, spy, emodel, sim = run_pair(model, frames, evtrace.TopK(4), steps={3: budget, 7: reset})
    # the middle frame comes twice: the second time nothing changed and every site keeps its output
    assert spy.kept >= len(spy.sites)
    assert spy.delta + spy.kept >= (len(frames) - 2) * len(spy.sites)


def test_refresh_every_equals_the_reference(vit):
    model, frames = vit
    frames = frames + frames[::-1]
    errors, _, emodel, _ = run_pair(model, frames, evtrace.TopK(4), refresh_every=3)
    assert emodel.refreshes == 3  # frames 3, 6, 9 are dense
    with torch.no_grad():
        emodel.reset()
        outs = [emodel(f) for f in frames]
        for i in (0, 3, 6, 9):
            assert relative_error(outs[i], model(frames[i])) <= TOL, i
        assert relative_error(outs[5], model(frames[5])) > 1e-3


def _two_streams(frames):
    return [torch.cat([f, f.flip(-1)]) for f in frames]


@pytest.mark.parametrize(
    "policy",
    [evtrace.TopK(5), evtrace.Threshold(0.3), evtrace.FixedCapacityThreshold(1.0, capacity=6)],
    ids=repr,
)
def test_two_streams_equal_the_reference(vit, policy):
    model, frames = vit
    batch = _two_streams(frames)
    _, spy, emodel, sim = run_pair(model, batch, policy)
    assert_partial_and_delta(model, batch, emodel, spy)
    # the streams chose differently somewhere: indices are per stream, not a union
    assert any(s[0] != s[1] for s in sim.selected.values() if s)


def test_threshold_batch_selects_per_stream(vit):
    """Threshold in a batch takes the largest count over the streams: the other stream's extra
    slots must change nothing. Stream 1 is static, so it must select nothing."""
    model, frames = vit
    batch = [torch.cat([f, frames[0]]) for f in frames]
    _, _, emodel, sim = run_pair(model, batch, evtrace.Threshold(0.3), always_update_prefix=False)
    for name, chosen in sim.selected.items():
        assert chosen[1] == [], name
    assert any(len(s[0]) > 0 for s in sim.selected.values())


def test_reset_of_one_stream_equals_the_reference(vit):
    model, frames = vit
    batch = _two_streams(frames)

    def reset_one(emodel, sim):
        emodel.reset(stream=1)
        sim.reset(stream=1)

    run_pair(model, batch, evtrace.TopK(5), steps={3: reset_one})


# ----------------------------------------------------------------------------- fuzz


@functools.lru_cache(maxsize=1)
def _fuzz_frames():
    return tuple(real_frames(48, 30, start=30))


@st.composite
def fuzz_cases(draw):
    """Random small ViTs (class token or not, registers or not, explicit or fused attention),
    random policies, one stream or two, a drawn stretch of real frames."""
    heads = draw(st.sampled_from([1, 2]))
    patch = draw(st.sampled_from([8, 16]))
    config = dict(
        img_size=48,
        patch_size=patch,
        embed_dim=8 * heads,
        depth=draw(st.integers(1, 2)),
        num_heads=heads,
        num_classes=0,
        class_token=draw(st.booleans()),
        num_register_tokens=draw(st.sampled_from([0, 2])),
        use_sdpa=draw(st.booleans()),
    )
    n = (48 // patch) ** 2
    policy = draw(
        st.one_of(
            st.integers(1, n).map(evtrace.TopK),
            st.sampled_from([0.1, 0.3, 0.6]).map(evtrace.TopFraction),
            st.sampled_from([0.1, 0.5, 2.0]).map(evtrace.Threshold),
            st.sampled_from([0.05, 0.3]).map(lambda tau: evtrace.Threshold(tau, relative=True)),
            st.tuples(st.sampled_from([0.1, 0.5]), st.integers(1, n)).map(
                lambda a: evtrace.FixedCapacityThreshold(a[0], capacity=a[1])
            ),
        )
    )
    start = draw(st.integers(0, 24))
    return config, policy, draw(st.sampled_from([1, 2])), start, draw(st.integers(0, 2**16))


@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
)
@given(fuzz_cases())
def test_random_models_and_policies_equal_the_reference(case):
    config, policy, batch, start, seed = case
    torch.manual_seed(seed)
    model = models_zoo.vit(**config).eval()
    frames = list(_fuzz_frames()[start : start + 5])
    if batch == 2:
        frames = _two_streams(frames)
    run_pair(model, frames, policy)
