"""torch.compile keeps every promise of the eager model (issue 14, item 3).

``EventfulModel.__call__`` runs the stream control in Python, never traced (dynamo skips that
frame; the control runs under ``torch.compiler.disable``), and only the rewritten graph's call is
compiled, with the caller's options. Each promise is checked against an eager twin. Most tests
use a counting ``eager`` backend (dynamo's capture without inductor's minutes of compilation on
two cores: it proves the graph was captured, fullgraph, and keeps results bit for bit); one test
compiles with inductor.
"""

from __future__ import annotations

import pytest
import torch

import evtrace
from evtrace.graph.errors import NonFiniteInputError
from evtrace.tools.coverage import families, output_tensor
from evtrace.tools.hard_video import stream


class Counting:
    """A dynamo backend that runs the captured graph as is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(scope="module")
def clip():
    return families()["zoo_vit"].real_inputs(10)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pair(policy=8, **options):
    """The model to compile (packed weights, the default: compiled, its linears are plain) and an
    eager twin with plain linears, so that compiled and eager frames can be compared bit for bit."""
    model, example = families()["zoo_vit"].build()
    emodel = evtrace.transform(model, example, policy=policy, **options)
    twin = evtrace.transform(model, example, policy=policy, **(options | {"pack_weights": False}))
    return emodel, twin


def _out(y):
    return output_tensor(y)


def test_the_graph_is_compiled_fullgraph_and_the_frames_equal_eager(clip):
    emodel, twin = _pair()
    backend = Counting()
    fast = torch.compile(emodel, fullgraph=True, backend=backend)
    with torch.no_grad():
        for x in clip:
            assert torch.equal(_out(fast(x)), _out(twin(x)))
    assert backend.graphs >= 2  # the dense first frame and the steady step


def test_refresh_every_fires_as_in_eager(clip):
    emodel, twin = _pair(refresh_every=3)
    fast = torch.compile(emodel, fullgraph=True, backend=Counting())
    with torch.no_grad():
        for x in clip:
            assert torch.equal(_out(fast(x)), _out(twin(x)))
    assert emodel.refreshes == twin.refreshes == 3


def test_scene_cuts_fire_as_in_eager():
    cuts = stream("cuts", frames=16, size=64, patch=16)
    emodel, twin = _pair(scene_cut=True)
    fast = torch.compile(emodel, fullgraph=True, backend=Counting())
    with torch.no_grad():
        for x in cuts.frames:
            assert torch.equal(_out(fast(x)), _out(twin(x)))
    assert emodel.refreshes == twin.refreshes >= 1


def test_a_nan_frame_is_rejected_before_any_state_changes(clip):
    emodel, twin = _pair()
    fast = torch.compile(emodel, fullgraph=True, backend=Counting())
    with torch.no_grad():
        for x in clip[:3]:
            fast(x), twin(x)
        before = emodel.stream_state()["tensors"]
        bad = clip[3].clone()
        bad[0, 1, 5, 5] = float("inf")
        with pytest.raises(NonFiniteInputError):
            fast(bad)
        after = emodel.stream_state()["tensors"]
        assert before.keys() == after.keys()
        for key in before:
            assert (before[key] is None) == (after[key] is None), key
            assert before[key] is None or torch.equal(before[key], after[key]), key
        for x in clip[3:]:
            assert torch.equal(_out(fast(x)), _out(twin(x)))


def test_an_exception_midway_resets_the_stream(clip):
    emodel, twin = _pair()
    fast = torch.compile(emodel, backend=Counting())  # the raising hook breaks the graph
    fail = {"now": False}

    def hook(module, args, out):
        if fail["now"]:
            raise RuntimeError("a failing user hook")

    region = list(emodel.regions().values())[-1]
    region.register_forward_hook(hook)
    with torch.no_grad():
        for x in clip[:3]:
            fast(x), twin(x)
        fail["now"] = True
        with pytest.raises(RuntimeError, match="failing user hook"):
            fast(clip[3])
        fail["now"] = False
        twin.reset()  # what the failed frame must have done: the next frame is dense
        for x in clip[4:]:
            assert torch.equal(_out(fast(x)), _out(twin(x)))


def test_input_shape_switches_start_new_streams_as_in_eager(clip):
    emodel, twin = _pair()
    fast = torch.compile(emodel, fullgraph=True, backend=Counting())
    pairs = [torch.cat([x, x.flip(-1)]) for x in clip[3:6]]
    with torch.no_grad():
        for x in clip[:3] + pairs + clip[6:]:
            assert torch.equal(_out(fast(x)), _out(twin(x)))
    assert len(emodel._variants) == len(twin._variants) == 2


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_calls_with_or_without_no_grad_or_inference_mode(clip, mode):
    emodel, twin = _pair()
    fast = torch.compile(emodel, fullgraph=True, backend=Counting())
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[
        mode
    ]
    for x in clip[:5]:
        with context():
            got = _out(fast(x))
        with torch.no_grad():
            want = _out(twin(x))
        assert not got.requires_grad
        assert torch.equal(got, want)


def test_inductor_fullgraph_keeps_the_promises(clip):
    emodel, twin = _pair(refresh_every=4)
    fast = torch.compile(emodel, fullgraph=True)
    worst = 0.0
    for x in clip[:6]:
        got = _out(fast(x))  # no no_grad: the model takes care of it
        with torch.no_grad():
            want = _out(twin(x))
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    assert worst <= 1e-4
    assert emodel.refreshes == twin.refreshes == 1
    bad = clip[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError):
        fast(bad)


def test_inductor_freezing_keeps_the_state_live(clip):
    """Freezing turns parameters into constants (and packs the linears): the stream state is
    mutated, so it must stay a live buffer; under a partial policy every frame still follows the
    eager twin (a state frozen at its first value would not)."""
    import torch._inductor.config as inductor_config

    emodel, twin = _pair()
    with inductor_config.patch(freezing=True), torch.no_grad():
        fast = torch.compile(emodel, fullgraph=True)
        worst = 0.0
        for x in clip[:6]:
            got, want = _out(fast(x)), _out(twin(x))
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    assert worst <= 1e-4
