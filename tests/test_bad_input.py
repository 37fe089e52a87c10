"""Bad input gets a specific error and leaves the stream's state as it was."""
import pytest
import torch

import evtrace
from tests.models import real_frames, small_vit


def _state(emodel):
    return {name: b.clone() for name, b in emodel.named_buffers()}


def _assert_state_unchanged(emodel, before):
    after = dict(emodel.named_buffers())
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert torch.equal(value, after[name]), name


@pytest.fixture
def stream():
    model, _ = small_vit()
    frames = real_frames(64, 3)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(5), on_input_change="raise")
    with torch.no_grad():
        emodel(frames[0])
        emodel(frames[1])
    return model, emodel, frames


def test_frame_of_another_size_with_resets_disabled(stream):
    _, emodel, _ = stream
    before = _state(emodel)
    with pytest.raises(evtrace.InputMismatchError, match=r"differs from the one the state was built for.*unchanged"):
        emodel(torch.randn(1, 3, 96, 96))
    _assert_state_unchanged(emodel, before)


def test_a_new_input_shape_starts_a_new_stream_by_default():
    model, _ = small_vit(img_size=64)
    frames = real_frames(64, 3)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))
    with torch.no_grad():
        emodel(frames[0])
        emodel(frames[1])
        pair = torch.cat([frames[1], frames[2]])  # two streams now: a new signature
        torch.testing.assert_close(emodel(pair), model(pair), atol=1e-5, rtol=1e-4)  # dense first frame
        torch.testing.assert_close(emodel(frames[2]), model(frames[2]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_frame_is_rejected_before_any_state_changes(stream, bad):
    _, emodel, frames = stream
    before = _state(emodel)
    frame = frames[2].clone()
    frame[0, 0, 3, 5] = bad
    with pytest.raises(evtrace.NonFiniteInputError, match="NaN or Inf.*unchanged"):
        emodel(frame)
    _assert_state_unchanged(emodel, before)


@pytest.mark.parametrize("budget, error, message", [
    (0, ValueError, "r must be an int >= 1"),
    (-3, ValueError, "r must be an int >= 1"),
    (18, ValueError, r"choose a budget in \[1, 17\]"),
    ("all", TypeError, "expected a Policy"),
    (object(), TypeError, "expected a Policy"),
])
def test_bad_budgets(stream, budget, error, message):
    _, emodel, _ = stream
    before = _state(emodel)
    policy_before = emodel.policy
    with pytest.raises(error, match=message):
        emodel.set_policy(budget)
    _assert_state_unchanged(emodel, before)
    assert emodel.policy is policy_before


def test_negative_tau(stream):
    with pytest.raises(ValueError, match="tau must be a finite real number >= 0"):
        evtrace.Threshold(-0.1)


def test_override_naming_a_module_that_does_not_exist(stream):
    _, emodel, _ = stream
    with pytest.raises(ValueError, match="no gate matches 'blocks.7.mlp': .*regions: blocks.0.attn.qkv"):
        emodel.set_policy(3, gates="blocks.7.mlp")


def test_bad_transform_arguments():
    model, x = small_vit()
    with pytest.raises(ValueError, match="attention must be one of"):
        evtrace.transform(model, x, attention="sparse")
    with pytest.raises(ValueError, match="refresh_every must be an int >= 1"):
        evtrace.transform(model, x, refresh_every=0)
    with pytest.raises(ValueError, match=r"choose a budget in \[1, 17\]"):
        evtrace.transform(model, x, policy=40)
    with pytest.raises(ValueError, match="training mode"):
        evtrace.transform(model.train(), x)


def test_an_exception_mid_frame_leaves_a_usable_stream(stream):
    model, emodel, frames = stream
    region = next(iter(emodel.regions().values()))
    handle = region.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("user hook failed")))
    with pytest.raises(RuntimeError, match="user hook failed"):
        emodel(frames[2])
    handle.remove()
    # the failed frame reset the stream: the next call is a dense first frame, exact
    with torch.no_grad():
        torch.testing.assert_close(emodel(frames[2]), model(frames[2]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make, error, message", [
    (lambda: evtrace.TopFraction(0), ValueError, r"f must be a real number in \(0, 1\], got 0"),
    (lambda: evtrace.TopFraction(1.5), ValueError, r"f must be a real number in \(0, 1\], got 1.5"),
    (lambda: evtrace.Threshold(float("nan")), ValueError, "tau must be a finite real number >= 0, got nan"),
    (lambda: evtrace.FixedCapacityThreshold(0.1, capacity=0), ValueError, "capacity must be an int >= 1, got 0"),
    (lambda: evtrace.TopK(2.5), TypeError, "r must be an int >= 1, got float 2.5"),
    (lambda: evtrace.TopK(True), TypeError, "r must be an int >= 1, got bool True"),
])
def test_bad_policy_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_capacity_above_n_is_rejected_and_nothing_changes(stream):
    _, emodel, _ = stream
    before = _state(emodel)
    policies = {name: r.gate.policy for name, r in emodel.regions().items()}
    with pytest.raises(ValueError, match=r"selects 40 tokens per frame at gate .*N=17 tokens: choose a budget in \[1, 17\]"):
        emodel.set_policy(evtrace.FixedCapacityThreshold(0.1, capacity=40))
    # one good name and one bad one: no gate changes either
    with pytest.raises(ValueError, match="no gate matches 'blocks.9'"):
        emodel.set_policy(3, gates=["blocks.0.mlp.fc1", "blocks.9"])
    assert policies == {name: r.gate.policy for name, r in emodel.regions().items()}
    _assert_state_unchanged(emodel, before)


@pytest.mark.parametrize("stream_index", [1, -1, True, "0"])
def test_reset_of_a_stream_that_does_not_exist(stream, stream_index):
    _, emodel, _ = stream
    before = _state(emodel)
    fresh = [r.fresh for r in emodel.regions().values()]
    with pytest.raises(ValueError, match=r"stream must be an int in \[0, 0\], got"):
        emodel.reset(stream=stream_index)
    _assert_state_unchanged(emodel, before)
    assert fresh == [r.fresh for r in emodel.regions().values()] == [False] * len(fresh)


def test_bad_refresh_options():
    model, x = small_vit()
    with pytest.raises(ValueError, match="scene_cut must be a factor > 1"):
        evtrace.transform(model, x, scene_cut=0.5)
    with pytest.raises(ValueError, match="on_input_change must be one of"):
        evtrace.transform(model, x, on_input_change="ignore")
    with pytest.raises(ValueError, match="repair_rows must be an int >= 0"):
        evtrace.transform(model, x, repair_rows=-1)
