"""Calls with keyword arguments: an HF model transformed with a positional example is called as
the original is (``emodel(pixel_values=x)``); what the traced graph cannot take is refused with
an evtrace error naming the argument, before any state changes; a dict of keyword arguments is
an example; ``config``, ``device`` and ``dtype`` are the original model's."""

from __future__ import annotations

import pytest
import torch

import evtrace
from evtrace.tools.coverage import output_tensor
from tests.models import hf_models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_vit():
    build, example, _ = hf_models()["hf_vit"]
    model = build()
    frames = [example + 0.05 * torch.randn_like(example) * i for i in range(5)]
    return model, frames


def _outputs(emodel, frames, call):
    with torch.no_grad():
        return [output_tensor(call(emodel, x)).clone() for x in frames]


def test_keyword_calls_equal_positional_calls_bit_for_bit(hf_vit):
    model, frames = hf_vit
    positional = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))
    keyword = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))
    want = _outputs(positional, frames, lambda m, x: m(x))
    got = _outputs(keyword, frames, lambda m, x: m(pixel_values=x))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    # arguments the trace fixed, given at the values it fixed them to, are accepted
    with torch.no_grad():
        output_tensor(keyword(pixel_values=frames[0], bool_masked_pos=None, interpolate_pos_encoding=None))


def _snapshot(emodel):
    return {name: b.clone() for name, b in emodel.named_buffers()} | {
        "counters": (emodel.frames_since_refresh, emodel.refreshes),
        "fresh": [r.fresh for r in emodel.regions().values()],
    }


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"return_dict": False}, "return_dict"),
        ({"output_hidden_states": True}, "output_hidden_states"),
        ({"output_attentions": True}, "output_attentions"),
        ({"interpolate_pos_encoding": True}, "interpolate_pos_encoding"),
        ({"not_an_argument": 1}, "not_an_argument"),
    ],
)
def test_a_keyword_the_trace_cannot_take_is_refused_before_any_state_changes(hf_vit, kwargs, name):
    model, frames = hf_vit
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))
    twin = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))
    _outputs(emodel, frames[:3], lambda m, x: m(x))
    _outputs(twin, frames[:3], lambda m, x: m(x))
    before = _snapshot(emodel)
    with pytest.raises(evtrace.EvtraceError, match=name):
        emodel(pixel_values=frames[3], **kwargs)
    after = _snapshot(emodel)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]) if isinstance(value, torch.Tensor) else value == after[key], key
    # the stream was not reset: it goes on as one that never saw the call
    for g, w in zip(
        _outputs(emodel, frames[3:], lambda m, x: m(x)),
        _outputs(twin, frames[3:], lambda m, x: m(x)),
        strict=True,
    ):
        assert torch.equal(g, w)


def test_a_frame_given_twice_is_refused(hf_vit):
    model, frames = hf_vit
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))
    with pytest.raises(evtrace.EvtraceError, match="pixel_values"):
        emodel(frames[0], pixel_values=frames[0])


def test_a_dict_of_keyword_arguments_is_an_example(hf_vit):
    model, frames = hf_vit
    by_name = evtrace.transform(model, {"pixel_values": frames[0]}, policy=evtrace.TopK(5))
    positional = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))
    want = _outputs(positional, frames, lambda m, x: m(x))
    for call in (lambda m, x: m(pixel_values=x), lambda m, x: m(x)):
        by_name.reset()
        for g, w in zip(_outputs(by_name, frames, call), want, strict=True):
            assert torch.equal(g, w)


def test_config_device_and_dtype_are_the_originals(hf_vit):
    model, frames = hf_vit
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))
    assert emodel.config is model.config
    assert emodel.device == model.device == torch.device("cpu")
    assert emodel.dtype == model.dtype == torch.float32
