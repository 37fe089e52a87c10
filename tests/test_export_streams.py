"""The exported runner (``evtrace.export``) drives its stream as the eager model does: a scene
cut on the input runs that frame densely, and ``reset()`` starts a new stream with a dense
frame (the rest of the export tests: tests/test_deploy.py)."""

import pytest
import torch

import evtrace
from evtrace.tools.coverage import families, output_tensor

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::evtrace.graph.errors.LowSavingsWarning"),
]


def _relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def clips():
    return {"zoo_vit": families()["zoo_vit"].real_inputs(14)}


def test_the_runner_refreshes_at_a_scene_cut_as_the_eager_model_does(clips):
    """A cut (the clip, then the same clip turned upside down): the eager model and the runner
    both detect it on the input and run that frame densely; the outputs agree on every frame."""
    model, _ = families()["zoo_vit"].build()
    clip = clips["zoo_vit"]
    shot = [torch.flip(x, dims=[-2, -1]) for x in clip[8:14]]
    frames = list(clip[:8]) + shot
    emodel = evtrace.transform(model, clip[0], policy=8)
    runner = evtrace.export(emodel, clip[0])
    with torch.no_grad():
        for t, x in enumerate(frames):
            got, want = output_tensor(runner(x)), output_tensor(emodel(x))
            assert _relative(got, want) <= 1e-5, t
            if t == 8:
                assert _relative(got, output_tensor(model(x))) <= 1e-5  # the cut frame is dense
    assert emodel.refreshes == runner.refreshes == 1
    assert runner.dense_frames == 2


def test_reset_starts_a_new_stream_with_a_dense_frame(clips):
    """After ``reset()`` the runner's next frame is the original model's output (dense), and the
    stream from there equals a fresh eager stream started at that frame."""
    model, _ = families()["zoo_vit"].build()
    clip = clips["zoo_vit"]
    emodel = evtrace.transform(model, clip[0], policy=8, scene_cut=None)
    runner = evtrace.export(emodel, clip[0])
    fresh = evtrace.transform(model, clip[0], policy=8, scene_cut=None)
    with torch.no_grad():
        for x in clip[:5]:
            runner(x)
        runner.reset()
        assert _relative(output_tensor(runner(clip[5])), output_tensor(model(clip[5]))) <= 1e-5
        fresh(clip[5])
        for x in clip[6:10]:
            assert _relative(output_tensor(runner(x)), output_tensor(fresh(x))) <= 1e-5
    assert runner.dense_frames == 2
