"""Deployment (issue 14, item 1): ``evtrace.export`` gives the dense and steady steps as
``torch.export`` programs and a runner equal, frame by frame, to the eager eventful model;
``torch.export.export`` of an eventful model raises instead of returning a silent dense program."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import evtrace
from evtrace.deploy import EventfulExportError, EventfulProgram
from evtrace.graph.errors import NonFiniteInputError
from evtrace.tools.coverage import families, output_tensor

FRAMES = 16


def _relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _ops(program) -> Counter:
    return Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function")


@pytest.fixture(scope="module")
def clips():
    return {name: families()[name].real_inputs(FRAMES) for name in ("zoo_vit", "zoo_vitdet", "hf_vit")}


def _compare(emodel, runner, clip) -> float:
    worst = 0.0
    with torch.no_grad():
        for x in clip:
            worst = max(worst, _relative(output_tensor(runner(x)), output_tensor(emodel(x))))
    return worst


@pytest.mark.parametrize(
    "name, policy, delta",
    [("zoo_vit", 8, True), ("zoo_vit", 8, False), ("zoo_vitdet", 32, True), ("hf_vit", 8, True)],
    ids=["zoo_vit-delta", "zoo_vit-sdpa", "zoo_vitdet", "hf_vit"],
)
def test_the_exported_steps_equal_the_eager_model_frame_by_frame(clips, name, policy, delta):
    model, _ = families()[name].build()
    clip = clips[name]
    emodel = evtrace.transform(model, clip[0], policy=policy, refresh_every=6)
    if delta:  # exact delta attention even where a full recompute is cheaper at these sizes
        for module in emodel.attention_modules().values():
            module.full_when_cheaper = False
    runner = evtrace.export(emodel, clip[0])
    assert isinstance(runner, EventfulProgram)
    steady, dense = _ops(runner.steady), _ops(runner.dense)
    assert steady["aten.topk.default"] > 0 and steady["aten.index_copy_.default"] > 0
    assert dense["aten.topk.default"] == 0
    if name == "zoo_vit":  # delta attention in the steady step, or fused attention on the buffers
        assert (steady["aten.scaled_dot_product_attention.default"] == 0) == delta
    assert _compare(emodel, runner, clip) <= 1e-5
    assert runner.refreshes == emodel.refreshes >= 2
    assert runner.dense_frames == runner.refreshes + 1


def test_export_leaves_the_eager_stream_alone(clips):
    model, _ = families()["zoo_vit"].build()
    clip = clips["zoo_vit"]
    emodel = evtrace.transform(model, clip[0], policy=8)
    with torch.no_grad():
        for x in clip[:3]:
            emodel(x)
    twin = copy.deepcopy(emodel)
    evtrace.export(emodel, clip[0])
    with torch.no_grad():
        for x in clip[3:6]:
            assert torch.equal(output_tensor(emodel(x)), output_tensor(twin(x)))


def test_torch_export_of_an_eventful_model_raises_pointing_to_evtrace_export(clips):
    model, _ = families()["zoo_vit"].build()
    emodel = evtrace.transform(model, clips["zoo_vit"][0], policy=8)
    with pytest.raises(EventfulExportError, match=r"evtrace\.export\(emodel, example\)"):
        torch.export.export(emodel, (clips["zoo_vit"][0],), strict=False)


def test_a_data_dependent_threshold_is_refused_naming_the_fix(clips):
    model, _ = families()["zoo_vit"].build()
    clip = clips["zoo_vit"]
    emodel = evtrace.transform(model, clip[0], policy=evtrace.Threshold(0.5))
    with pytest.raises(EventfulExportError, match="FixedCapacityThreshold"):
        evtrace.export(emodel, clip[0])
    emodel.set_policy(evtrace.FixedCapacityThreshold(0.5, capacity=8))
    runner = evtrace.export(emodel, clip[0])
    assert _compare(emodel, runner, clip[:6]) <= 1e-5


def test_saved_programs_reload_and_run(clips, tmp_path):
    model, _ = families()["zoo_vit"].build()
    clip = clips["zoo_vit"]
    emodel = evtrace.transform(model, clip[0], policy=8, scene_cut=None)
    runner = evtrace.export(emodel, clip[0])
    torch.export.save(runner.dense, tmp_path / "dense.pt2")
    torch.export.save(runner.steady, tmp_path / "steady.pt2")
    loaded = EventfulProgram(
        torch.export.load(tmp_path / "dense.pt2"), torch.export.load(tmp_path / "steady.pt2")
    )
    assert _compare(emodel, loaded, clip[:6]) <= 1e-5


def test_the_runner_rejects_a_nan_frame_before_any_state_changes(clips):
    model, _ = families()["zoo_vit"].build()
    clip = clips["zoo_vit"]
    emodel = evtrace.transform(model, clip[0], policy=8, scene_cut=None)
    runner = evtrace.export(emodel, clip[0])
    twin = copy.deepcopy(emodel)
    with torch.no_grad():
        runner(clip[0]), twin(clip[0])
        bad = clip[1].clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(NonFiniteInputError):
            runner(bad)
        for x in clip[1:4]:
            assert _relative(output_tensor(runner(x)), output_tensor(twin(x))) <= 1e-5
