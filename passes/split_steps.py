"""Cut a graph at its per-step sub-model: an outer graph that calls it, and the sub-model alone.

Input: a traced graph and the :class:`~evtrace.graph.plan.StepStructure` that
``passes.time_steps`` found in it. Output: ``(outer, step)`` GraphModules sharing the model's
weights. ``step`` takes one time step of each fold input (B rows instead of B * T') and returns
a tuple with one time step of each sub-model output. ``outer`` is the original graph with the
sub-model replaced by one call of the child module ``STEP_MODULE`` (installed by the caller:
``evtrace.runtime.steps.StepLoop``), which takes the folded inputs and returns the folded
outputs as a tuple.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from evtrace.graph.errors import EvtraceError
from evtrace.graph.meta import PRETRACED, OpKind, module_path, set_op, tensor_info
from evtrace.graph.plan import StepStructure

from .plan import other_op_flops

STEP_MODULE = "evtrace_steps"


class StepSplitError(EvtraceError, ValueError):
    """The graph cannot be cut at its per-step sub-model."""


def _copy_constant(node, graph, env, data_free) -> torch.fx.Node:
    """Copy ``node`` (a parameter or a value computed from parameters only) into ``graph``."""
    if node in env:
        return env[node]
    if node not in data_free:
        raise StepSplitError(
            f"the per-step sub-model reads {node.name}, computed outside it from the input: it cannot run "
            "one time step at a time"
        )
    for arg in node.all_input_nodes:
        _copy_constant(arg, graph, env, data_free)
    env[node] = graph.node_copy(node, lambda n: env[n])
    return env[node]


def _constant_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes computed from parameters and literals only (no placeholder among their ancestors)."""
    free: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if all(a in free for a in node.all_input_nodes):
            free.add(node)
    return free


def split_time_steps(
    gm: torch.fx.GraphModule, structure: StepStructure
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``(outer, step)`` for ``structure`` (see the module docstring)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    members = [by_name[name] for name in structure.nodes]
    member_set = set(members)
    folds = [by_name[name] for name in structure.inputs]
    outputs = [by_name[name] for name in structure.outputs]
    constants = _constant_nodes(gm)

    step_graph = torch.fx.Graph()
    step_env: dict[torch.fx.Node, torch.fx.Node] = {}
    for fold in folds:
        placeholder = step_graph.placeholder(fold.name)
        placeholder.meta = dict(fold.meta)
        step_env[fold] = placeholder
    for node in members:
        for arg in node.all_input_nodes:
            if arg not in step_env:
                _copy_constant(arg, step_graph, step_env, constants)
        step_env[node] = step_graph.node_copy(node, lambda n: step_env[n])
    step_graph.output(tuple(step_env[o] for o in outputs))
    step = torch.fx.GraphModule(gm, step_graph, class_name="StepGraph")
    step.meta[PRETRACED] = True

    outer_graph = torch.fx.Graph()
    outer_env: dict[torch.fx.Node, torch.fx.Node] = {}
    emitted = False
    for node in gm.graph.nodes:
        if node in member_set:
            continue
        reads_outputs = any(a in member_set for a in node.all_input_nodes)
        if reads_outputs and not emitted:
            missing = [f.name for f in folds if f not in outer_env]
            if missing:
                raise StepSplitError(
                    f"the fold input(s) {', '.join(missing)} are computed after the per-step sub-model's "
                    f"outputs are read (at {node.name})"
                )
            call = outer_graph.call_module(STEP_MODULE, tuple(outer_env[f] for f in folds))
            for index, output in enumerate(outputs):
                item = outer_graph.call_function(operator.getitem, (call, index))
                item.meta = dict(output.meta)
                set_op(item, OpKind.LAYOUT)
                outer_env[output] = item
            emitted = True
        outer_env[node] = outer_graph.node_copy(node, lambda n: outer_env[n])
    if not emitted:
        raise StepSplitError("nothing reads the per-step sub-model's outputs")
    gm.add_submodule(STEP_MODULE, torch.nn.Identity())  # a stand-in until the caller installs the loop
    outer = torch.fx.GraphModule(gm, outer_graph, class_name=type(gm).__name__)
    delattr(gm, STEP_MODULE)
    return outer, step


def step_example(gm: torch.fx.GraphModule, structure: StepStructure) -> tuple[torch.Tensor, ...]:
    """Zero tensors of one time step of each fold input (the step graph's example)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    examples = []
    for name in structure.inputs:
        info = tensor_info(by_name[name])
        shape = list(info.shape)
        shape[0] //= structure.steps
        examples.append(torch.zeros(shape, dtype=info.dtype))
    return tuple(examples)


def outer_flops(outer: torch.fx.GraphModule) -> tuple[tuple[str, int], ...]:
    """FLOPs of the ops outside the per-step sub-model (run densely once per call), by module path."""
    flops: dict[str, int] = {}
    for node in outer.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node.target == STEP_MODULE:
            continue
        count = other_op_flops(node, outer)
        if count:
            key = module_path(node) or node.name
            flops[key] = flops.get(key, 0) + count
    return tuple(flops.items())
