"""Front ends: capture a model as a torch.fx GraphModule whose nodes carry shape metadata.

Two front ends, one result. ``torch.fx.symbolic_trace`` keeps the module structure
(``call_module`` nodes) and is fast; ``torch.export.export(strict=False)`` captures models that
symbolic tracing cannot (HF transformers) as an ATen-level graph. Either way every node ends
up with ``meta[TENSOR]`` (shape, dtype) and ``meta[MODULE_PATH]``.
"""

from __future__ import annotations

import copy
import inspect
import re
import traceback
import warnings
from collections.abc import Sequence

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import ShapeProp

from evtrace.graph.errors import TraceError
from evtrace.graph.meta import (
    PRETRACED,
    TensorInfo,
    module_path,
    set_frontend,
    set_module_path,
    set_tensor_info,
)

FRONTENDS = ("auto", "fx", "export")


def as_args(example_inputs) -> tuple:
    """Normalise ``example_inputs`` (a tensor or a tuple/list of them) to a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...], leaf_paths: frozenset[str]):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_paths or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)


def _defaults_left_out(model: nn.Module, args: tuple) -> dict:
    """The optional arguments of ``forward`` that the example call leaves at a non-tensor default
    (``attn_mask=None``, ``is_causal=False``): fixed at trace time, as the call fixes them, rather
    than becoming graph inputs that a pass cannot read (a proxy ``is_causal`` is not False)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    fixed = {}
    for parameter in parameters[len(args) :]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        if default is not parameter.empty and (
            default is None or isinstance(default, (bool, int, float, str))
        ):
            fixed[parameter.name] = default
    return fixed


def _drop_fixed_inputs(graph: torch.fx.Graph, names: set[str]) -> None:
    """fx keeps an input for every fixed argument, with a guard that it keeps its value; the
    model is called without them, so the inputs and their guards go."""
    fixed = [n for n in graph.nodes if n.op == "placeholder" and re.sub(r"_\d+$", "", n.target) in names]
    for node in fixed:
        guards = []
        frontier = list(node.users)
        while frontier:
            user = frontier.pop()
            guards.append(user)
            frontier.extend(user.users)
        if all(g.op == "call_function" for g in guards):
            for guard in reversed(sorted(guards, key=lambda g: list(graph.nodes).index(g))):
                graph.erase_node(guard)
            graph.erase_node(node)


def _trace_fx(model: nn.Module, args: tuple, leaf_modules, concrete_args) -> torch.fx.GraphModule:
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_paths = frozenset(x for x in leaf_modules if isinstance(x, str))
    tracer = _LeafTracer(leaf_types, leaf_paths)
    defaults = _defaults_left_out(model, args)
    graph = tracer.trace(model, concrete_args=defaults | dict(concrete_args or {}))
    _drop_fixed_inputs(graph, set(defaults) - set(concrete_args or {}))
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    _propagate_shapes(gm, args)
    return gm


def _propagate_shapes(gm: torch.fx.GraphModule, args: tuple) -> None:
    """Shapes and dtypes of every node, from fake tensors (no arithmetic runs); a graph that
    fake tensors cannot run (an op without a meta kernel) runs for real instead."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            FakeTensorProp(gm, mode).propagate(*args)
        key = "val"
    except Exception:
        ShapeProp(gm).propagate(*args)
        key = "tensor_meta"
    for node in gm.graph.nodes:
        set_tensor_info(node, _info_from_tensor_meta(node.meta.get(key)))
        if key == "val":  # fake tensors are not wanted past here (deepcopy of the graph warns on them)
            node.meta.pop("val", None)


def _info_from_tensor_meta(tm):
    if tm is None:
        return None
    if hasattr(tm, "shape") and hasattr(tm, "dtype"):
        return TensorInfo(tuple(int(s) for s in tm.shape), tm.dtype)
    if isinstance(tm, (tuple, list)):
        return tuple(_info_from_tensor_meta(t) for t in tm)
    return None


def _trace_export(model: nn.Module, args: tuple) -> torch.fx.GraphModule:
    exported = torch.export.export(model, args, strict=False)
    gm = exported.module()
    for node in gm.graph.nodes:
        set_tensor_info(node, _info_from_tensor_meta(node.meta.get("val")))
    return gm


def trace(
    model: nn.Module,
    example_inputs,
    frontend: str = "auto",
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict | None = None,
) -> torch.fx.GraphModule:
    """Capture ``model`` as an fx GraphModule with shape and dtype on every node.

    Args:
        model: the vision Transformer (eval mode is expected; dropout is treated as identity).
        example_inputs: a tensor or tuple of tensors the model is called with.
        frontend: ``"fx"`` (``torch.fx.symbolic_trace``, keeps modules), ``"export"``
            (``torch.export.export(strict=False)``, ATen ops; works for HF transformers) or
            ``"auto"``: fx first, export when fx fails.
        leaf_modules: module types or dotted paths fx must not trace into (the escape hatch
            for modules with data-dependent Python control flow).
        concrete_args: passed to fx, to fix non-tensor arguments (flags) of ``forward``.

    Returns:
        The GraphModule; ``frontend_of(gm)`` (``evtrace.graph.meta``) names the front end that succeeded.

    Raises:
        TraceError: no front end could capture the model; the message quotes each failure.
    """
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = as_args(example_inputs)
    if isinstance(model, torch.fx.GraphModule) and model.meta.get(PRETRACED):
        return _retrace_cut(model, args)
    failures: list[str] = []
    order = ("fx", "export") if frontend == "auto" else (frontend,)
    for name in order:
        try:
            with torch.no_grad():
                if name == "fx":
                    gm = _trace_fx(model, args, leaf_modules, concrete_args)
                else:
                    gm = _trace_export(model, args)
        except Exception as exc:  # noqa: BLE001 - each front end fails in its own ways
            failures.append(f"{name}: {_summarise(exc)}")
            continue
        set_frontend(gm, name)
        for node in gm.graph.nodes:
            set_module_path(node, module_path(node))
        return gm
    raise TraceError(
        f"could not trace {type(model).__name__}:\n  " + "\n  ".join(failures) + "\n"
        "hint: for fx, mark modules with data-dependent Python control flow as leaf modules "
        "(leaf_modules=[...]) or fix non-tensor arguments with concrete_args={...}; for export, "
        "make sure the model runs on example_inputs and avoids data-dependent shapes. "
        "frontend='export' captures most Hugging Face models."
    )


def _retrace_cut(model: torch.fx.GraphModule, args: tuple) -> torch.fx.GraphModule:
    """A graph cut out of a traced one: a fresh copy of its graph (the passes rewrite it) on the
    same modules, with the shapes of ``args`` and the module paths it was cut with."""
    graph = copy.deepcopy(model.graph)
    for node in graph.nodes:
        path = module_path(node)
        node.meta = {}  # the cut graph's shapes and analysis were for B * T' rows
        set_module_path(node, path)
    gm = torch.fx.GraphModule(model, graph, type(model).__name__)
    with torch.no_grad():
        _propagate_shapes(gm, args)
    set_frontend(gm, "fx")
    return gm


def _summarise(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "site-packages/torch" not in f.filename and "evtrace" not in f.filename]
    where = f" (at {user[-1].filename}:{user[-1].lineno}: {user[-1].line})" if user else ""
    return (text[0] if text else type(exc).__name__)[:400] + where
