"""``evtrace.transform``: build an eventful model, and the stateful module it returns."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from evtrace.cost.model import build_cost_model
from evtrace.graph.errors import InputMismatchError, NonFiniteInputError
from evtrace.graph.plan import AttentionMode, Plan
from evtrace.graph.tracer import as_args
from evtrace.report import Report, build_report
from evtrace.runtime.attention import ExactDeltaAttention, PaperDeltaAttention
from evtrace.runtime.gates import SparseRegion
from evtrace.runtime.policies import Policy, TopFraction, as_policy, check_budget, counted_tokens
from passes.context import PassOptions
from passes.pipeline import PIPELINE, analyze

INPUT_CHANGE = ("reset", "raise")


@dataclass
class TransformOptions:
    policy: Policy
    attention: AttentionMode = AttentionMode.EXACT
    frontend: str = "auto"
    always_update_prefix: bool = True
    repair_rows: int = 8
    refresh_every: int | None = None
    scene_cut: float | None = None
    on_input_change: str = "reset"
    check_inputs: bool = True
    trace_options: dict = field(default_factory=dict)


@dataclass
class _Variant:
    """The rewritten graph for one input signature (shapes and dtypes), and its plan."""

    graph_module: torch.fx.GraphModule
    plan: Plan
    seconds: dict[str, float]


def _check_options(options: TransformOptions) -> None:
    options.attention = AttentionMode.parse(options.attention)
    if options.on_input_change not in INPUT_CHANGE:
        raise ValueError(f"on_input_change must be one of {INPUT_CHANGE}, got {options.on_input_change!r}")
    refresh = options.refresh_every
    if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1):
        raise ValueError(f"refresh_every must be an int >= 1 or None, got {refresh!r}")
    if options.scene_cut is not None and not (
        isinstance(options.scene_cut, (int, float)) and options.scene_cut > 1
    ):
        raise ValueError(
            f"scene_cut must be a factor > 1 (how many times the usual frame change is a cut) "
            f"or None, got {options.scene_cut!r}"
        )
    if (
        isinstance(options.repair_rows, bool)
        or not isinstance(options.repair_rows, int)
        or options.repair_rows < 0
    ):
        raise ValueError(f"repair_rows must be an int >= 0, got {options.repair_rows!r}")


def _build(model: nn.Module, args: tuple, options: TransformOptions) -> _Variant:
    """Trace ``model`` and run the whole pass pipeline on it."""
    pass_options = PassOptions(
        attention=options.attention,
        policy=options.policy,
        repair_rows=options.repair_rows,
        always_update_prefix=options.always_update_prefix,
    )
    ctx = analyze(
        model, args, frontend=options.frontend, options=pass_options, passes=PIPELINE, **options.trace_options
    )
    return _Variant(ctx.gm, ctx.plan, dict(ctx.seconds))


def _signature(args: tuple, kwargs: dict) -> tuple:
    flat = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            flat.append((tuple(value.shape), value.dtype))
        else:
            flat.append(repr(value))
    return tuple(flat)


class EventfulModel(nn.Module):
    """A vision Transformer that recomputes, frame after frame, only the tokens that changed.

    Built by :func:`evtrace.transform`; call it like the original model, one frame (or one
    batch of independent streams) at a time. The first call after :meth:`reset` computes
    densely and fills the state; later calls run each gated region on the tokens its policy
    selects and update attention with delta updates.

    State lives in non-persistent buffers of the inserted modules (``evtrace_region_*``:
    gate references and exit buffers; ``evtrace_attention_*``: attention state); weights are
    the original model's, shared, not copied (unless ``transform(..., copy_weights=True)``).

    ``state_dict()`` is the original model's: its keys, its weights, no stream state. It loads
    into the original model, into any transform of a model of that architecture, and back;
    ``load_state_dict`` writes into the shared weights (so the original model sees them too)
    and resets the stream. A frame that raises midway (a failing user hook, an interrupt)
    resets the stream before the exception propagates: the next frame is a dense first frame.
    """

    def __init__(self, model: nn.Module, example_args: tuple, options: TransformOptions):
        super().__init__()
        self._options = options
        self._model_ref = [model]  # not a submodule: its weights are reached through the graph
        variant = _build(model, example_args, options)
        self.graph_module = variant.graph_module
        self._variants = {_signature(example_args, {}): variant}
        self._signature = _signature(example_args, {})
        self._frames = 0
        self._fresh = True
        self._change_ema: torch.Tensor | None = None
        self._previous: list[torch.Tensor] | None = None
        self.frames_since_refresh = 0
        self.refreshes = 0

    # -- inspection ----------------------------------------------------------------------------
    @property
    def policy(self) -> Policy:
        return self._options.policy

    def regions(self) -> dict[str, SparseRegion]:
        """The sparse regions by name (module path of their first and last linear)."""
        return {m.name: m for m in self.graph_module.modules() if isinstance(m, SparseRegion)}

    def attention_modules(self) -> dict[str, nn.Module]:
        return {
            name: m
            for name, m in self.graph_module.named_children()
            if isinstance(m, (ExactDeltaAttention, PaperDeltaAttention))
        }

    def report(self) -> Report:
        """What was rewritten: gates and the policy in force at each, regions, attention mode per
        site, what stayed dense and why, FLOPs per layer at the current budgets, state bytes."""
        variant = self._variants[self._signature]
        regions = self.regions()
        budgets = {name: counted_tokens(m.gate.policy, m.gate.tokens) for name, m in regions.items()}
        state = {name: m.state_bytes() for name, m in regions.items()}
        costs = build_cost_model(variant.plan, eventful=True).with_budgets(
            budgets, self._options.repair_rows, state
        )
        extra = {"state bytes per stream": self.state_bytes() // max(1, self._batch())}
        return build_report(
            variant.plan,
            costs,
            {name: repr(m.gate.policy) for name, m in regions.items()},
            variant.seconds,
            extra,
        )

    @property
    def plan(self) -> Plan:
        """The plan of the graph in use (the current input signature)."""
        return self._variants[self._signature].plan

    def graph_module_for(self, *args, **kwargs) -> torch.fx.GraphModule:
        """The rewritten graph that serves inputs of these shapes and dtypes.

        Raises:
            ValueError: no variant was built for that signature (call the model on such a frame first).
        """
        signature = _signature(args, kwargs)
        if signature not in self._variants:
            raise ValueError(
                f"no eventful graph was built for inputs {signature}; built: {list(self._variants)}. "
                "Use a frame of the size the model was transformed with (or called on)"
            )
        return self._variants[signature].graph_module

    def variant_frontend(self) -> str:
        """The front end that traced the current graph."""
        return self._variants[self._signature].plan.frontend

    def exit_buffers(self) -> dict[str, torch.Tensor]:
        """Every region exit buffer by the name of the original node it holds."""
        found = {}
        for region in self.regions().values():
            for name, buffer in zip(region.exit_names, region.buffers_out()):
                found[name] = buffer
        return found

    def _batch(self) -> int:
        regions = list(self.regions().values())
        return regions[0].gate.batch if regions else 1

    def state_bytes(self, per_layer: bool = False):
        """Bytes of state (all streams). ``per_layer=True``: a dict by region/attention name."""
        sizes = {name: m.state_bytes() for name, m in self.regions().items()}
        for name, m in self.attention_modules().items():
            sizes[name] = m.state_bytes()
        return sizes if per_layer else sum(sizes.values())

    # -- control -------------------------------------------------------------------------------
    def set_policy(self, policy, gates: str | list[str] | None = None) -> None:
        """Change the token budget between frames; no reset needed.

        Args:
            policy: a Policy or an int r (TopK(r)).
            gates: None for every gate, or region names / module paths (``"blocks.3.mlp.fc1"``
                selects the gate of the region holding that linear; a prefix such as
                ``"blocks.3"`` selects every region whose linears start with it).
        Raises:
            TypeError: ``policy`` is not a policy; ValueError: a budget outside [1, N] for a
            gate or a name that matches no gate. Nothing changes when it raises.
        """
        policy = as_policy(policy)
        targets = self._match_gates(gates)
        for region in targets:
            check_budget(policy, region.gate.tokens, region.name)
        for region in targets:
            region.gate.policy = policy
        if gates is None:
            self._options.policy = policy

    def _match_gates(self, gates) -> list[SparseRegion]:
        regions = self.regions()
        if gates is None:
            return list(regions.values())
        names = [gates] if isinstance(gates, str) else list(gates)
        linears = {r.name: r.linears for r in self.plan.regions}
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

    def reset(self, stream: int | None = None) -> None:
        """All state back to "first call". ``stream=i``: stream i restarts; the next frame is then
        computed densely for the whole batch (exact for every stream)."""
        if stream is not None:
            batch = self._batch()
            if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < batch:
                raise ValueError(f"stream must be an int in [0, {batch - 1}], got {stream!r}")
        for region in self.regions().values():
            region.fresh = True
        for module in self.attention_modules().values():
            module.reset()
        self.frames_since_refresh = 0
        self._previous = None

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
    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self._run(args, kwargs)
        with torch.no_grad():
            self._before_frame(args, kwargs)
            try:
                out = self._run(args, kwargs)
            except BaseException:  # KeyboardInterrupt too: a half-updated state must never be read
                self.reset()
                raise
            self.frames_since_refresh += 1
            return out

    def _run(self, args, kwargs):
        return self.graph_module(*args, **kwargs)

    def _before_frame(self, args: tuple, kwargs: dict) -> None:
        tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
        if self._options.check_inputs:
            for i, t in enumerate(tensors):
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteInputError(
                        f"input {i} holds NaN or Inf values; the frame was rejected and the stream state is "
                        "unchanged (clean the frame or skip it)"
                    )
        signature = _signature(args, kwargs)
        if signature != self._signature:
            if self._options.on_input_change == "raise":
                raise InputMismatchError(
                    f"input signature {signature} differs from the one the state was built for "
                    f"{self._signature}; the state is unchanged. Pass on_input_change='reset' to transform() "
                    "to start a new stream instead, or feed frames of the original size"
                )
            self._switch(args, kwargs, signature)
        options = self._options
        if options.refresh_every is not None and self.frames_since_refresh >= options.refresh_every:
            self._refresh()
        if options.scene_cut is not None and tensors:
            self._detect_scene_cut(tensors)

    def _switch(self, args, kwargs, signature) -> None:
        if signature not in self._variants:
            self._variants[signature] = _build(self._model_ref[0], tuple(args), self._options)
            for region in self._variants[signature].graph_module.modules():
                if isinstance(region, SparseRegion):
                    region.gate.policy = self._options.policy
        self.graph_module = self._variants[signature].graph_module
        self._signature = signature
        self.reset()

    def _refresh(self) -> None:
        self.reset()
        self.refreshes += 1

    def _detect_scene_cut(self, tensors: list[torch.Tensor]) -> None:
        """Input-level change energy against its running mean: the first gate's error, read
        before anything is computed, so a cut frame is itself computed densely."""
        if self._previous is None:
            self._previous = [t.detach().clone() for t in tensors]
            return
        change = sum(float((t - p).square().mean()) for t, p in zip(tensors, self._previous))
        for p, t in zip(self._previous, tensors):
            p.copy_(t)
        ema = self._change_ema
        if ema is not None and change > self._options.scene_cut * max(ema, 1e-12):
            self._refresh()
            self._previous = [t.detach().clone() for t in tensors]
            self._change_ema = None
            return
        self._change_ema = change if ema is None else 0.9 * ema + 0.1 * change


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
    scene_cut: float | None = None,
    on_input_change: str = "reset",
    check_inputs: bool = True,
    copy_weights: bool = False,
    **trace_options,
) -> EventfulModel:
    """Rewrite ``model`` into an eventful model that recomputes only the tokens that changed.

    Args:
        model: a vision Transformer in eval mode (weights are shared, not copied: changing
            them in place changes the eventful model too).
        example_inputs: a frame (tensor or tuple) of the size and batch the stream will have;
            a batch holds independent streams.
        policy: which tokens each gate recomputes per frame: a Policy from
            :mod:`evtrace.runtime.policies` or an int r (``TopK(r)``). Default ``TopFraction(0.5)``.
        attention: ``"exact"`` or ``AttentionMode.EXACT`` (delta attention equal to dense
            attention on the buffered
            q, k, v), ``"paper"`` (the paper's delta Q K^T and column-refresh A V, an
            approximation) or ``"dense"`` (attention recomputed on the buffered q, k, v).
        always_update_prefix: class and register tokens are updated every frame.
        repair_rows: exact attention's per-frame budget of rows recomputed against
            cancellation (peaky attention).
        refresh_every: recompute everything densely every K frames.
        scene_cut: refresh when a frame changes this many times more than the running mean.
        on_input_change: ``"reset"`` (a frame of a new shape or dtype starts a new stream,
            transforming again for it) or ``"raise"``.
        check_inputs: reject NaN/Inf frames before any state changes (eager only).
        copy_weights: rewrite a deep copy of ``model``: the eventful model then owns its weights.
        **trace_options: ``leaf_modules``, ``concrete_args`` (see :func:`evtrace.trace`).

    Returns:
        An :class:`EventfulModel` with the original call signature.
    """
    options = TransformOptions(
        policy=as_policy(policy) if policy is not None else TopFraction(0.5),
        attention=attention,
        frontend=frontend,
        always_update_prefix=always_update_prefix,
        repair_rows=repair_rows,
        refresh_every=refresh_every,
        scene_cut=scene_cut,
        on_input_change=on_input_change,
        check_inputs=check_inputs,
        trace_options=trace_options,
    )
    _check_options(options)
    if model.training:
        raise ValueError(
            "model is in training mode: call model.eval() first (eventful models are for inference)"
        )
    if not isinstance(copy_weights, bool):
        raise TypeError(f"copy_weights must be a bool, got {type(copy_weights).__name__} {copy_weights!r}")
    return EventfulModel(copy.deepcopy(model) if copy_weights else model, as_args(example_inputs), options)
