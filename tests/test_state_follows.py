"""State follows the stream, not the object: a copy (deepcopy, pickle, a stream file loaded into a
fresh transform) taken at any frame continues every stateful policy's stream bit for bit; a
stateful policy object given to a second model is copied, never shared; the eventful model stays
in eval semantics whatever ``train()`` is called on."""

from __future__ import annotations

import copy
import pickle
import random
import warnings

import pytest
import torch
from torch import nn

import evtrace
from evtrace.runtime import policies as P
from tests.models import real_frames, small_vit

FRAMES = real_frames(64, 9)
pytestmark = pytest.mark.usefixtures("one_thread")

#: every stateful policy (and the wrappers around them), made afresh per call
STATEFUL = {
    "adaptive": lambda: P.AdaptiveBudget(0.4),
    "adaptive-buckets": lambda: P.AdaptiveBudget(0.4, buckets=3, relative=False),
    "steered": lambda: P.SteeredThreshold(0.4),
    "steered-fast": lambda: P.SteeredThreshold(0.3, rate=0.3, buckets=2),
    "staleness-topk": lambda: P.Staleness(P.TopK(5), k=3),
    "staleness-steered": lambda: P.Staleness(P.SteeredThreshold(0.4), k=4),
    "allocation": lambda: P.GateAllocation(0.4),
    "allocation-adaptive": lambda: P.GateAllocation(P.AdaptiveBudget(0.4)),
}


def _run(emodel, frames):
    with torch.no_grad():
        return [emodel(f).clone() for f in frames]


def _stream(frames, batch):
    if batch == 1:
        return frames
    return [torch.cat([f, f.flip(-1)]) for f in frames]


def _continued(how, emodel, model, make, tmp_path):
    if how == "deepcopy":
        return copy.deepcopy(emodel)
    if how == "pickle":
        return pickle.loads(pickle.dumps(emodel))
    emodel.save_stream(tmp_path / "stream.pt")
    fresh = evtrace.transform(model, emodel._example_for_tests, policy=make())
    fresh.load_stream(tmp_path / "stream.pt")
    return fresh


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "save-load"])
@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_a_copy_at_a_random_frame_continues_every_stateful_policy_bit_for_bit(name, how, batch, tmp_path):
    make = STATEFUL[name]
    rng = random.Random(f"{name}-{how}-{batch}")
    frames = _stream(FRAMES, batch)
    model = small_vit()[0]
    for at in sorted(rng.sample(range(1, len(frames) - 1), 2)):
        emodel = evtrace.transform(model, frames[0], policy=make())
        emodel._example_for_tests = frames[0]
        _run(emodel, frames[:at])
        other = _continued(how, emodel, model, make, tmp_path)
        want = _run(emodel, frames[at:])
        got = _run(other, frames[at:])
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(g, w), f"{name} copied by {how} at frame {at}: frame {at + i} differs"


def test_a_stateful_policy_given_to_two_models_is_never_shared():
    model = small_vit()[0]
    flipped = [f.flip(-1) for f in FRAMES]
    alone_a = _run(evtrace.transform(model, FRAMES[0], policy=P.SteeredThreshold(0.4)), FRAMES)
    alone_b = _run(evtrace.transform(model, FRAMES[0], policy=P.SteeredThreshold(0.4)), flipped)
    policy = P.SteeredThreshold(0.4)
    a = evtrace.transform(model, FRAMES[0], policy=policy)
    b = evtrace.transform(model, FRAMES[0], policy=policy)
    c = evtrace.transform(model, FRAMES[0], policy=P.TopK(5))
    c.set_policy(a.policy)  # handed over from a live model
    got_a, got_b = [], []
    with torch.no_grad():
        for x, y in zip(FRAMES, flipped, strict=True):
            got_a.append(a(x))
            got_b.append(b(y))
            c(y)
    for got, want in zip(got_a + got_b, alone_a + alone_b, strict=True):
        assert torch.equal(got, want)
    ids = {id(m.gate.policy) for e in (a, b, c) for m in e.regions().values()}
    assert len(ids) == 3


def _with_dropout(p=0.5):
    model = small_vit()[0]
    for block in model.blocks:
        block.mlp.fc1 = nn.Sequential(block.mlp.fc1, nn.Dropout(p))
    return model.eval()


def test_dropout_is_frozen_at_transform_and_train_keeps_eval_semantics():
    model = _with_dropout()
    twin = copy.deepcopy(model)
    emodel = evtrace.transform(model, FRAMES[0], policy=P.TopK(5))
    reference = _run(evtrace.transform(twin, FRAMES[0], policy=P.TopK(5)), FRAMES[:4])
    for module in emodel.graph_module.modules():
        assert not isinstance(module, nn.Dropout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert emodel.train() is emodel
    assert any("eval" in str(w.message) for w in caught)
    assert not emodel.training
    model.train()  # the original's dropout turned on: the eventful model does not follow
    torch.manual_seed(0)
    got = _run(emodel, FRAMES[:4])
    model.eval()
    torch.manual_seed(1)
    _ = _run(emodel, FRAMES[:1])
    for g, w in zip(got, reference, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
