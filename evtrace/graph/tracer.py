"""Front ends: capture a model as a torch.fx GraphModule whose nodes carry shape metadata.

Two front ends, one result. ``torch.fx.symbolic_trace`` keeps the module structure
(``call_module`` nodes) and is fast; ``torch.export.export(strict=False)`` captures models that
symbolic tracing cannot (HF transformers) as an ATen-level graph. Either way every node ends
up with ``meta[TENSOR]`` (shape, dtype) and ``meta[MODULE_PATH]``.

Fixed arguments (``concrete_args``, ``static_inputs``, and the optional arguments the example
leaves at a plain default) reach both front ends the same way: the model is traced through a
module that shares its submodules, parameters and buffers (so paths and weights are the
model's) and whose ``forward`` takes only the traced inputs, calling the model's ``forward``
with the fixed values bound. A static input is a tensor fixed to the example's value (a VLM
vision tower's ``grid_thw``): what is computed from it alone (``cu_seqlens``, its
``.tolist()``) is evaluated at trace time, so data-dependent shapes become the example's.
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
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

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


_SIMPLE = (bool, int, float, str)


class _Binding:
    """How the traced graph's inputs and the fixed arguments make one call of ``forward``:
    ``names`` are the traced inputs (the example's tensors, in order), ``fixed`` the values bound
    by keyword (``concrete_args``, ``static_inputs`` and the non-tensor defaults the example
    leaves out: ``attn_mask=None``, ``is_causal=False``, fixed as the call fixes them rather than
    graph inputs that a pass cannot read)."""

    def __init__(self, names: list[str], fixed: dict, user: frozenset[str]):
        self.names = names
        self.fixed = fixed
        self.user = user  # the fixed names the caller gave (the rest are defaults)


def _parameters(model: nn.Module) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None


def bind_inputs(model: nn.Module, n_args: int, concrete_args=None, static_inputs=None) -> _Binding | None:
    """The parameters of ``model.forward`` the ``n_args`` example tensors are (the first ones
    that are not fixed), and every fixed argument; None where ``forward`` has no signature.

    Raises:
        TypeError: a fixed name that ``forward`` does not take, a name fixed twice, a fixed
            positional-only parameter, or more example inputs than ``forward`` takes.
    """
    concrete = dict(concrete_args or {})
    static = dict(static_inputs or {})
    both = sorted(set(concrete) & set(static))
    if both:
        raise TypeError(f"{both} given both in concrete_args and in static_inputs: give each once")
    for name, value in static.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"static_inputs[{name!r}] must be a tensor (the example's value of that input), got "
                f"{type(value).__name__}; fix non-tensor arguments with concrete_args"
            )
    params = _parameters(model)
    if params is None:
        if concrete or static:
            raise TypeError(
                f"{type(model).__name__}.forward has no signature to bind {sorted(concrete | static)} to"
            )
        return None
    user = concrete | static
    kinds = {p.name: p.kind for p in params}
    var_keyword = any(p.kind == p.VAR_KEYWORD for p in params)
    for name in user:
        if kinds.get(name) == inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(
                f"{name!r} is a positional-only parameter of {type(model).__name__}.forward: "
                "it cannot be fixed; give it in the example"
            )
        if (
            name not in kinds
            and not var_keyword
            or kinds.get(name)
            in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            )
        ):
            raise TypeError(
                f"{name!r} (in concrete_args/static_inputs) is not a parameter of "
                f"{type(model).__name__}.forward{inspect.signature(model.forward)}"
            )
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in user
    ]
    if n_args > len(positional):
        if any(p.kind == p.VAR_POSITIONAL for p in params):
            return None  # forward(*args): the example's tensors go in as they are
        raise TypeError(
            f"{n_args} example inputs but {type(model).__name__}.forward takes "
            f"{[p.name for p in positional]} besides the fixed {sorted(user)}"
        )
    names = [p.name for p in positional[:n_args]]
    fixed = {}
    for parameter in params:
        if parameter.name in names or parameter.name in user:
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        if default is not parameter.empty and (default is None or isinstance(default, _SIMPLE)):
            fixed[parameter.name] = default
    return _Binding(names, fixed | user, frozenset(user))


class _StaticEval(TorchFunctionMode):
    """Evaluates, for real and at trace time, every torch call whose tensors are all static
    (the static inputs, what was computed from them alone, and tensors made from Python numbers
    such as ``arange(n)``): under export such values are fake, and ``.tolist()`` / ``.item()``
    of them would be data-dependent."""

    def __init__(self, static: list[torch.Tensor]):
        super().__init__()
        self.static = {id(t): t for t in static}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if all(id(t) in self.static for t in tensors):  # no tensor: a constant (arange(n))
            with _disable_current_modes(), torch._C.DisableTorchFunction():
                out = func(*args, **kwargs)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.static[id(t)] = t
            return out
        return func(*args, **kwargs)


def _bound_module(model: nn.Module, binding: _Binding, static_eval: bool) -> nn.Module:
    """A module with ``model``'s submodules, parameters and buffers (the same dicts: paths and
    weights are the model's) whose ``forward(<traced inputs>)`` calls ``model.forward`` with the
    fixed arguments bound. Its ``forward`` has an explicit signature: fx makes a proxy of
    ``*args`` / ``**kwargs`` (HF's decorators then fail on ``kwargs[name] = ...``)."""
    fixed = dict(binding.fixed)
    names = list(binding.names)
    static = [v for v in fixed.values() if isinstance(v, torch.Tensor)]

    def call(*values):
        kwargs = dict(zip(names, values, strict=True)) | fixed
        if static_eval and static:
            with _StaticEval(static):
                return model.forward(**kwargs)
        return model.forward(**kwargs)

    namespace: dict = {}
    exec(  # noqa: S102 - a forward with the traced inputs' own names, for fx's argument inspection
        f"def forward(self, {', '.join(names)}):\n    return self._evtrace_call({', '.join(names)})\n",
        namespace,
    )
    bound = type(type(model).__name__, (nn.Module,), {"forward": namespace["forward"]})()
    for key in ("_parameters", "_buffers", "_modules"):
        object.__setattr__(bound, key, getattr(model, key))
    object.__setattr__(bound, "_evtrace_call", call)
    return bound


def _trace_fx(
    model: nn.Module, args: tuple, leaf_modules, concrete_args, static_inputs
) -> torch.fx.GraphModule:
    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_paths = frozenset(x for x in leaf_modules if isinstance(x, str))
    tracer = _LeafTracer(leaf_types, leaf_paths)
    binding = bind_inputs(model, len(args), concrete_args, static_inputs)
    if binding is None:
        graph = tracer.trace(model)
    elif static_inputs or _has_var_keyword(model):
        # a static tensor must reach forward as itself (fx runs what is computed from it), and a
        # forward(**kwargs) behind HF's decorators needs a real dict, not a proxy
        graph = tracer.trace(_bound_module(model, binding, static_eval=False))
    else:
        graph = tracer.trace(model, concrete_args=binding.fixed)
        _drop_fixed_inputs(graph, set(binding.fixed) - binding.user)
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    _propagate_shapes(gm, args)
    return gm


def _has_var_keyword(model: nn.Module) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in _parameters(model) or ())


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


def _trace_export(model: nn.Module, args: tuple, concrete_args, static_inputs) -> torch.fx.GraphModule:
    binding = bind_inputs(model, len(args), concrete_args, static_inputs)
    if binding is not None and binding.user:
        model = _bound_module(model, binding, static_eval=True)
    exported = torch.export.export(model, args, strict=False)
    gm = exported.module()
    _spell_transposes(gm)
    for node in gm.graph.nodes:
        set_tensor_info(node, _info_from_tensor_meta(node.meta.get("val")))
    return gm


def _spell_transposes(gm: torch.fx.GraphModule) -> None:
    """``Tensor.T`` survives export as ``numpy_T`` (a composite op export leaves whole); it is a
    permute reversing every dim, and is spelled so, the one spelling the passes know."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.numpy_T.default:
            rank = len(node.args[0].meta["val"].shape)
            node.target = torch.ops.aten.permute.default
            node.args = (node.args[0], list(range(rank - 1, -1, -1)))
            changed = True
    if changed:
        gm.recompile()


def trace(
    model: nn.Module,
    example_inputs,
    frontend: str = "auto",
    leaf_modules: Sequence[type | str] = (),
    concrete_args: dict | None = None,
    static_inputs: dict | None = None,
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
        concrete_args: non-tensor arguments of ``forward`` fixed for the trace, by name
            (``{"return_dict": False}``, ``{"output_hidden_states": True}``, a video encoder's
            predictor flag); both front ends see them. The eventful model then accepts calls
            that give them at these values and refuses other values.
        static_inputs: tensor arguments fixed to the example's value, by name (a VLM vision
            tower's ``{"grid_thw": grid}``): they are not graph inputs; whatever ``forward``
            computes from them alone (``cu_seqlens``, ``.tolist()``, ``.item()``) is evaluated
            while tracing, so shapes that depend on their data become the example's. The
            example then holds only the other inputs.

    Returns:
        The GraphModule; ``frontend_of(gm)`` (``evtrace.graph.meta``) names the front end that succeeded.

    Raises:
        TraceError: no front end could capture the model; the message quotes each failure and
            the options that fix one.
        TypeError: ``concrete_args`` / ``static_inputs`` name an argument ``forward`` does not
            take, or a static input is not a tensor.
    """
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = as_args(example_inputs)
    if isinstance(model, torch.fx.GraphModule) and model.meta.get(PRETRACED):
        return _retrace_cut(model, args)
    bind_inputs(model, len(args), concrete_args, static_inputs)  # argument errors, before any front end
    failures: list[str] = []
    order = ("fx", "export") if frontend == "auto" else (frontend,)
    for name in order:
        try:
            with torch.no_grad():
                if name == "fx":
                    gm = _trace_fx(model, args, leaf_modules, concrete_args, static_inputs)
                else:
                    gm = _trace_export(model, args, concrete_args, static_inputs)
        except Exception as exc:  # noqa: BLE001 - each front end fails in its own ways
            failures.append(f"{name}: {_summarise(exc)}")
            continue
        set_frontend(gm, name)
        for node in gm.graph.nodes:
            set_module_path(node, module_path(node))
        return gm
    raise TraceError(
        f"could not trace {type(model).__name__}:\n  " + "\n  ".join(failures) + "\n" + _hints(model, args)
    )


def _hints(model: nn.Module, args: tuple) -> str:
    """What fixes a model no front end captured, naming its integer tensor inputs (shape
    descriptors such as grid_thw, image_sizes: the usual source of data-dependent shapes)."""
    try:
        binding = bind_inputs(model, len(args))
    except TypeError:
        binding = None
    names = binding.names if binding is not None else [f"input {i}" for i in range(len(args))]
    integer = [
        n
        for n, a in zip(names, args, strict=True)
        if isinstance(a, torch.Tensor) and not a.is_floating_point()
    ]
    static = (
        f" (here: static_inputs={{{', '.join(f'{n!r}: <the example value>' for n in integer)}}}, "
        "with the example holding the other inputs)"
        if integer and binding is not None
        else ""
    )
    flags = [
        f"{p.name}={p.default!r}"
        for p in _parameters(model) or ()
        if isinstance(p.default, bool) and (binding is None or p.name not in binding.names)
    ]
    named = f" (here: {', '.join(flags)})" if flags else ""
    return (
        "options that fix this:\n"
        "  leaf_modules=[...]: modules (types or dotted paths) fx must not trace into, for "
        "data-dependent Python control flow inside them;\n"
        "  concrete_args={...}: non-tensor arguments fixed for both front ends (return_dict=False, "
        f"output_hidden_states=True, a model's flags{named}: a flag can skip the part that fails);\n"
        "  static_inputs={name: tensor}: tensors that only determine shapes (grid_thw, image_sizes) "
        "fixed to the example's value, so .tolist() / .item() on them and the shapes they give are "
        f"evaluated while tracing{static};\n"
        "  frontend='export' captures most Hugging Face models (auto tries it after fx); export needs "
        "a model that runs on example_inputs without data-dependent shapes."
    )


def fix_arguments(
    model: nn.Module, concrete_args: dict | None = None, static_inputs: dict | None = None, inputs: int = 1
) -> nn.Module:
    """``model`` with arguments of ``forward`` fixed by name: a module sharing ``model``'s
    submodules, parameters and buffers (same paths, same weights) whose ``forward`` takes the
    first ``inputs`` parameters that are not fixed. ``concrete_args`` are non-tensor values,
    ``static_inputs`` tensors whose derived values (``.tolist()``, ``.item()``) are evaluated
    for real while tracing. The same as passing them to :func:`trace` / ``transform``, for code
    that traces a model without those options.

    Raises:
        TypeError: a name that ``forward`` does not take, or a static input that is not a tensor.
    """
    binding = bind_inputs(model, inputs, concrete_args, static_inputs)
    if binding is None:
        raise TypeError(f"{type(model).__name__}.forward has no signature to fix arguments of")
    return _bound_module(model, binding, static_eval=True)


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
