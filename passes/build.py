"""The build driver: trace a model, run the whole pipeline on it, and hand back the rewritten graph.

:func:`build` is the one entry point ``evtrace.transform`` calls. With the stream along the
calls it traces the model, runs ``PIPELINE`` and checks the result on partial frames
(``passes.validate``); a region or attention site whose rewrite fails, or that fails or
disagrees with its dense computation on a partial frame, is kept dense (its original ops,
exact) with the reason and a :class:`KeptDenseWarning`, and the pipeline runs again on a
fresh trace (with ``strict``, :class:`RewriteError` is raised instead). With the stream along
the time steps inside a call it runs the analysis up to ``time_steps`` on the whole model,
cuts the graph at the per-step sub-model (``passes.split_steps``), builds the step graph as
above and installs a :class:`~evtrace.runtime.steps.StepLoop` around it; the outer graph stays
dense.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch.fx
from torch import nn

from evtrace.graph.errors import KeptDenseWarning, RewriteError
from evtrace.graph.meta import STEPS, frontend_of
from evtrace.graph.plan import Plan, StepPlan
from evtrace.runtime.scene_cut import detector_from_option
from evtrace.runtime.steps import StepLoop

from .context import PassOptions, PassResult
from .pipeline import PIPELINE, STEP_ANALYSIS, analyze
from .split_steps import STEP_MODULE, outer_flops, split_time_steps, step_example
from .validate import Failure, PartialFrameError, check_partial_frames

STREAM_AXES = ("calls", "steps", "steps+calls")


@dataclass(frozen=True)
class BuildOptions:
    """What one build needs besides the model and its example.

    ``passes`` are the pipeline's options (their ``keep_dense`` and ``token_inputs`` are filled
    in by the driver); ``frontend`` and ``trace_options`` go to the tracer; ``stream_axis`` is
    ``"calls"``, ``"steps"`` or ``"steps+calls"``; ``scene_cut`` is the option the step loop's
    detector is made from. ``strict`` raises :class:`RewriteError` where a region or site
    would be kept dense after its rewrite failed; ``validate`` checks the rewritten graph on
    partial frames (``passes.validate``).
    """

    passes: PassOptions = field(default_factory=PassOptions)
    frontend: str = "auto"
    stream_axis: str = "calls"
    scene_cut: Any = True
    trace_options: dict = field(default_factory=dict)
    strict: bool = False
    validate: bool = True


@dataclass
class BuildResult:
    """The rewritten graph, its plan, the time of the trace and of each pass, the regions and
    sites kept dense after a failed rewrite or check (name -> reason, also in the plan), and
    what each pass reported."""

    graph_module: torch.fx.GraphModule
    plan: Plan
    seconds: dict[str, float]
    kept_dense: dict[str, str] = field(default_factory=dict)
    results: dict[str, PassResult] = field(default_factory=dict)  # what each pass did, by name


def build(model: nn.Module, args: tuple, options: BuildOptions) -> BuildResult:
    """Trace ``model`` on ``args`` and run the whole pass pipeline on it (on its per-step
    sub-model when the stream is the time steps inside a call); see the module docstring.

    Raises:
        ValueError: ``stream_axis`` is not one of ``STREAM_AXES``, or asks for time steps and the
            model has no per-step sub-model (the message says why) or traced only with export.
        RewriteError: with ``strict``, a region or site failed to rewrite or failed its check on
            partial frames.
    """
    if options.stream_axis not in STREAM_AXES:
        raise ValueError(f"stream_axis must be one of {STREAM_AXES}, got {options.stream_axis!r}")
    if options.stream_axis == "calls":
        return _build_calls(model, args, options)
    return _build_steps(model, args, options)


def _build_steps(model: nn.Module, args: tuple, options: BuildOptions) -> BuildResult:
    """Cut the per-step sub-model out of the traced graph, make it eventful, and call it from a
    :class:`StepLoop` in the otherwise unchanged (dense) graph."""
    ctx = analyze(model, args, frontend=options.frontend, passes=STEP_ANALYSIS, **options.trace_options)
    search = ctx.get(STEPS)
    if search.structure is None:
        reason = search.reason or "its inputs have no time axis (no 5-dim video input)"
        raise ValueError(
            f"stream_axis={options.stream_axis!r}: {type(model).__name__} has no sub-model that runs once "
            f"per time step: {reason}. Use stream_axis='calls' (the default: successive calls "
            "are the stream)"
        )
    if frontend_of(ctx.gm) != "fx":
        raise ValueError(
            f"stream_axis={options.stream_axis!r} needs the fx front end (torch.export bakes the batch of "
            f"views x time steps into every reshape), and {type(model).__name__} traced only with "
            f"{frontend_of(ctx.gm)}: make it traceable with torch.fx (leaf_modules=..., concrete_args=...)"
        )
    structure = search.structure
    outer, step = split_time_steps(ctx.gm, structure)
    token_inputs = tuple((i, dims) for i, dims in enumerate(structure.token_dims) if dims is not None)
    inner = _build_calls(step, step_example(ctx.gm, structure), options, token_inputs)
    carry = options.stream_axis == "steps+calls"
    loop = StepLoop(
        inner.graph_module,
        structure.steps,
        structure.views,
        structure.order,
        structure.row_dims,
        carry,
        detector_from_option(options.scene_cut),
    )
    outer.add_submodule(STEP_MODULE, loop)
    outer.recompile()
    steps = StepPlan(
        structure.steps, structure.views, structure.order, structure.modules, carry, outer_flops(outer)
    )
    plan = dataclasses.replace(inner.plan, model=type(model).__name__, steps=steps, step_search=search)
    seconds = {f"steps: {k}": v for k, v in ctx.seconds.items()} | inner.seconds
    results = {f"steps: {k}": v for k, v in ctx.results.items()} | inner.results
    return BuildResult(outer, plan, seconds, inner.kept_dense, results)


def _build_calls(
    model: nn.Module, args: tuple, options: BuildOptions, token_inputs: tuple = ()
) -> BuildResult:
    """Trace ``model`` and run the whole pass pipeline on it, then check the result on partial
    frames (``passes.validate``). A region or site whose rewrite fails, or that fails or
    disagrees on a partial frame, is kept dense (its original ops, exact) with the reason and
    the pipeline runs again on a fresh trace; with ``strict`` it raises instead."""
    keep_dense: dict[str, str] = {}
    while True:
        pass_options = dataclasses.replace(
            options.passes, keep_dense=tuple(keep_dense.items()), token_inputs=token_inputs
        )
        try:
            ctx = analyze(
                model,
                args,
                frontend=options.frontend,
                options=pass_options,
                passes=PIPELINE,
                **options.trace_options,
            )
        except RewriteError as error:
            failures = [Failure(error.name, error.cause)]
            when = "its rewrite failed"
        else:
            failures = check_partial_frames(ctx.gm, args) if options.validate else []
            when = "it failed on a partial frame"
            if not failures:
                _warn_kept_dense(type(model).__name__, keep_dense)
                return BuildResult(ctx.gm, ctx.plan, dict(ctx.seconds), dict(keep_dense), dict(ctx.results))
        for failure in failures:
            cause = failure.cause
            if options.strict or failure.name in keep_dense:
                raise RewriteError(
                    failure.name,
                    cause,
                    "; transform(..., strict=False) keeps it dense instead" if options.strict else "",
                ) from cause
            if isinstance(cause, PartialFrameError):
                keep_dense[failure.name] = f"kept dense: {cause}"
            else:
                keep_dense[failure.name] = f"kept dense: {when} ({type(cause).__name__}: {cause})"


def _warn_kept_dense(model_name: str, kept: dict[str, str]) -> None:
    if not kept:
        return
    listed = "; ".join(f"'{name}' ({reason})" for name, reason in kept.items())
    warnings.warn(
        f"evtrace.transform of {model_name}: {len(kept)} region(s)/site(s) planned for a rewrite were "
        f"kept dense (exact, no savings there): {listed}. transform(..., strict=True) raises instead",
        KeptDenseWarning,
        stacklevel=4,
    )
