"""``evtrace.transform``: build an eventful model, and the stateful module it returns."""

from __future__ import annotations

import copy
import inspect
import math
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from evtrace import checkpoints
from evtrace.advice import warn_if_unprofitable
from evtrace.cost.model import build_cost_model, peak_line
from evtrace.graph.errors import (
    ConcurrentCallError,
    EvtraceError,
    FrozenTokensWarning,
    InputMismatchError,
    NonFiniteInputError,
    NonFiniteStateError,
)
from evtrace.graph.plan import AttentionMode, Plan
from evtrace.graph.tracer import as_args
from evtrace.report import Report, build_report
from evtrace.runtime.attention import ExactDeltaAttention, PaperDeltaAttention
from evtrace.runtime.cost_profile import DEFAULT_PROFILE, CostProfile, apply_cost_profile, as_profile
from evtrace.runtime.gates import SparseRegion
from evtrace.runtime.packed import PackedLinear, PackedSiblingLinears, PackedWeights
from evtrace.runtime.policies import (
    Policy,
    StatefulPolicy,
    SteeredThreshold,
    as_policy,
    check_budget,
    counted_tokens,
)
from evtrace.runtime.scene_cut import SceneCutDetector, detector_from_option
from passes.build import STREAM_AXES, BuildOptions, build
from passes.context import PassOptions

INPUT_CHANGE = ("reset", "raise")


@dataclass
class TransformOptions:
    policy: Policy
    attention: AttentionMode = AttentionMode.EXACT
    frontend: str = "auto"
    always_update_prefix: bool = True
    repair_rows: int = 8
    refresh_every: int | None = None
    scene_cut: float | bool | SceneCutDetector | None = True
    on_input_change: str = "reset"
    check_inputs: bool = True
    max_variants: int = 8
    stream_axis: str = "calls"
    pack_weights: bool = True
    cost_profile: CostProfile = DEFAULT_PROFILE
    strict: bool = False
    trace_options: dict = field(default_factory=dict)


@dataclass
class _Variant:
    """The rewritten graph for one input signature (shapes and dtypes), and its plan."""

    graph_module: torch.fx.GraphModule
    plan: Plan
    seconds: dict[str, float]
    results: dict[str, str] = field(default_factory=dict)  # what each pass did, by pass name
    regions: dict[str, SparseRegion] = field(default_factory=dict)
    attention: dict[str, nn.Module] = field(default_factory=dict)

    def __post_init__(self):
        gm = self.graph_module
        self.regions = {m.name: m for m in gm.modules() if isinstance(m, SparseRegion)}
        self.attention = {
            name.rsplit(".", 1)[-1]: m
            for name, m in gm.named_modules()
            if isinstance(m, (ExactDeltaAttention, PaperDeltaAttention))
        }

    def stateful(self) -> list[nn.Module]:
        return list(self.regions.values()) + list(self.attention.values())


def _check_options(options: TransformOptions) -> None:
    options.attention = AttentionMode.parse(options.attention)
    if options.stream_axis not in STREAM_AXES:
        raise ValueError(
            f"stream_axis must be one of {STREAM_AXES} (the stream: successive calls, the time steps "
            f"inside each call, or both for sliding clips), got {options.stream_axis!r}"
        )
    if options.on_input_change not in INPUT_CHANGE:
        raise ValueError(f"on_input_change must be one of {INPUT_CHANGE}, got {options.on_input_change!r}")
    refresh = options.refresh_every
    if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1):
        raise ValueError(f"refresh_every must be an int >= 1 or None, got {refresh!r}")
    cut = options.scene_cut
    if not (
        cut is None
        or isinstance(cut, (bool, SceneCutDetector))
        or (isinstance(cut, (int, float)) and math.isfinite(cut) and cut > 1)
    ):
        raise ValueError(
            f"scene_cut must be True (the default detector), a factor > 1 (how many times the median "
            f"recent frame change is a cut), a SceneCutDetector, or None/False, got {cut!r}"
        )
    if (
        isinstance(options.repair_rows, bool)
        or not isinstance(options.repair_rows, int)
        or options.repair_rows < 0
    ):
        raise ValueError(f"repair_rows must be an int >= 0, got {options.repair_rows!r}")
    if not isinstance(options.strict, bool):
        raise TypeError(f"strict must be a bool, got {type(options.strict).__name__} {options.strict!r}")
    if not isinstance(options.pack_weights, bool):
        raise TypeError(
            f"pack_weights must be a bool, got {type(options.pack_weights).__name__} {options.pack_weights!r}"
        )
    cap = options.max_variants
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(
            f"max_variants must be an int >= 1 (input signatures whose graphs are kept), got {cap!r}"
        )


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: its min and max are finite (NaN and Inf carry through both). One
    reduction pass without a bool temporary: 1 ms instead of 29 for a 32-frame 320 px clip."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _check_batch(args: tuple, kwargs: dict, what: str) -> None:
    """A batch of 0 streams has nothing to compute (and no tokens to gate)."""
    for i, value in enumerate(list(args) + list(kwargs.values())):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 0:
            raise InputMismatchError(
                f"{what} {i} has batch size 0 (shape {tuple(value.shape)}): an eventful model needs at "
                "least one stream per call; skip empty batches"
            )


def _build(model: nn.Module, args: tuple, options: TransformOptions) -> _Variant:
    """The rewritten graph of ``model`` for inputs like ``args`` (:func:`passes.build.build`)."""
    built = build(
        model,
        args,
        BuildOptions(
            passes=PassOptions(
                attention=options.attention,
                policy=options.policy,
                repair_rows=options.repair_rows,
                always_update_prefix=options.always_update_prefix,
                pack_linears=options.pack_weights,
            ),
            frontend=options.frontend,
            stream_axis=options.stream_axis,
            scene_cut=options.scene_cut,
            trace_options=options.trace_options,
            strict=options.strict,
        ),
    )
    return _Variant(
        built.graph_module, built.plan, built.seconds, {k: str(v) for k, v in built.results.items()}
    )


def _signature(args: tuple, kwargs: dict) -> tuple:
    flat = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            flat.append((tuple(value.shape), value.dtype))
        else:
            flat.append(repr(value))
    return tuple(flat)


class EventfulExportError(EvtraceError, RuntimeError):
    """An eventful model cannot be exported this way (see :func:`evtrace.export`)."""


_EXPORT_MESSAGE = (
    "torch.export of an EventfulModel would capture one frame's branch (the dense first frame or a "
    "steady step) with the stream control left out, silently: export it with "
    "evtrace.export(emodel, example), which exports both steps with the state and returns a runner "
    "(evtrace.deploy.EventfulProgram)"
)
_EAGER: dict = {}


def _eager(fn):
    """``fn`` under ``torch.compiler.disable`` (made once): never traced, from a skipped frame."""
    wrapped = _EAGER.get(fn)
    if wrapped is None:
        wrapped = _EAGER[fn] = torch.compiler.disable(fn, recursive=True)
    return wrapped


def _has_global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


_SKIPPED = []


def _skip_in_dynamo() -> None:
    """Dynamo runs ``EventfulModel.__call__`` as Python (no graph, no graph break) and compiles the
    frames it calls: the graph module's call, with the options of ``torch.compile``."""
    if not _SKIPPED:
        from torch._dynamo.eval_frame import skip_code

        for fn in (EventfulModel.__call__, _eager, _has_global_hooks):
            skip_code(fn.__code__)
        for fn in (EventfulModel._enter_frame, EventfulModel._leave_frame, EventfulModel._abort_frame):
            _eager(fn)
        _SKIPPED.append(True)


#: Python-side stream flags of the runtime modules (evtrace.deploy reads them)
_STREAM_FLAGS = tuple(checkpoints.STREAM_FLAGS)


def _make_picklable(gm: torch.fx.GraphModule) -> None:
    """GraphModules pickle as their generated code, re-traced on load: string annotations on
    placeholders (``x: "torch.Tensor"`` under ``from __future__ import annotations``) and a
    tracer class whose constructor takes arguments would make that fail. Drop both (once)."""
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            if isinstance(node.type, str):
                node.type = None
                changed = True
        tracer = module.__dict__.get("_tracer_cls")
        if tracer is not None and tracer is not torch.fx.Tracer:
            try:
                tracer()
            except TypeError:
                module._tracer_cls = torch.fx.Tracer
                module.graph._tracer_cls = torch.fx.Tracer
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                # torch.export's unlifted module: lambdas around the nn.Module-typed inputs, none here
                cells = [c.cell_contents for c in getattr(hook, "__closure__", None) or ()]
                if "<lambda>" in getattr(hook, "__qualname__", "") and all(
                    isinstance(c, (set, frozenset)) and not c for c in cells
                ):
                    del hooks[key]
                    module._forward_hooks_always_called.pop(key, None)
        guards = [n for n in module.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]
        if guards and type(module.get_submodule("_guards_fn")).__name__ == "GuardsFn":
            # torch.export's input-shape guards, generated code that does not pickle; EventfulModel
            # runs a graph only on inputs of the signature it was traced for
            for node in guards:
                module.graph.erase_node(node)
            delattr(module, "_guards_fn")
            changed = True
        for name in ("train", "eval"):  # torch.export's refusing closures; its graph has no mode anyway
            if isinstance(module.__dict__.get(name), types.MethodType):
                del module.__dict__[name]
        if changed:
            module.recompile()


#: stateful policy -> the eventful model that uses it: a second model gets a copy, never the object
_POLICY_USERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _freeze_train_mode(gm: torch.fx.GraphModule) -> None:
    """Eval semantics for good: dropout calls become their input, and the leaf modules whose
    forward depends on ``training`` (batch and instance norm) are replaced by copies in eval
    mode that share the original's parameters and buffers, so that ``model.train()`` on the
    original model reaches none of them."""
    for module in list(gm.modules()):
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in list(module.graph.nodes):
            if node.op != "call_module":
                continue
            target = module.get_submodule(node.target)
            if isinstance(target, nn.modules.dropout._DropoutNd) and node.args:
                node.replace_all_uses_with(node.args[0])
                module.graph.erase_node(node)
                if not any(n.op == "call_module" and n.target == node.target for n in module.graph.nodes):
                    module.delete_submodule(node.target)
                changed = True
            elif isinstance(target, nn.modules.batchnorm._NormBase) and not getattr(
                target, "_evtrace_eval", 0
            ):
                frozen = copy.copy(target)  # shares the parameter and buffer dicts
                frozen.training = False
                frozen._evtrace_eval = 1
                parent, _, name = node.target.rpartition(".")
                setattr(module.get_submodule(parent) if parent else module, name, frozen)
        if changed:
            module.recompile()
        called = {n.target for n in module.graph.nodes if n.op == "call_module"}
        for name, child in list(module.named_modules()):
            parts = name.split(".")
            inside = any(
                isinstance(module.get_submodule(".".join(parts[:i])), torch.fx.GraphModule)
                for i in range(1, len(parts))
            )
            if isinstance(child, nn.modules.dropout._DropoutNd) and name not in called and not inside:
                module.delete_submodule(name)  # left over from the trace, called by no graph


class _CallSignature:
    """How a call of the original model maps onto the traced graph: its first ``traced``
    parameters are the graph's positional inputs; every other argument must keep the value the
    trace fixed (its default, or ``concrete_args``)."""

    def __init__(self, model: nn.Module, traced: int, fixed: dict):
        try:
            found = inspect.signature(model.forward)
        except (TypeError, ValueError):
            self.signature = None
        else:  # without annotations: they need not pickle
            bare = [p.replace(annotation=p.empty) for p in found.parameters.values()]
            self.signature = found.replace(parameters=bare, return_annotation=found.empty)
            named = [p for p in bare[:traced] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if len(named) < traced:  # forward(*args): no names to map keywords onto
                self.signature = None
        self.traced = traced
        self.fixed = dict(fixed)
        self.model = type(model).__name__

    def _names(self) -> list[inspect.Parameter]:
        """The parameters that can be graph inputs: those not fixed for the trace."""
        return [p for p in self.signature.parameters.values() if p.name not in self.fixed]

    def example_args(self, example: dict) -> tuple:
        """A dict of keyword arguments given as the example: the positional inputs to trace."""
        if self.signature is None:
            raise TypeError(
                f"{self.model}.forward has no signature to bind the example's keywords to: give the "
                "example as a tensor or a tuple of tensors"
            )
        try:
            bound = self.signature.bind(**example)
        except TypeError as error:
            raise TypeError(f"example_inputs do not fit {self.model}.forward: {error}") from None
        params = self._names()
        tensors = [
            name
            for name, value in example.items()
            if isinstance(value, torch.Tensor) and name not in self.fixed
        ]
        leading = [p.name for p in params[: len(tensors)]]
        if sorted(tensors) != sorted(leading):
            raise TypeError(
                f"example_inputs: the tensors {tensors} must be the first parameters of "
                f"{self.model}.forward ({[p.name for p in params[: len(tensors) + 2]]} ...): the eventful "
                "graph takes them in that order. Give the example as a tuple of tensors"
            )
        for name, value in bound.arguments.items():
            if name not in leading:
                default = self.fixed.get(name, self.signature.parameters[name].default)
                if not _same_value(value, default):
                    raise TypeError(
                        f"example_inputs: {name}={value!r} is not a tensor input; fix it with "
                        f"concrete_args={{{name!r}: {value!r}}} or leave it out"
                    )
        return tuple(example[name] for name in leading)

    def positional(self, args: tuple, kwargs: dict) -> tuple:
        """The graph's inputs for a call ``(args, kwargs)`` of the original model's signature.
        Raises InputMismatchError naming the argument the graph cannot take (nothing changed)."""
        if not kwargs and len(args) == self.traced:
            return args
        if self.signature is None:
            if kwargs:
                raise InputMismatchError(
                    f"keyword argument(s) {sorted(kwargs)}: {self.model}.forward has no signature to "
                    "bind them to; pass the inputs positionally. The state is unchanged"
                )
            return args
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise InputMismatchError(
                f"the call does not fit {self.model}.forward: {error}. The state is unchanged"
            ) from None
        params = self._names()
        traced = [p.name for p in params[: self.traced]]
        for name in traced:
            if name not in bound.arguments:
                raise InputMismatchError(
                    f"input '{name}' is missing: the eventful model was traced with "
                    f"{', '.join(traced)}. The state is unchanged"
                )
        for name, value in bound.arguments.items():
            if name in traced:
                continue
            parameter = self.signature.parameters[name]
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                extra = list(value) if parameter.kind == parameter.VAR_KEYWORD else list(range(len(value)))
                if parameter.kind == parameter.VAR_KEYWORD:  # fixed for the trace: checked as named ones
                    for key in [k for k in extra if k in self.fixed]:
                        self._check_fixed(key, value[key], self.fixed[key], traced)
                    extra = [k for k in extra if k not in self.fixed]
                if extra:
                    raise InputMismatchError(
                        f"argument(s) {extra} (in {self.model}.forward's **{parameter.name}) are not "
                        f"inputs of the traced graph (traced with {', '.join(traced)}); call without "
                        "them. The state is unchanged"
                    )
                continue
            self._check_fixed(name, value, self.fixed.get(name, parameter.default), traced)
        return tuple(bound.arguments[name] for name in traced)

    @staticmethod
    def _check_fixed(name: str, value, fixed, traced: list[str]) -> None:
        if not _same_value(value, fixed):
            raise InputMismatchError(
                f"argument '{name}'={_short(value)} differs from the value the eventful model was "
                f"traced with ({name}={_short(fixed)}; its inputs are {', '.join(traced)}): leave "
                f"'{name}' out, or transform with it fixed (concrete_args={{{name!r}: ...}}, "
                "or static_inputs for a tensor). The state is unchanged"
            )


def _fixed_arguments(trace_options: dict) -> dict:
    """The arguments the trace fixes by name: ``concrete_args`` and ``static_inputs``."""
    return dict(trace_options.get("concrete_args") or {}) | dict(trace_options.get("static_inputs") or {})


def _same_value(value, fixed) -> bool:
    if value is fixed:
        return True
    if isinstance(value, torch.Tensor) and isinstance(fixed, torch.Tensor):  # a static input
        return (
            value.shape == fixed.shape
            and value.dtype == fixed.dtype
            and bool(torch.equal(value.detach().cpu(), fixed.detach().cpu()))
        )
    if isinstance(value, torch.Tensor) or isinstance(fixed, torch.Tensor):
        return False
    try:
        return type(value) is type(fixed) and bool(value == fixed)
    except Exception:  # noqa: BLE001 - a value without a plain comparison is not the fixed one
        return False


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class EventfulModel(nn.Module):
    """A vision Transformer that recomputes, frame after frame, only the tokens that changed.

    Built by :func:`evtrace.transform`; call it like the original model, one frame (or one
    batch of independent streams) at a time. The first call after :meth:`reset` computes
    densely and fills the state; later calls run each gated region on the tokens its policy
    selects and update attention with delta updates. ``reset(stream=i)`` restarts stream i of
    a batch alone: the other streams go on exactly as if it had not happened.

    State lives in non-persistent buffers of the inserted modules (``evtrace_region_*``:
    gate references and exit buffers; ``evtrace_attention_*``: attention state); weights are
    the original model's, shared, not copied (unless ``transform(..., copy_weights=True)``).

    ``state_dict()`` is the original model's: its keys, its weights, no stream state. It loads
    into the original model, into any transform of a model of that architecture, and back;
    ``load_state_dict`` writes into the shared weights (so the original model sees them too)
    and resets the stream. A frame that raises midway (a failing user hook, an interrupt)
    resets the stream before the exception propagates: the next frame is a dense first frame.

    Checkpoints: ``pickle`` and ``torch.save(emodel)`` (load with ``weights_only=False``) keep
    the whole model, its weights and every variant's stream: the restored model continues each
    stream bit for bit (every stateful policy's state included). :meth:`save_stream` /
    :meth:`load_stream` move only the current stream, as data (``evtrace/checkpoints.py``), into
    a model built the same way, checked as a whole against it before anything is written.

    Eval semantics: dropout is removed and batch norm frozen at transform; ``train()`` warns and
    changes nothing. Keyword arguments of the original ``forward`` are mapped onto the traced
    inputs; ``config``, ``device`` and ``dtype`` are the original model's. A stateful policy
    object serves one model: another live model that is given it gets a copy.

    Variants: each input signature (shapes and dtypes) gets its own rewritten graph and state,
    kept in an LRU cache of ``max_variants`` entries (the least recently used is dropped, graph
    and state). Switching to another signature starts a new stream with the policies in force
    (the global one and every per-gate override).

    Threads: one eventful model is one stream processor. A call (frame, ``reset``,
    ``set_policy``) while another thread runs a frame on the same model raises
    :class:`~evtrace.graph.errors.ConcurrentCallError` (a ``RuntimeError``) at once and changes
    nothing; it never waits and never mixes states. Use one model per thread (they may share
    the weights: transform the model once per thread) or serialise the calls yourself.

    Checks per eager frame (``check_inputs=True``): NaN/Inf in the inputs (before any state
    changes); the budgets of every gate's policy and the inputs' rank, dtype and batch against
    the traced signature (before any state changes); and, after the frame, whether every value
    the frame wrote into the state and every output stayed finite (a finite input such as 3e38
    can overflow inside): the streams that did not are reset and
    :class:`~evtrace.graph.errors.NonFiniteStateError` is raised. Under ``torch.compile(emodel)``
    the same control runs, uncompiled, around the compiled graph call (``__call__``): every check,
    ``refresh_every``, scene cuts, the reset on an exception, no_grad, input-signature switches;
    only the per-module sums of what the frame wrote are left out (they would be host syncs
    inside the graph): the finite check after the frame reads the outputs.
    """

    def __init__(self, model: nn.Module, example_args: tuple, options: TransformOptions):
        super().__init__()
        options.policy = self._claim(options.policy)
        self._options = options
        self._model_ref = [model]  # not a submodule: its weights are reached through the graph
        self._call = _CallSignature(model, len(example_args), _fixed_arguments(options.trace_options))
        _check_batch(example_args, {}, "example input")
        variant = _build(model, example_args, options)
        self.graph_module = variant.graph_module
        signature = _signature(example_args, {})
        self._variants: OrderedDict[tuple, _Variant] = OrderedDict([(signature, variant)])
        self._signature = signature
        self._overrides: list[tuple[list[str], Policy]] = []  # per-gate policies, in call order
        self._frames = 0
        self._fresh = True
        # with the time steps as the stream, cuts are detected between steps, by the StepLoop
        self._scene_cut = detector_from_option(options.scene_cut) if options.stream_axis == "calls" else None
        self.frames_since_refresh = 0
        self.refreshes = 0
        self._lock = threading.RLock()
        self._inference_state = torch.is_inference_mode_enabled()  # state may hold inference tensors
        self._packed_weights = PackedWeights()  # one packed copy per weight for every variant
        self._share_packed_weights(variant)
        apply_cost_profile(variant.graph_module, options.cost_profile)
        self._arm_checks(variant)
        self._warn_frozen(variant.regions.values())
        self.training = False  # the graph's own modules: see _freeze_train_mode
        _skip_in_dynamo()

    def __getstate__(self):
        for variant in self._variants.values():
            _make_picklable(variant.graph_module)
        state = self.__dict__.copy()
        state.pop("_lock", None)  # locks neither copy nor pickle: each copy gets its own
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()
        for policy in self._policies_in_use():  # a copy's policies are its own
            _POLICY_USERS[policy] = weakref.ref(self)

    # -- eval semantics, the original's attributes ------------------------------------------------
    def train(self, mode: bool = True):
        """An eventful model is always in eval mode (dropout was removed and batch norm frozen at
        transform): ``train(True)`` warns and changes nothing; ``train(False)`` / ``eval()`` are
        no-ops."""
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        if mode:
            warnings.warn(
                "EventfulModel.train() is ignored: an eventful model stays in eval mode (its stream "
                "state is inference state; dropout and batch-norm statistics were frozen at "
                "transform). Train the original model and transform it again",
                UserWarning,
                stacklevel=2,
            )
        return self

    @property
    def config(self):
        """The original model's ``config`` (Hugging Face models)."""
        try:
            return self._model_ref[0].config
        except AttributeError:
            raise AttributeError(f"the original {type(self._model_ref[0]).__name__} has no config") from None

    @property
    def device(self) -> torch.device:
        """The device of the original model's weights."""
        original = self._model_ref[0]
        found = getattr(type(original), "device", None)
        if isinstance(found, property):
            return original.device
        for tensor in (*original.parameters(), *original.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the original model's (first floating) weights."""
        original = self._model_ref[0]
        found = getattr(type(original), "dtype", None)
        if isinstance(found, property):
            return original.dtype
        for tensor in original.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.get_default_dtype()

    # -- policies are never shared between models -------------------------------------------------
    def _policies_in_use(self) -> list[Policy]:
        found = {id(self._options.policy): self._options.policy}
        found.update((id(p), p) for _, p in self._overrides)
        for variant in self._variants.values():
            found.update((id(r.gate.policy), r.gate.policy) for r in variant.regions.values())
        return [p for p in found.values() if isinstance(p, StatefulPolicy)]

    def _claim(self, policy: Policy) -> Policy:
        """``policy`` for this model: a stateful policy another live model uses is copied (same
        settings, a fresh state): its per-stream state belongs to one stream."""
        if not isinstance(policy, StatefulPolicy):
            return policy
        owner = _POLICY_USERS.get(policy)
        other = owner() if owner is not None else None
        if other is not None and other is not self and any(p is policy for p in other._policies_in_use()):
            policy = policy.fresh_copy()
        _POLICY_USERS[policy] = weakref.ref(self)
        return policy

    # -- checkpoints -----------------------------------------------------------------------------
    # ``pickle`` / ``torch.save(emodel)`` save the whole model (weights, every variant's graph and
    # stream state); a stream file (evtrace/checkpoints.py) holds only the stream of the current
    # variant, as data, for a model built the same way.
    def stream_state(self) -> dict:
        """The stream state of the current input signature as plain data (tensors cloned): what
        :meth:`save_stream` writes. Weights are not included."""
        with self._exclusive("stream_state"):
            _make_picklable(self.graph_module)  # the code as pickling leaves it: one graph hash
            return checkpoints.stream_state(self)

    def save_stream(self, path) -> None:
        """Write the stream (the state of the current input signature, no weights) to ``path``.
        A model built the same way (another process, the same weights, options, policies and
        frame size) that loads it with :meth:`load_stream` continues the stream bit for bit as
        this one would."""
        torch.save(self.stream_state(), path)

    def load_stream(self, source) -> None:
        """Restore a stream saved by :meth:`save_stream` (a path or a :meth:`stream_state`
        dict). The file is read as data (``torch.load(weights_only=True)``: it cannot run code)
        and checked as a whole before anything is written: the original model class, rewritten
        graph, input signature, transform options, every gate's policy settings and the
        scene-cut detector's, every state tensor's name, shape, dtype and finiteness. A mismatch
        raises ``ValueError`` saying what differs and nothing is loaded; this model's settings
        are never changed by a load. The weights are not checked: they must be the ones the
        stream was computed with."""
        saved = source if isinstance(source, dict) else checkpoints.read_stream_file(source)
        with self._exclusive("load_stream"):
            _make_picklable(self.graph_module)
            checkpoints.load_stream(self, saved)

    # -- inspection ----------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._options.policy

    @property
    def _variant(self) -> _Variant:
        return self._variants[self._signature]

    def regions(self) -> dict[str, SparseRegion]:
        """The sparse regions by name (module path of their first and last linear)."""
        return dict(self._variant.regions)

    def attention_modules(self) -> dict[str, nn.Module]:
        return dict(self._variant.attention)

    def report(self) -> Report:
        """What was rewritten: gates and the policy in force at each, regions, attention mode per
        site, what stayed dense and why, FLOPs per layer at the current budgets, state bytes."""
        variant = self._variant
        regions = variant.regions
        budgets = {name: counted_tokens(m.gate.policy, m.gate.tokens) for name, m in regions.items()}
        state = {name: m.state_bytes() for name, m in regions.items()}
        profile = self._options.cost_profile
        costs = build_cost_model(variant.plan, eventful=True, profile=profile).with_budgets(
            budgets, self._options.repair_rows, state
        )
        extra = {"state bytes per stream": self.state_bytes() // max(1, self._batch())}
        extra.update(
            peak_line(
                variant.plan,
                {n: m.gate.policy for n, m in regions.items()},
                self._options.repair_rows,
                profile=profile,
            )
        )
        return build_report(
            variant.plan,
            costs,
            {name: repr(m.gate.policy) for name, m in regions.items()},
            variant.seconds,
            extra,
            variant.results,
        )

    @property
    def plan(self) -> Plan:
        """The plan of the graph in use (the current input signature)."""
        return self._variant.plan

    def graph_module_for(self, *args, **kwargs) -> torch.fx.GraphModule:
        """The rewritten graph that serves inputs of these shapes and dtypes.

        Raises:
            ValueError: no variant was built for that signature (call the model on such a frame
            first), or it was evicted from the cache of ``max_variants``.
        """
        signature = _signature(self._call.positional(args, kwargs), {})
        if signature not in self._variants:
            raise ValueError(
                f"no eventful graph was built for inputs {signature} (or it was evicted: at most "
                f"max_variants={self._options.max_variants} are kept); built: {list(self._variants)}. "
                "Use a frame of the size the model was transformed with (or called on)"
            )
        return self._variants[signature].graph_module

    def variant_frontend(self) -> str:
        """The front end that traced the current graph."""
        return self._variant.plan.frontend

    def exit_buffers(self) -> dict[str, torch.Tensor]:
        """Every region exit buffer by the name of the original node it holds."""
        found = {}
        for region in self._variant.regions.values():
            for name, buffer in zip(region.exit_names, region.buffers_out(), strict=True):
                found[name] = buffer
        return found

    def _batch(self) -> int:
        """Streams per call: dim 0 of the first tensor input."""
        for entry in self._signature:
            if isinstance(entry, tuple) and entry[0]:
                return entry[0][0]
        return 1

    @staticmethod
    def _module_batch(module: nn.Module) -> int | None:
        """Batch rows of a stateful module (B, or B * frames in a video model's spatial stage)."""
        if isinstance(module, SparseRegion):
            return module.gate.batch
        state = module.m if isinstance(module, ExactDeltaAttention) else module.y
        return None if state is None else state.shape[0]

    def _rows_of(self, module: nn.Module, stream: int) -> list[int] | None:
        """The module's batch rows that belong to ``stream`` (batch-major), None if unknown."""
        rows, batch = self._module_batch(module), self._batch()
        if rows is None or rows % batch:
            return None
        per = rows // batch
        return list(range(stream * per, (stream + 1) * per))

    def state_bytes(self, per_layer: bool = False):
        """Bytes of state (all streams). ``per_layer=True``: a dict by region/attention name."""
        sizes = {name: m.state_bytes() for name, m in self._variant.regions.items()}
        for name, m in self._variant.attention.items():
            sizes[name] = m.state_bytes()
        return sizes if per_layer else sum(sizes.values())

    # -- control -------------------------------------------------------------------------------
    @contextmanager
    def _exclusive(self, what: str):
        """Hold the model for one call; a second thread gets ConcurrentCallError, never waits."""
        if not self._lock.acquire(blocking=False):
            raise ConcurrentCallError(
                f"EventfulModel is already running a frame in another thread; {what} was refused and "
                "nothing changed. One eventful model is one stream: give each thread its own "
                "evtrace.transform(...) of the model (weights are shared), or serialise the calls"
            )
        try:
            yield
        finally:
            self._lock.release()

    def set_policy(self, policy, gates: str | list[str] | None = None) -> None:
        """Change the token budget between frames; no reset needed.

        The policy (and each per-gate override, in call order) also applies to the graphs of
        other input signatures, built or cached: it follows the model, not the graph.

        Args:
            policy: a Policy or an int r (TopK(r)).
            gates: None for every gate, or region names / module paths (``"blocks.3.mlp.fc1"``
                selects the gate of the region holding that linear; a prefix such as
                ``"blocks.3"`` selects every region whose linears start with it).
        Raises:
            TypeError: ``policy`` is not a policy; ValueError: a budget outside [1, N] for a
            gate or a name that matches no gate. Nothing changes when it raises.
        Warns:
            FrozenTokensWarning: the budget is no larger than the always-updated prefix.
        """
        with self._exclusive("set_policy"):
            policy = self._claim(as_policy(policy))
            names = None if gates is None else ([gates] if isinstance(gates, str) else list(gates))
            targets = self._match_gates(names, self._variant)
            for region in targets:
                check_budget(policy, region.gate.tokens, region.name)
            for region in targets:
                region.gate.policy = policy
            if names is None:
                self._options.policy = policy
                self._overrides = []
            else:
                self._overrides.append((names, policy))
            self._warn_frozen(targets)

    def _match_gates(self, names: list[str] | None, variant: _Variant) -> list[SparseRegion]:
        regions = variant.regions
        if names is None:
            return list(regions.values())
        linears = {r.name: r.linears for r in variant.plan.regions}
        chosen = []
        for name in names:
            hits = [
                r
                for rname, r in regions.items()
                if rname == name or any(p == name or p.startswith(name + ".") for p in linears.get(rname, []))
            ]
            if not hits:
                raise ValueError(
                    f"no gate matches '{name}': give a region name or a module path of a linear "
                    f"inside one; regions: {', '.join(regions)}"
                )
            chosen.extend(h for h in hits if h not in chosen)
        return chosen

    def _policies_for(self, variant: _Variant) -> dict[str, Policy]:
        """The policy in force at every gate of ``variant``: the global one, then the overrides
        in call order (an override naming no gate of this variant is skipped)."""
        chosen = {name: self._options.policy for name in variant.regions}
        for names, policy in self._overrides:
            for name in names:
                try:
                    hits = self._match_gates([name], variant)
                except ValueError:
                    continue
                for region in hits:
                    chosen[region.name] = policy
        return chosen

    @staticmethod
    def _warn_frozen(regions) -> None:
        frozen = []
        for region in regions:
            gate = region.gate
            r = gate.policy.tokens_per_frame(gate.tokens)
            if gate.n_forced and r is not None and r <= gate.n_forced:
                frozen.append(f"'{region.name}' ({gate.policy!r}, {gate.n_forced} always updated)")
        if frozen:
            warnings.warn(
                f"the budget is no larger than the always-updated prefix (class and register tokens) at "
                f"{len(frozen)} gate(s): {', '.join(frozen[:4])}{' ...' if len(frozen) > 4 else ''}; every "
                "patch token there is frozen after the first frame. Choose a larger budget or "
                "transform(..., always_update_prefix=False)",
                FrozenTokensWarning,
                stacklevel=3,
            )

    def reset(self, stream: int | None = None) -> None:
        """All state back to "first call": the next frame is computed densely.

        ``stream=i``: stream i of the batch restarts alone. On the next frame the other streams
        run as usual (bit for bit what they would have computed without the reset) and stream i
        is computed densely (each region's dense graph runs once for the batch and only stream
        i's rows are kept; each attention site re-initialises stream i from its buffers), so it
        equals a fresh single-stream run started at that frame. ``refresh_every`` keeps
        counting for the whole batch; the scene-cut detector restarts stream i alone.
        """
        with self._exclusive("reset"):
            if stream is not None:
                batch = self._batch()
                if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < batch:
                    raise ValueError(f"stream must be an int in [0, {batch - 1}], got {stream!r}")
                if batch > 1:
                    self._reset_streams([stream])
                    return
            self._reset()

    def _share_packed_weights(self, variant: _Variant) -> None:
        for module in variant.graph_module.modules():
            if isinstance(module, (PackedLinear, PackedSiblingLinears)):
                module.share(self._packed_weights)

    def reset_packed_weights(self) -> None:
        """Drop the packed weight copies (``transform(..., pack_weights=True)``): the next frame
        packs them again from the model's weights. Needed only after writing a weight through
        ``weight.data``, which torch does not record; every other change is seen."""
        with self._exclusive("reset_packed_weights"):
            self._packed_weights.clear()

    def _reset(self, scene: bool = True) -> None:
        for module in self._variant.stateful():
            module.reset()
        self.frames_since_refresh = 0
        if scene and self._scene_cut is not None:
            self._scene_cut.reset()  # a new stream: its first changes are not compared with the old
        for policy in self._stateful_policies():
            policy.reset_state(cut=not scene)

    def _reset_streams(self, streams: list[int], scene: bool = True) -> None:
        modules = self._variant.stateful()
        plan = {id(m): [self._rows_of(m, b) for b in streams] for m in modules}
        if any(rows is None for per in plan.values() for rows in per):
            self._reset(scene)  # a module whose rows do not map onto streams: restart them all
            return
        for module in modules:
            for rows in plan[id(module)]:
                for row in rows:
                    module.reset_stream(row)
        if scene and self._scene_cut is not None:
            self._scene_cut.reset(rows=list(streams))  # the restarted stream's jump is no scene cut
        for policy in self._stateful_policies():
            policy.reset_state(list(streams), self._batch(), cut=not scene)

    @property
    def _previous(self) -> list[torch.Tensor] | None:
        """The scene-cut detector's state tensors (None without a detector or before a frame)."""
        return None if self._scene_cut is None else self._scene_cut.state_tensors()

    def _stateful_policies(self) -> list[StatefulPolicy]:
        """The distinct stateful policies (AdaptiveBudget, SteeredThreshold, Staleness) at the gates
        in use."""
        found = {}
        for region in self._variant.regions.values():
            policy = region.gate.policy
            if isinstance(policy, StatefulPolicy):
                found[id(policy)] = policy
        return list(found.values())

    def _arm_checks(self, variant: _Variant) -> None:
        _freeze_train_mode(variant.graph_module)
        for module in variant.stateful():
            module.check_finite = self._options.check_inputs
            module.checksum = None

    # -- weights -------------------------------------------------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """The original model's state dict: the (shared) weights under the original model's keys.
        The stream state is not included: it lives in non-persistent buffers."""
        return self._model_ref[0].state_dict(
            *args, destination=destination, prefix=prefix, keep_vars=keep_vars
        )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load weights under the original model's keys into the shared weights, and reset the
        stream. Checked first: a missing or unexpected key (``strict``) or a shape mismatch
        raises RuntimeError with nothing loaded (weights and stream state unchanged)."""
        expected = self._model_ref[0].state_dict(keep_vars=True)
        problems = [
            f"size mismatch for {key}: {tuple(value.shape)} given, {tuple(expected[key].shape)} expected"
            for key, value in state_dict.items()
            if key in expected and isinstance(value, torch.Tensor) and value.shape != expected[key].shape
        ]
        if strict:
            missing = [key for key in expected if key not in state_dict]
            unexpected = [key for key in state_dict if key not in expected]
            if missing:
                problems.append(f"missing keys: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                problems.append(
                    f"unexpected keys: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
                )
        if assign:
            problems.append(
                "assign=True would replace tensors that the eventful graph shares with the original "
                "model; load with assign=False"
            )
        if problems:
            raise RuntimeError(
                f"Error(s) in loading state_dict for EventfulModel (keys of the original "
                f"{type(self._model_ref[0]).__name__}): "
                + "; ".join(problems)
                + ". Nothing was loaded: the weights and the stream are unchanged"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if local_metadata.get("assign_to_params_buffers", False):
            error_msgs.append(
                "assign=True would replace tensors that the eventful graph shares with the "
                "original model; load with assign=False"
            )
            return
        own = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        result = self._model_ref[0].load_state_dict(own, strict=False)
        missing_keys.extend(prefix + key for key in result.missing_keys)
        unexpected_keys.extend(prefix + key for key in result.unexpected_keys)
        # the graph holds the original model's tensors, loaded just above: the recursion into
        # graph_module must find them under its own keys (loading each onto itself)
        for key, value in self.graph_module.state_dict(keep_vars=True).items():
            state_dict[f"{prefix}graph_module.{key}"] = value
        self.reset()  # the state was computed with the old weights

    # -- the frame -----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """One frame. The stream control (the checks, the refresh and scene-cut logic, the reset
        on an exception, no_grad) runs here in Python and is never traced: under
        ``torch.compile(emodel)`` this frame is skipped by dynamo (see ``_skip_in_dynamo``), the
        control runs in ``torch.compiler.disable``-d helpers, and only the call of the rewritten
        graph is compiled, with the caller's options (``fullgraph`` included). Keyword
        arguments of the original model's ``forward`` are mapped onto the traced inputs; one the
        traced graph cannot take raises InputMismatchError before anything changes."""
        if kwargs or len(args) != self._call.traced:
            args, kwargs = self._call.positional(args, kwargs), {}
        if (
            torch.compiler.is_compiling()
            or self._compiled_call_impl is not None
            or self._forward_hooks
            or self._forward_pre_hooks
            or _has_global_hooks()
        ):
            return super().__call__(*args, **kwargs)  # forward(), as nn.Module runs it
        _eager(EventfulModel._enter_frame)(self, args, kwargs)
        grad = torch.is_grad_enabled()
        try:
            torch._C._set_grad_enabled(False)
            try:
                out = self.graph_module(*args, **kwargs)  # the compiled region under torch.compile
            finally:
                torch._C._set_grad_enabled(grad)
            _eager(EventfulModel._leave_frame)(self, out)
        except BaseException as error:
            _eager(EventfulModel._abort_frame)(self, error)
            raise
        return out

    def _enter_frame(self, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_exporting():
            raise EventfulExportError(_EXPORT_MESSAGE)
        if not self._lock.acquire(blocking=False):
            with self._exclusive("this frame"):  # raises ConcurrentCallError
                pass
        try:
            with torch.no_grad():
                self._before_frame(args, kwargs)
        except BaseException:
            self._lock.release()
            raise

    def _leave_frame(self, out) -> None:
        if self._options.check_inputs:
            with torch.no_grad():
                self._after_frame(out)  # NonFiniteStateError: the poisoned streams were reset
        self.frames_since_refresh += 1
        self._lock.release()

    def _abort_frame(self, error: BaseException) -> None:
        try:
            if not isinstance(error, NonFiniteStateError):
                self._reset()  # KeyboardInterrupt too: a half-updated state must never be read
        finally:
            if self._lock._is_owned():
                self._lock.release()

    def forward(self, *args, **kwargs):
        if torch.compiler.is_exporting():
            raise EventfulExportError(_EXPORT_MESSAGE)
        if kwargs or len(args) != self._call.traced:
            args, kwargs = self._call.positional(args, kwargs), {}
        if torch.compiler.is_compiling():
            return self._run(args, kwargs)
        with self._exclusive("this frame"), torch.no_grad():
            self._before_frame(args, kwargs)
            try:
                out = self._run(args, kwargs)
                if self._options.check_inputs:
                    self._after_frame(out)
            except NonFiniteStateError:
                raise  # the poisoned streams were reset, the others kept the frame
            except BaseException:  # KeyboardInterrupt too: a half-updated state must never be read
                self._reset()
                raise
            self.frames_since_refresh += 1
            return out

    def _run(self, args, kwargs):
        return self.graph_module(*args, **kwargs)

    def _before_frame(self, args: tuple, kwargs: dict) -> None:
        tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
        if self._options.check_inputs:
            for i, t in enumerate(tensors):
                if t.is_floating_point() and not all_finite(t):
                    raise NonFiniteInputError(
                        f"input {i} holds NaN or Inf values; the frame was rejected and the stream state is "
                        "unchanged (clean the frame or skip it)"
                    )
        signature = _signature(args, kwargs)
        if signature != self._signature:
            _check_batch(args, kwargs, "input")
            if self._options.on_input_change == "raise":
                raise InputMismatchError(
                    f"input signature {signature} differs from the one the state was built for "
                    f"{self._signature}; the state is unchanged. Pass on_input_change='reset' to transform() "
                    "to start a new stream instead, or feed frames of the original size"
                )
            self._check_signature(args, kwargs)
            self._switch(args, kwargs, signature)
        else:
            self._variants.move_to_end(signature)
        self._check_budgets()
        if torch.is_inference_mode_enabled():
            self._inference_state = True
        elif self._inference_state:
            self._thaw()
        options = self._options
        if options.refresh_every is not None and self.frames_since_refresh >= options.refresh_every:
            self._refresh()
        if self._scene_cut is not None and tensors:
            self._detect_scene_cut(tensors)
        for policy in self._stateful_policies():
            policy.start_frame()  # their per-gate state is kept by call order within a frame

    def _check_signature(self, args: tuple, kwargs: dict) -> None:
        """Before any re-trace: a batch of 0, another rank or another dtype than the traced
        frames is the caller's mistake, not a new stream."""
        values = list(args) + list(kwargs.values())
        for i, (value, traced) in enumerate(zip(values, self._signature, strict=True)):
            if not isinstance(value, torch.Tensor) or not isinstance(traced, tuple):
                continue
            shape, dtype = traced
            given = tuple(value.shape)
            if len(given) != len(shape):
                raise InputMismatchError(
                    f"input {i} has {len(given)} dims (shape {given}), the model was traced with "
                    f"{len(shape)} (shape {shape}); the state is unchanged. Feed frames of that rank "
                    "(a batch of streams on dim 0, e.g. x.unsqueeze(0) for one frame)"
                )
            if value.dtype != dtype:
                raise InputMismatchError(
                    f"input {i} has dtype {value.dtype}, the model was traced with {dtype}; the state is "
                    f"unchanged. Convert the frame (x.to({dtype})) or transform a model of that dtype"
                )

    def _check_budgets(self) -> None:
        """A policy object changed in place (``policy.r = 40``) is checked before the frame runs."""
        for region in self._variant.regions.values():
            check_budget(region.gate.policy, region.gate.tokens, region.name)

    def _after_frame(self, out) -> None:
        """Per stateful module, one sum per stream over what the frame wrote into its state (the
        gathered references and buffer rows, the attention output), one over each output, then
        one host sync: the streams whose sum is NaN or Inf are reset."""
        batch = self._batch()
        sums = []
        for module in self._variant.stateful():
            checksum = module.checksum
            if checksum is None:
                continue
            module.checksum = None
            if checksum.shape[0] % batch == 0:
                sums.append(checksum.reshape(batch, -1).sum(dim=1))
            else:
                sums.append(checksum.sum().expand(batch))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                acc = torch.float64 if leaf.dtype == torch.float64 else torch.float32
                if leaf.dim() >= 2 and leaf.shape[0] == batch:
                    sums.append(leaf.sum(dim=tuple(range(1, leaf.dim())), dtype=acc))
                else:
                    sums.append(leaf.sum(dtype=acc).expand(batch))
        if not sums:
            return
        ok = torch.isfinite(torch.stack([t.to(sums[0].device, torch.float64) for t in sums]).sum(dim=0))
        if bool(ok.all()):  # the host sync
            return
        bad = [b for b, fine in enumerate(ok.tolist()) if not fine]
        if len(bad) == batch:
            self._reset()
            where = "the stream was reset" if batch == 1 else "every stream was reset"
        else:
            self._reset_streams(bad)
            where = (
                f"stream(s) {bad} were reset; the other streams took the frame (their outputs are in "
                "this error's .output)"
            )
        raise NonFiniteStateError(
            f"the frame produced NaN or Inf values inside the model in stream(s) {bad} although the input "
            f"is finite (a value too large for {self._signature_dtype()} arithmetic?); the frame was refused "
            f"and {where}: the next frame is computed densely. Scale or clip the input",
            streams=bad,
            output=out,
        )

    def _signature_dtype(self):
        for entry in self._signature:
            if isinstance(entry, tuple):
                return entry[1]
        return "its dtype"

    def _thaw(self) -> None:
        """State made under ``torch.inference_mode()`` holds inference tensors, which cannot be
        updated in place outside it: clone them into normal tensors (the stream goes on)."""
        for variant in self._variants.values():
            for module in variant.graph_module.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None and buffer.is_inference():
                        module._buffers[name] = buffer.clone()
                module.__dict__.pop("_scratch_tensor", None)
                if isinstance(module.__dict__.get("checksum"), torch.Tensor):
                    module.checksum = None
        self._inference_state = False

    def _switch(self, args, kwargs, signature) -> None:
        variants = self._variants
        if signature in variants:
            variant = variants[signature]
        else:
            self._check_clip_length(signature)
            variant = _build(self._model_ref[0], tuple(args), self._options)
            self._share_packed_weights(variant)
            apply_cost_profile(variant.graph_module, self._options.cost_profile)
            self._arm_checks(variant)
        policies = self._policies_for(variant)
        for name, region in variant.regions.items():
            check_budget(policies[name], region.gate.tokens, name)
        for name, region in variant.regions.items():
            region.gate.policy = policies[name]
        variants[signature] = variant
        variants.move_to_end(signature)
        while len(variants) > self._options.max_variants:
            variants.popitem(last=False)  # the least recently used graph and its state
        self.graph_module = variant.graph_module
        self._signature = signature
        if torch.is_inference_mode_enabled():
            self._inference_state = True
        self._reset()

    def _check_clip_length(self, signature: tuple) -> None:
        """With the time steps as the stream, only the number of views may change between calls:
        a clip of another length (or size) would cut the per-step sub-model differently."""
        if self._options.stream_axis == "calls":
            return
        built = next(iter(self._variants))
        for index, (new, old) in enumerate(zip(signature, built, strict=True)):
            if isinstance(new, tuple) and isinstance(old, tuple) and new[0][1:] != old[0][1:]:
                raise InputMismatchError(
                    f"input {index} has shape {new[0]}; this eventful model runs the time steps of clips "
                    f"of shape (views, {', '.join(map(str, old[0][1:]))}) (stream_axis="
                    f"{self._options.stream_axis!r}): give clips of that length and size (any number of "
                    "views), or transform the model again for the new clip shape"
                )

    def _refresh(self) -> None:
        self._reset(scene=False)  # the detector goes on: it already compares against this frame
        self.refreshes += 1

    def _detect_scene_cut(self, tensors: list[torch.Tensor]) -> None:
        """Per stream, the input frame against that stream's recent changes
        (:class:`evtrace.runtime.scene_cut.SceneCutDetector`), before anything is computed, so a
        cut frame is itself computed densely. Only the streams that cut restart."""
        frame = next((t for t in tensors if t.is_floating_point() and t.dim() >= 2), None)
        if frame is None:
            return
        cut = self._scene_cut.update(frame)
        if not bool(cut.any()):  # one host sync
            return
        batch = self._batch()
        streams = cut.nonzero().flatten().tolist()
        if batch == 1 or cut.shape[0] != batch or len(streams) == batch:
            self._refresh()
        else:
            self._reset_streams(streams, scene=False)
            self.refreshes += 1


def transform(
    model: nn.Module,
    example_inputs,
    policy=None,
    attention: str = "exact",
    *,
    frontend: str = "auto",
    always_update_prefix: bool = True,
    repair_rows: int = 8,
    refresh_every: int | None = None,
    scene_cut: float | bool | SceneCutDetector | None = True,
    on_input_change: str = "reset",
    check_inputs: bool = True,
    copy_weights: bool = False,
    max_variants: int = 8,
    stream_axis: str = "calls",
    pack_weights: bool = True,
    cost_profile: CostProfile | str | None = None,
    strict: bool = False,
    **trace_options,
) -> EventfulModel:
    """Rewrite ``model`` into an eventful model that recomputes only the tokens that changed.

    Args:
        model: a vision Transformer in eval mode (weights are shared, not copied: changing
            them in place changes the eventful model too).
        example_inputs: a frame (tensor or tuple) of the size and batch the stream will have;
            a batch holds independent streams. A dict of keyword arguments of ``forward``
            (``{"pixel_values": x}``) works too: its tensors must be its leading parameters.
        policy: which tokens each gate recomputes per frame: a Policy from
            :mod:`evtrace.runtime.policies` or an int r (``TopK(r)``). Default
            ``SteeredThreshold(0.5)``: every gate updates the tokens whose relative error is
            above the stream's threshold, steered so that half the tokens per gate are spent on
            average (more on frames that change more, up to every token; the best policy on the
            hard-video harness at equal average FLOPs, docs/fidelity_hard.md; priced as
            ``TopFraction(0.5)``). For ``evtrace.deploy`` exports choose a static policy
            (``TopFraction(0.5)``, ``TopK``).
        attention: ``"exact"`` or ``AttentionMode.EXACT`` (delta attention equal to dense
            attention on the buffered
            q, k, v), ``"paper"`` (the paper's delta Q K^T and column-refresh A V, an
            approximation) or ``"dense"`` (attention recomputed on the buffered q, k, v).
        always_update_prefix: class and register tokens are updated every frame.
        repair_rows: exact attention's per-frame budget of rows recomputed against
            cancellation (peaky attention).
        refresh_every: recompute everything densely every K frames.
        scene_cut: refresh a stream densely at a scene cut, detected on the input frame before the
            model runs (so the cut frame itself is dense): ``True`` (default) the default
            :class:`~evtrace.runtime.scene_cut.SceneCutDetector` (coarse-picture correlation
            over the textured cells, against the median of the stream's recent changes: fades,
            flashes, pans and fast motion do not fire it), a factor > 1 (the detector with that
            many times the median as its threshold; default 4), a ``SceneCutDetector`` (its
            settings; copied), or ``None`` / ``False`` for no detection. In a batch only the
            streams that cut restart.
        on_input_change: ``"reset"`` (a frame of a new shape or dtype starts a new stream,
            transforming again for it) or ``"raise"``.
        check_inputs: eager checks per frame: reject NaN/Inf frames, budgets and input rank/dtype
            before any state changes; after the frame, reset the streams whose state or output
            turned non-finite (``NonFiniteStateError``). Costs one isfinite reduction over each
            input, one sum per stream over each stateful module's writes and over the outputs,
            and two host syncs.
        max_variants: graphs (and their state) kept for distinct input signatures, least
            recently used dropped first.
        copy_weights: rewrite a deep copy of ``model``: the eventful model then owns its weights.
        stream_axis: what the stream is. ``"calls"`` (default): successive calls (frames of a
            video). ``"steps"``: the time steps inside each call, for factorised video models
            that fold T' time steps of each view into the batch (ViViT's factorised encoder, a
            per-frame encoder before a temporal model): the sub-model that runs per time step
            (found by the analysis; ``evtrace.inspect`` reports it, or why there is none) runs
            step 0, 1, ..., T'-1 in order, each recomputing only the tokens that changed since
            the previous step, and starts afresh at each call; the rest (the temporal model)
            runs densely. ``"steps+calls"``: the same, with the state carried from the last step
            of a call to the first of the next (sliding clips). A model without such a
            sub-model raises ``ValueError`` with the reason.
        pack_weights: the linears on gathered rows keep a copy of their fp32 weight packed for
            oneDNN, made on first use (CPU fp32 only; elsewhere, and under torch.compile, export
            and FLOP counting, they are plain linears): 1.1x to 1.4x faster GEMMs at the row
            counts of a sparse frame, for one more copy of those weights in memory. A weight
            changed in place is packed again on the next call (its version counter moves),
            except through ``weight.data``: call ``reset_packed_weights()`` after such a write.
        strict: raise :class:`~evtrace.graph.errors.RewriteError` where a region or attention
            site cannot be rewritten, or its rewrite fails or disagrees with the dense computation
            on the build's check with partial frames (two synthetic steady frames on the example,
            part of the tokens selected). By default such a region or site is kept dense (exact),
            with the reason in the report and a :class:`~evtrace.graph.errors.KeptDenseWarning`.
        cost_profile: the device constants of the runtime's static cost choices (exact delta
            attention against fused attention, the row counts where packed linears pay): a
            :class:`~evtrace.runtime.cost_profile.CostProfile`, the path of a saved one, or None
            for the shipped default (fitted on a 2-core x86 CPU). ``evtrace.calibrate(model,
            frame)`` measures one on this device. Changes speed and FLOP counts, not outputs.
        **trace_options: ``leaf_modules``, ``concrete_args`` (non-tensor arguments fixed for
            both front ends: ``{"return_dict": False}``), ``static_inputs`` (tensor arguments
            fixed to the example's value, such as a VLM vision tower's ``{"grid_thw": grid}``:
            shapes computed from them become the example's); see :func:`evtrace.trace`. Calls
            may give a fixed argument at its fixed value; another value is refused before any
            state changes.

    Returns:
        An :class:`EventfulModel` with the original call signature.
    """
    options = TransformOptions(
        policy=as_policy(policy) if policy is not None else SteeredThreshold(0.5),
        attention=attention,
        frontend=frontend,
        always_update_prefix=always_update_prefix,
        repair_rows=repair_rows,
        refresh_every=refresh_every,
        scene_cut=scene_cut,
        on_input_change=on_input_change,
        check_inputs=check_inputs,
        max_variants=max_variants,
        stream_axis=stream_axis,
        pack_weights=pack_weights,
        cost_profile=as_profile(cost_profile),
        strict=strict,
        trace_options=trace_options,
    )
    _check_options(options)
    if model.training:
        raise ValueError(
            "model is in training mode: call model.eval() first (eventful models are for inference)"
        )
    if not isinstance(copy_weights, bool):
        raise TypeError(f"copy_weights must be a bool, got {type(copy_weights).__name__} {copy_weights!r}")
    target = copy.deepcopy(model) if copy_weights else model
    if isinstance(example_inputs, dict):
        example_args = _CallSignature(target, 0, _fixed_arguments(trace_options)).example_args(example_inputs)
    else:
        example_args = as_args(example_inputs)
    emodel = EventfulModel(target, example_args, options)
    warn_if_unprofitable(emodel.plan, options.policy)
    return emodel
