"""Bad input gets a specific error and leaves the stream's state as it was."""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import evtrace
from evtrace.graph.errors import BudgetError, FrozenTokensWarning
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
    with pytest.raises(
        evtrace.InputMismatchError, match=r"differs from the one the state was built for.*unchanged"
    ):
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


@pytest.mark.parametrize(
    "budget, error, message",
    [
        (0, ValueError, "r must be an int >= 1"),
        (-3, ValueError, "r must be an int >= 1"),
        (18, ValueError, r"choose a budget in \[1, 17\]"),
        ("all", TypeError, "expected a Policy"),
        (object(), TypeError, "expected a Policy"),
    ],
)
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


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: evtrace.TopFraction(0), ValueError, r"f must be a real number in \(0, 1\], got 0"),
        (lambda: evtrace.TopFraction(1.5), ValueError, r"f must be a real number in \(0, 1\], got 1.5"),
        (
            lambda: evtrace.Threshold(float("nan")),
            ValueError,
            "tau must be a finite real number >= 0, got nan",
        ),
        (
            lambda: evtrace.FixedCapacityThreshold(0.1, capacity=0),
            ValueError,
            "capacity must be an int >= 1, got 0",
        ),
        (lambda: evtrace.TopK(2.5), TypeError, "r must be an int >= 1, got float 2.5"),
        (lambda: evtrace.TopK(True), TypeError, "r must be an int >= 1, got bool True"),
    ],
)
def test_bad_policy_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_capacity_above_n_is_rejected_and_nothing_changes(stream):
    _, emodel, _ = stream
    before = _state(emodel)
    policies = {name: r.gate.policy for name, r in emodel.regions().items()}
    with pytest.raises(
        ValueError, match=r"selects 40 tokens per frame at gate .*N=17 tokens: choose a budget in \[1, 17\]"
    ):
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
    with pytest.raises(ValueError, match=r"scene_cut must be True \(the default detector\), a factor > 1"):
        evtrace.transform(model, x, scene_cut=0.5)
    with pytest.raises(ValueError, match="on_input_change must be one of"):
        evtrace.transform(model, x, on_input_change="ignore")
    with pytest.raises(ValueError, match="repair_rows must be an int >= 0"):
        evtrace.transform(model, x, repair_rows=-1)


# ----------------------------------------------------------------------------- one-line errors (issue 15)


def test_a_batch_of_zero_streams_gets_a_clear_error(stream):
    model, emodel, frames = stream
    before = _state(emodel)
    empty = torch.zeros(0, 3, 64, 64)
    for e in (evtrace.transform(model, frames[0], policy=evtrace.TopK(5)), emodel):
        with pytest.raises(
            evtrace.InputMismatchError, match=r"input 0 has batch size 0 .*skip empty batches"
        ):
            e(empty)
    _assert_state_unchanged(emodel, before)
    with pytest.raises(evtrace.InputMismatchError, match="example input 0 has batch size 0"):
        evtrace.transform(model, empty)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda f: f.double(),
            r"input 0 has dtype torch.float64, the model was traced with torch.float32; the state is "
            r"unchanged. Convert the frame \(x.to\(torch.float32\)\)",
        ),
        (lambda f: f.half(), "input 0 has dtype torch.float16"),
        (
            lambda f: f[0],
            r"input 0 has 3 dims \(shape \(3, 64, 64\)\), the model was traced with 4 "
            r"\(shape \(1, 3, 64, 64\)\)",
        ),
        (lambda f: f[None], r"input 0 has 5 dims"),
    ],
)
def test_a_frame_of_another_rank_or_dtype_is_refused_before_any_retrace(make, message, capfd):
    model, _ = small_vit()
    frames = real_frames(64, 3)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))  # on_input_change="reset"
    with torch.no_grad():
        emodel(frames[0])
        emodel(frames[1])
    before = _state(emodel)
    capfd.readouterr()
    with pytest.raises(evtrace.InputMismatchError, match=message):
        emodel(make(frames[2]))
    assert capfd.readouterr().err == ""  # one line, no tracer tracebacks on stderr
    assert len(emodel._variants) == 1  # nothing was traced
    _assert_state_unchanged(emodel, before)
    with torch.no_grad():
        emodel(frames[2])


def test_a_live_policy_changed_past_n_is_caught_before_the_frame_and_keeps_the_stream(stream):
    _, emodel, frames = stream
    twin = copy.deepcopy(emodel)
    before = _state(emodel)
    emodel.policy.r = 40  # the policy object itself, shared by every gate
    with pytest.raises(BudgetError, match=r"TopK\(r=40\) selects 40 tokens per frame at gate .*N=17 tokens"):
        emodel(frames[2])
    _assert_state_unchanged(emodel, before)
    assert not any(r.fresh for r in emodel.regions().values())  # no reset
    emodel.policy.r = 5
    with torch.no_grad():
        assert torch.equal(emodel(frames[2]), twin(frames[2]))  # the stream goes on


def test_a_budget_no_larger_than_the_prefix_warns(stream):
    model, emodel, frames = stream
    with pytest.warns(
        FrozenTokensWarning,
        match="no larger than the always-updated prefix .* every patch token there is frozen",
    ):
        emodel.set_policy(1)  # the class token takes the one slot
    with pytest.warns(FrozenTokensWarning):
        evtrace.transform(model, frames[0], policy=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emodel.set_policy(2)
        evtrace.transform(model, frames[0], policy=1, always_update_prefix=False)


def test_inspect_never_runs_a_local_file_named_like_a_package(tmp_path):
    """The current folder goes last on sys.path: the user's module is found, ./sympy.py is not run."""
    (tmp_path / "sympy.py").write_text("raise SystemExit('local sympy.py was executed')\n")
    (tmp_path / "mymodels.py").write_text(
        "import models_zoo\n\ndef tiny():\n"
        "    return models_zoo.vit(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2,\n"
        "                          num_classes=0)\n"
    )
    script = Path(sys.executable).parent / "evtrace"
    command = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "evtrace.tools.cli"]
    done = subprocess.run(
        command + ["inspect", "mymodels:tiny", "--size", "32"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert "local sympy.py was executed" not in done.stderr + done.stdout
    assert done.returncode == 0, done.stderr
    assert "FLOPs per frame" in done.stdout


@pytest.mark.parametrize(
    "argv, argument",
    [
        (["inspect", "models_zoo:deit_tiny", "--size", "14000"], "--size"),
        (["inspect", "models_zoo:deit_tiny", "--input-shape", "1,3,14000,14000"], "--input-shape"),
        (["demo", "--size", "14000"], "--size"),
        (["fidelity", "--size", "14000"], "--size"),
    ],
)
def test_a_huge_size_is_refused_with_one_line(argv, argument, capsys):
    from evtrace.tools.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{argument}: " in err[0] and "at most" in err[0], err
