"""Nothing changed, nothing spent: the skips of the hot path, against the reference simulator.

A gate whose selected tokens all equal their references skips its region (the exit buffers
already hold f(reference)); attention whose queries and keys did not change returns its last
output; the default policy's floor takes only tokens that changed (or are forced). Each skip must
be exact: streams mixing repeated frames, frames with one token changed and moving frames equal
tests/reference.py frame by frame (with its state invariants), for every kind of policy and for
a batch of one static and one moving stream; and each skip must fire where nothing changed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import evtrace
from evtrace.runtime.attention import ExactDeltaAttention, GroupedDeltaAttention, PaperDeltaAttention
from evtrace.runtime.policies import AdaptiveBudget, SteeredThreshold, selected_mask
from tests.models import real_frames, small_dinov2, small_vit, small_vitdet
from tests.reference import InvariantChecker, ReferenceStream, relative_error

TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def one_token_changed(x: torch.Tensor, patch: int, row: int = 1, col: int = 2) -> torch.Tensor:
    y = x.clone()
    y[..., row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] += 0.3
    return y


def mixed_stream(size: int, patch: int) -> tuple[list[torch.Tensor], list[str]]:
    """Frames and what each is: the first frame again, one token changed, moving frames, and a
    static tail long enough for every policy to catch up (TopK and the default policy's floor
    take the tokens left behind by the moving frames a few per frame)."""
    f = real_frames(size, 4, patch_size=patch)
    one = one_token_changed(f[0], patch)
    tail = 45  # the default policy catches up low N tokens per gate and frame, gate after gate
    frames = [f[0], f[0], one, one, f[1], f[2], f[2], f[3]] + [f[3]] * tail
    kinds = (
        ["first", "same", "one token", "", "moving", "moving", "", "moving"] + [""] * (tail - 1) + ["same"]
    )
    return frames, kinds


class Counter:
    """Per frame: which regions ran their sparse graph and which attention sites kept their output."""

    def __init__(self, emodel):
        self.sparse: list[set[str]] = []
        self.kept: list[set[str]] = []
        self.indices: list[dict[str, torch.Tensor | None]] = []
        self._sparse, self._kept, self._index = set(), set(), {}
        for name, region in emodel.regions().items():
            region.sparse.register_forward_hook(lambda *_, name=name: self._sparse.add(name))
            region.register_forward_hook(
                lambda _m, _i, out, name=name: self._index.__setitem__(name, out[-1])
            )
        self.sites = {
            name: m
            for name, m in emodel.attention_modules().items()
            if isinstance(m, (ExactDeltaAttention, PaperDeltaAttention))
        }
        for name, m in self.sites.items():
            m._kept_output = self._spy(m._kept_output, name)

    def _spy(self, fn, name):
        def kept(*args):
            out = fn(*args)
            if out is not None:
                self._kept.add(name)
            return out

        return kept

    def frame_done(self) -> None:
        self.sparse.append(self._sparse)
        self.kept.append(self._kept)
        self.indices.append(self._index)
        self._sparse, self._kept, self._index = set(), set(), {}


def run_with_reference(model, frames, policy, delta: bool = True, **options):
    """The eventful model and the reference side by side on ``frames``; returns (emodel, counter)."""
    policy = copy.deepcopy(policy)  # a stateful policy object starts afresh in each test
    emodel = evtrace.transform(model, frames[0], policy=policy, scene_cut=None, **options)
    if delta:  # the delta path of exact attention (at these small N it would recompute in full)
        for m in emodel.attention_modules().values():
            if isinstance(m, ExactDeltaAttention):
                m.full_when_cheaper = False
    counter = Counter(emodel)
    sim = ReferenceStream(model, frames[0], policy)
    checker = InvariantChecker(emodel)
    with torch.no_grad():
        for i, frame in enumerate(frames):
            got, want = emodel(frame), sim(frame)
            checker.check()
            counter.frame_done()
            err = relative_error(got, want)
            assert err <= TOL, (i, err)
    return emodel, counter


POLICIES = [
    evtrace.TopK(5),
    evtrace.Threshold(0.3),
    evtrace.Threshold(0.05, relative=True),
    SteeredThreshold(0.5),
]


@pytest.mark.parametrize("delta", [True, False], ids=["delta", "full-when-cheaper"])
@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_mixed_stream_equals_the_reference_and_skips_where_nothing_changed(policy, delta):
    model, _ = small_vit()
    frames, kinds = mixed_stream(64, 16)
    emodel, counter = run_with_reference(model, frames, policy, delta=delta)
    regions = set(emodel.regions())
    for i, kind in enumerate(kinds):
        if kind == "same":  # nothing changed: no region computes, every site keeps its output
            assert counter.sparse[i] == set(), (i, counter.sparse[i])
            assert counter.kept[i] == set(counter.sites), (i, counter.kept[i])
            assert all(index.shape[1] == 0 for index in counter.indices[i].values())
        elif kind == "one token" and not isinstance(policy, evtrace.Threshold):
            # the changed token reaches the first gate; the forced class token rides along
            first = next(iter(emodel.regions()))
            assert first in counter.sparse[i]
            assert 1 + 1 * 4 + 2 in counter.indices[i][first][0].tolist()
        elif kind == "moving" and not isinstance(policy, evtrace.Threshold):
            assert counter.sparse[i] == regions, (i, counter.sparse[i])
            assert not counter.kept[i] & set(counter.sites)


@pytest.mark.parametrize("policy", [evtrace.TopK(20), SteeredThreshold(0.5)], ids=repr)
def test_windowed_attention_keeps_its_output_and_equals_the_reference(policy):
    """ViTDet: windowed (grouped) and global sites, padded entry layouts."""
    model, _ = small_vitdet()
    f = real_frames(160, 3)
    frames = [f[0], f[0], one_token_changed(f[0], 16, 4, 5), f[1], f[2], f[2]]
    emodel, counter = run_with_reference(model, frames, policy, delta=False)
    sites = set(counter.sites)
    assert any(isinstance(m, GroupedDeltaAttention) for m in counter.sites.values())
    assert counter.sparse[1] == set() and counter.kept[1] == sites  # the first frame again
    assert not counter.kept[3] & sites  # moving


def test_default_policy_spends_only_the_changed_tokens_at_the_first_gate():
    """One token changed: the default policy's floor (low N) no longer adds unchanged tokens."""
    model, _ = small_dinov2()
    f = real_frames(56, 2, patch_size=14)
    one = one_token_changed(f[1], 14)
    emodel, counter = run_with_reference(model, [f[0], f[1], one], SteeredThreshold(0.5))
    first = next(iter(emodel.regions()))
    prefix = 3  # class + 2 registers, forced
    assert counter.indices[2][first].shape[1] == prefix + 1


@pytest.mark.parametrize("policy", [evtrace.TopK(5), evtrace.Threshold(0.3), SteeredThreshold(0.5)], ids=repr)
def test_one_static_and_one_moving_stream_equal_the_reference(policy):
    """Batch rows are independent streams: a static stream next to a moving one must not make the
    moving one skip, and the static one's state must stay exact."""
    model, _ = small_vit()
    f = real_frames(64, 6)
    frames = [torch.cat([f[0], f[0]])] + [torch.cat([f[0], x]) for x in f[1:]]
    frames += [torch.cat([f[0], f[-1]])] * 45  # then both static until every policy caught up
    emodel, counter = run_with_reference(model, frames, policy)
    regions = set(emodel.regions())
    if not isinstance(policy, evtrace.Threshold):
        for i in range(1, len(f)):
            assert counter.sparse[i] == regions, i
    assert counter.sparse[-1] == set()


# ----------------------------------------------------------------------------- the policy floor


def test_steered_threshold_selects_only_forced_tokens_when_nothing_changed_and_keeps_tau():
    policy = SteeredThreshold(0.5, tau=0.1, rate=0.5)
    n, forced = 16, torch.zeros(16, dtype=torch.bool)
    forced[0] = True
    ones = torch.ones(2, n)
    error = torch.zeros(2, n)
    error[1, 5] = 1e-3  # stream 1: one token changed, far below tau
    for _ in range(5):
        policy.start_frame()
        mask = selected_mask(policy.select(error, ones, forced), n)
        # stream 0: only the forced token; stream 1: that and the changed one (the floor takes it)
        assert mask[0].nonzero().flatten().tolist() == [0]
        assert mask[1].nonzero().flatten().tolist() == [0, 5]
    policy.start_frame()
    log_tau = policy._streams[2]["log_tau"]
    assert float(log_tau[0]) == pytest.approx(math.log(0.1))  # nothing of stream 0 changed
    assert float(log_tau[1]) < math.log(0.1)  # stream 1 spent 2 of 16 against 8: tau fell


def test_steered_threshold_floor_is_unchanged_when_enough_tokens_changed():
    policy = SteeredThreshold(0.5, tau=10.0)
    error = torch.rand(1, 32) + 0.01  # every token changed, none above tau
    policy.start_frame()
    index, _ = policy.select(error, torch.ones_like(error))
    assert index.shape[1] == 4  # low = target / 4 = 1/8 of 32


def test_adaptive_budget_floor_takes_only_changed_tokens():
    policy = AdaptiveBudget(0.5, relative=False)
    error = torch.zeros(1, 32)
    error[0, 3] = 1.0
    policy.start_frame()
    index, _ = policy.select(error)  # first frame: demand = its own mean, desired = target
    assert index.shape[1] == 16
    error = torch.zeros(1, 32)
    error[0, 7] = 1e-6  # a quiet frame: desired rounds to 0, the floor (low = 4) takes the one change
    policy.start_frame()
    index, _ = policy.select(error)
    assert index[0].tolist() == [7]


# ----------------------------------------------------------------------------- attention


def _qkv(b=2, h=2, n=12, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen) for _ in range(3)]


def _dense(q, k, v, scale):
    return torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1) @ v.double()


@pytest.mark.parametrize("full", [False, True], ids=["delta", "full-when-cheaper"])
def test_attention_returns_its_output_only_when_nothing_changed(full):
    q, k, v = _qkv()
    m = ExactDeltaAttention(0.35, full_when_cheaper=full)
    none = torch.zeros(2, 0, dtype=torch.long)
    first = m(q, k, v, None, None)
    assert m(q, k, v, none, none) is first  # nothing changed: the same tensor, no work
    # Writes through .data leave the version counters alone: only the index says what changed
    # (as for inputs that are fresh tensors each frame, which the allocator may place alike).
    # A key changed (queries did not): computed again.
    k.data[:, :, 3] += 1.0
    out = m(q, k, v, none, torch.tensor([[3], [3]]))
    assert out is not first
    assert torch.allclose(out.double(), _dense(q, k, v, 0.35), atol=1e-6)
    assert m(q, k, v, none, none) is out
    # a query changed (keys did not): computed again
    q.data[:, :, 5] -= 1.0
    out = m(q, k, v, torch.tensor([[5], [5]]), none)
    assert torch.allclose(out.double(), _dense(q, k, v, 0.35), atol=1e-6)


def test_attention_kept_output_is_dropped_on_writes_resets_and_restarts():
    q, k, v = _qkv()
    none = torch.zeros(2, 0, dtype=torch.long)
    m = ExactDeltaAttention(0.35, full_when_cheaper=True)  # recomputes from the buffers alone
    out = m(q, k, v, none, none)
    assert m(q, k, v, none, none) is out
    out.mul_(0.0)  # the caller writes into the returned output: it is not returned again
    again = m(q, k, v, none, none)
    assert again is not out
    assert torch.allclose(again.double(), _dense(q, k, v, 0.35), atol=1e-6)
    kept = m(q, k, v, none, none)
    m.reset()
    assert m(q, k, v, none, none) is not kept
    kept = m(q, k, v, none, none)
    m.reset_stream(1)
    assert m(q, k, v, none, none) is not kept
    kept = m(q, k, v, none, none)
    m._fresh_streams = ()  # a restored stream checkpoint sets the pending restarts
    assert m(q, k, v, none, none) is not kept
    # fresh copies of unchanged q, k, v (windows are copied every call): the index decides
    kept = m(q, k, v, none, none)
    assert m(q.clone(), k.clone(), v.clone(), none, none) is kept


def test_paper_and_grouped_attention_keep_their_output():
    q, k, v = _qkv()
    none = torch.zeros(2, 0, dtype=torch.long)
    paper = PaperDeltaAttention(0.35)
    paper(q, k, v, None, None)
    out = paper(q, k, v, torch.tensor([[1], [1]]), torch.tensor([[1], [1]]))
    assert paper(q, k, v, none, none) is out
    # two streams of 12 tokens in groups of 6 (rows = 4 groups x 1 head)
    ids = torch.arange(1, 25).reshape(4, 6)
    gq, gk, gv = (t.reshape(4, 1, 6, 8) for t in _qkv(b=2, h=1, n=12))
    grouped = GroupedDeltaAttention(
        0.35, group_ids=ids, offset=0, streams=2, tokens=12, full_when_cheaper=True
    )
    grouped(gq, gk, gv, None, None)
    out = grouped(gq, gk, gv, torch.tensor([[0], [0]]), torch.tensor([[0], [0]]))
    assert grouped(gq, gk, gv, none, none) is out
    gk[2, :, 1] += 1.0  # stream 1's token 1 (group 2)
    out = grouped(gq, gk, gv, none, torch.tensor([[0], [1]]))
    want = F.scaled_dot_product_attention(gq.double(), gk.double(), gv.double(), scale=0.35)
    assert torch.allclose(out.double(), want, atol=1e-6)
