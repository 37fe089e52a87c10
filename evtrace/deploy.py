"""``evtrace.export``: an eventful model as two ``torch.export`` programs and a runner.

An eventful frame is one of two graphs: the *dense* step (first frame, refresh, scene cut: every
region runs its dense graph and fills the state) and the *steady* step (each gate picks its
tokens, the regions run on the gathered rows, attention is delta-updated). Which one runs is
Python control flow on the host (the stream flags, ``refresh_every``, the scene-cut detector),
so each is exported on its own, with the stream state as the programs' buffers (``BUFFER``
inputs of the signature), updated in place by the graph (``aten.index_copy_``, ``aten.copy_``:
the programs are torch.export's training IR, not functionalised; the same tensors serve both
steps). For a target without mutable buffers, :func:`export_onnx` makes the state explicit
inputs and outputs.
:class:`EventfulProgram` holds both and drives them frame by frame as
:class:`~evtrace.eventful.EventfulModel` does: the NaN/Inf check on the inputs, the refresh
counter, the scene-cut detector, the dense step after :meth:`EventfulProgram.reset`.

Limits: a policy must select a static number of tokens (``TopK``, ``TopFraction``,
``FixedCapacityThreshold``, ``All``); ``Threshold`` and the stateful policies are refused. Exact
attention's full-recompute fallback (``max_relative_error``) is not in the steady program (as
under ``torch.compile``); ``stats["refreshed"]`` still reports when it would have fired. In a
batch, a scene cut in one stream refreshes the whole batch (eager restarts that stream alone).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn

from evtrace.checkpoints import STREAM_FLAGS
from evtrace.eventful import EventfulExportError, EventfulModel, all_finite
from evtrace.graph.errors import NonFiniteInputError, NonFiniteStateError
from evtrace.graph.tracer import as_args
from evtrace.runtime.policies import FixedCapacityThreshold, Policy, StatefulPolicy
from evtrace.runtime.steps import StepLoop

__all__ = ["export", "export_onnx", "EventfulProgram", "OnnxEventfulProgram", "EventfulExportError"]


def _check_policies(emodel: EventfulModel) -> None:
    problems = []
    for name, region in emodel.regions().items():
        policy: Policy = region.gate.policy
        if isinstance(policy, StatefulPolicy):
            problems.append(f"gate {name}: {policy!r} keeps per-frame state on the host")
        elif policy.data_dependent or policy.tokens_per_frame(region.gate.tokens) is None:
            problems.append(f"gate {name}: {policy!r} selects a data-dependent number of tokens")
    if problems:
        raise EventfulExportError(
            "cannot export a static program: "
            + "; ".join(problems[:3])
            + (" ..." if len(problems) > 3 else "")
            + ". Use a policy of static size: FixedCapacityThreshold(tau, capacity) for a threshold "
            f"(e.g. emodel.set_policy({FixedCapacityThreshold.__name__}(tau, capacity=N // 4))), "
            "TopK(r) or TopFraction(f)"
        )


def _flags(gm: nn.Module) -> dict[str, dict]:
    return {
        name: {k: getattr(m, k) for k in STREAM_FLAGS if hasattr(m, k)}
        for name, m in gm.named_modules()
        if any(hasattr(m, k) for k in STREAM_FLAGS)
    }


def _set_flags(gm: nn.Module, flags: dict[str, dict]) -> None:
    modules = dict(gm.named_modules())
    for name, kept in flags.items():
        for key, value in kept.items():
            setattr(modules[name], key, value)


def _share_state(dst: nn.Module, src: nn.Module) -> None:
    """Point every buffer and tensor constant of ``dst`` at ``src``'s tensor of the same name:
    the two programs then read and write one state."""
    tensors = dict(src.named_buffers())
    tensors.update({k: v for k, v in _constants(src).items()})
    for name, tensor in list(_constants(dst).items()) + list(dst.named_buffers()):
        if name in tensors and tensors[name] is not tensor:
            *path, leaf = name.split(".")
            owner = dst.get_submodule(".".join(path)) if path else dst
            if leaf in owner._buffers:
                owner._buffers[leaf] = tensors[name]
            else:
                setattr(owner, leaf, tensors[name])


def _constants(module: nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for path, m in module.named_modules():
        for key, value in m.__dict__.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                found[f"{path}.{key}" if path else key] = value
    return found


@dataclass
class EventfulProgram:
    """The exported dense and steady steps of an eventful model, and the stream control.

    Call it like the eventful model, one frame at a time: ``runner(x)``. ``dense`` and ``steady``
    are the ``ExportedProgram`` objects (``torch.export.save`` them, lower them elsewhere);
    ``dense_module`` / ``steady_module`` their runnable modules, sharing one state.
    """

    dense: torch.export.ExportedProgram
    steady: torch.export.ExportedProgram
    refresh_every: int | None = None
    scene_cut: object | None = None
    check_inputs: bool = True
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.dense_module = self.dense.module()
        self.steady_module = self.steady.module()
        _share_state(self.steady_module, self.dense_module)
        self.fresh = True
        self.frames_since_refresh = 0
        self.refreshes = 0
        self.dense_frames = 0

    def reset(self) -> None:
        """A new stream: the next frame runs the dense step."""
        self.fresh = True
        self.frames_since_refresh = 0
        if self.scene_cut is not None:
            self.scene_cut.reset()

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if self.check_inputs:
            for i, t in enumerate(tensors):
                if t.is_floating_point() and not all_finite(t):
                    raise NonFiniteInputError(
                        f"input {i} holds NaN or Inf values; the frame was rejected and the stream state "
                        "is unchanged (clean the frame or skip it)"
                    )
        if self.refresh_every is not None and self.frames_since_refresh >= self.refresh_every:
            self._refresh()
        if self.scene_cut is not None and tensors:
            frame = next((t for t in tensors if t.is_floating_point() and t.dim() >= 2), None)
            if frame is not None and bool(self.scene_cut.update(frame).any()):
                self._refresh()
        try:
            out = self._step(self.fresh, args)
        except BaseException:
            self.reset()
            raise
        if self.fresh:
            self.dense_frames += 1
        self.fresh = False
        if self.check_inputs:
            leaves = [
                t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()
            ]
            if leaves and not bool(
                torch.isfinite(torch.stack([t.sum(dtype=torch.float64) for t in leaves])).all()
            ):
                self.reset()
                raise NonFiniteStateError(
                    "the frame produced NaN or Inf values inside the exported model although the input is "
                    "finite; the stream was reset (the next frame is dense). Scale or clip the input",
                    streams=[],
                    output=out,
                )
        self.frames_since_refresh += 1
        return out

    def _refresh(self) -> None:
        self.fresh = True
        self.frames_since_refresh = 0
        self.refreshes += 1

    def _step(self, dense: bool, args: tuple):
        with torch.no_grad():
            return (self.dense_module if dense else self.steady_module)(*args)


def _primed_copy(emodel: EventfulModel, args: tuple) -> EventfulModel:
    """A copy of ``emodel`` that ran one (dense) frame of ``args``: its state is allocated for
    this signature, its flags steady; the checks that are host syncs are off."""
    if not isinstance(emodel, EventfulModel):
        raise TypeError(
            f"evtrace.export takes an EventfulModel (evtrace.transform(...)), got {type(emodel).__name__}"
        )
    work = copy.deepcopy(emodel)
    work._scene_cut = None  # the runner keeps its own detector; the copy's frames are not a stream
    work._options.refresh_every = None
    work._options.on_input_change = "reset"
    with torch.no_grad():
        work.reset()
        work(*args)
    _check_policies(work)
    for module in work.graph_module.modules():
        if hasattr(module, "check_finite"):
            module.check_finite = False
    return work


def _runner_options(emodel: EventfulModel) -> dict:
    scene_cut = None if emodel._scene_cut is None else copy.deepcopy(emodel._scene_cut)
    if scene_cut is not None:
        scene_cut.reset()
    return dict(
        refresh_every=emodel._options.refresh_every,
        scene_cut=scene_cut,
        check_inputs=emodel._options.check_inputs,
    )


def _warn_step_cuts(emodel: EventfulModel) -> None:
    """Cuts between the time steps of a call are detected in eager mode only (a host read per
    step): say so rather than ship a program that silently does less than the model."""
    loops = [m for m in emodel.graph_module.modules() if isinstance(m, StepLoop) and m.scene_cut is not None]
    if loops:
        warnings.warn(
            "the exported program does not detect scene cuts between the time steps of a call (the "
            "eager StepLoop does); transform with scene_cut=None to export exactly what runs",
            stacklevel=3,
        )


def export(emodel: EventfulModel, example, *, strict: bool = False) -> EventfulProgram:
    """Export ``emodel`` (an :class:`~evtrace.eventful.EventfulModel`) as its dense and steady
    steps for frames shaped like ``example``, with a runner that drives them.

    The eventful model itself is not changed (a copy is exported, its stream left alone). The
    programs' state starts empty: the runner's first frame is dense.

    Raises:
        EventfulExportError: a gate's policy selects a data-dependent number of tokens
        (``Threshold``: use ``FixedCapacityThreshold``) or keeps state on the host.
    """
    args = as_args(example)
    _warn_step_cuts(emodel)
    work = _primed_copy(emodel, args)
    gm = work.graph_module
    seconds = {}
    with torch.no_grad():
        steady_flags = _flags(gm)
        start = time.perf_counter()
        # kept as exported (training IR, in-place state updates in the graph): functionalising with
        # run_decompositions({}) trips torch's output-order check on these graphs (torch 2.13)
        steady = torch.export.export(gm, args, strict=strict)
        seconds["steady"] = time.perf_counter() - start
        work._reset()
        start = time.perf_counter()
        dense = torch.export.export(gm, args, strict=strict)
        seconds["dense"] = time.perf_counter() - start
        _set_flags(gm, steady_flags)
    return EventfulProgram(dense, steady, seconds=seconds, **_runner_options(emodel))


# ------------------------------------------------------------------------------------------- ONNX


class _ExplicitState(nn.Module):
    """One step with the state as explicit inputs and outputs: ``(x, *state) -> (*outputs, *state)``
    (ONNX has no mutable buffers). The state inputs are copied, then updated in place by the
    graph through ``functional_call``; functionalisation turns that into plain outputs."""

    def __init__(self, gm: nn.Module, names: list[str], n_args: int):
        super().__init__()
        self.gm = gm
        self.names = names
        self.n_args = n_args

    def forward(self, *inputs):
        args, state = inputs[: self.n_args], [t.clone() for t in inputs[self.n_args :]]
        out = torch.func.functional_call(self.gm, dict(zip(self.names, state)), args, strict=False)
        return (*pytree.tree_leaves(out), *state)


def _onnx_hypot(a, b):
    from onnxscript import opset18 as op

    return op.Sqrt(op.Add(op.Mul(a, a), op.Mul(b, b)))


def _onnx_reduce(name: str):
    def reduce(x, dim=(), keepdim=False):
        from onnxscript import opset18 as op

        fn = getattr(op, name)
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            return fn(x, keepdims=0)  # every dim (torch's amin(x) with no dim)
        dims = [dim] if isinstance(dim, int) else list(dim)
        return fn(x, op.Constant(value_ints=dims), keepdims=int(keepdim))

    return reduce


def _onnx_table() -> dict:
    """Translations the ONNX exporter lacks: hypot, and amin/amax over every dim."""
    return {
        torch.ops.prims.hypot.default: _onnx_hypot,
        torch.ops.aten.hypot.default: _onnx_hypot,
        torch.ops.aten.amin.default: _onnx_reduce("ReduceMin"),
        torch.ops.aten.amax.default: _onnx_reduce("ReduceMax"),
    }


def _state_names(gm: nn.Module) -> list[str]:
    """The buffers of the inserted runtime modules (gates, sparse regions, delta attention)."""
    names = []
    for path, module in gm.named_modules():
        if path and (path.startswith("evtrace_") or ".evtrace_" in path):
            for name, value in module._buffers.items():
                if value is not None and f"{path}.{name}" not in names:
                    names.append(f"{path}.{name}")
    return names


class OnnxEventfulProgram(EventfulProgram):
    """The dense and steady steps as ONNX files run by onnxruntime, with the same stream control as
    :class:`EventfulProgram`; the state is a list of numpy arrays passed through each step."""

    def __init__(self, dense_path, steady_path, state, treespec, n_outputs, providers=None, **options):
        import onnxruntime

        providers = providers or ["CPUExecutionProvider"]
        self.dense_path, self.steady_path = str(dense_path), str(steady_path)
        settings = onnxruntime.SessionOptions()
        settings.intra_op_num_threads = torch.get_num_threads()  # torch's budget, not every core
        # no spinning threads between frames: they would slow down the host work around each step
        settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.dense_session = onnxruntime.InferenceSession(self.dense_path, settings, providers=providers)
        self.steady_session = onnxruntime.InferenceSession(self.steady_path, settings, providers=providers)
        self.initial_state = [t.numpy() for t in state]
        self.state = list(self.initial_state)
        self.treespec, self.n_outputs = treespec, n_outputs
        self.refresh_every = options.get("refresh_every")
        self.scene_cut = options.get("scene_cut")
        self.check_inputs = options.get("check_inputs", True)
        self.seconds = options.get("seconds", {})
        self.fresh = True
        self.frames_since_refresh = 0
        self.refreshes = 0
        self.dense_frames = 0

    def _step(self, dense: bool, args: tuple):
        session = self.dense_session if dense else self.steady_session
        values = [a.detach().cpu().numpy() for a in args] + self.state
        feeds = {i.name: v for i, v in zip(session.get_inputs(), values)}
        result = session.run(None, feeds)
        self.state = result[self.n_outputs :]
        leaves = [torch.from_numpy(r) for r in result[: self.n_outputs]]
        return pytree.tree_unflatten(leaves, self.treespec)


def export_onnx(emodel: EventfulModel, example, directory) -> OnnxEventfulProgram:
    """Export the dense and steady steps of ``emodel`` to ``directory/dense.onnx`` and
    ``directory/steady.onnx`` (torch.onnx's dynamo exporter, which needs ``onnxscript``:
    ``pip install 'evtrace[onnx]'``) with the state as explicit inputs and outputs, and return a
    runner on onnxruntime. Same limits as :func:`export` (static token counts)."""
    from pathlib import Path

    args = as_args(example)
    work = _primed_copy(emodel, args)
    gm = work.graph_module
    names = _state_names(gm)
    with torch.no_grad():
        sample = gm(*args)  # a steady frame: the output structure
    leaves, treespec = pytree.tree_flatten(sample)
    table = _onnx_table()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    seconds, paths = {}, {}
    steady_flags = _flags(gm)
    for kind in ("steady", "dense"):
        if kind == "dense":
            work._reset()
        state = [gm.get_buffer(n).clone() for n in names]
        start = time.perf_counter()
        with torch.no_grad():
            program = torch.export.export(_ExplicitState(gm, names, len(args)), (*args, *state), strict=False)
        onnx_program = torch.onnx.export(program, dynamo=True, optimize=True, custom_translation_table=table)
        paths[kind] = directory / f"{kind}.onnx"
        onnx_program.save(str(paths[kind]))
        seconds[kind] = time.perf_counter() - start
    _set_flags(gm, steady_flags)
    initial = [gm.get_buffer(n).clone() for n in names]
    return OnnxEventfulProgram(
        paths["dense"],
        paths["steady"],
        initial,
        treespec,
        len(leaves),
        seconds=seconds,
        **_runner_options(emodel),
    )
