"""``evtrace.count_flops``: FLOPs per frame of an original or an eventful model, in two conventions.

Conventions, both per frame:

``"paper"``
    The Eventful Transformers paper's: one multiply-accumulate = one FLOP. Counted: linears
    (tokens x in x out) and their bias adds, matmuls, einsums, attention products (also inside
    ``scaled_dot_product_attention``, with its mask add), floating-point elementwise adds and
    subtractions (residuals, position embeddings, logit terms, the gates' ``c - p``, the delta
    attention accumulator updates). Not counted: multiplications and divisions, LayerNorm,
    softmax, activations, reductions and norms, top-k, gathers and scatters, integer index
    arithmetic, convolutions (the patch embedding; detection heads are outside the backbone:
    count the backbone). Counted at the ATen level on meta tensors: no arithmetic runs, so
    full-size models cost milliseconds per op.
``"fvcore"``
    What fvcore 0.1.5's ``FlopCountAnalysis`` reports (MACs of matmul-like ops, its norm and
    pooling estimates), with :mod:`evtrace.cost.fvcore_handles` registered for every op it would
    otherwise skip (``scaled_dot_product_attention``, the gates' ops, delta attention's ops).
    Runs a real forward pass under ``torch.jit.trace``: use it on models that run quickly.

Every op is counted. An op that no rule of the convention covers gets the generic element-wise
rule: one FLOP per element of its output. Such ops are listed, with what they were counted at, in
the result's ``generic_ops``, never counted as a silent zero. :func:`register_flop_rule` adds a
rule (or replaces one) for an op in either convention or both.

Convolutions are free in the paper convention: on a model whose convolutions (a conv stem, a
neck, a hybrid's CNN) are more than ``LEFT_OUT_WARNING`` (10 %) of its FLOPs, the paper count
leaves much of the model out, and ratios in it overstate the savings of the whole model. The
count then says so (``FlopCount.left_out``, ``left_out_share``, its ``str``) and warns with
:class:`PaperConventionWarning`.

Eventful models: ``first_frame`` is the call after a reset (everything computed densely, state
filled); ``steady`` is every later call, where each gate recomputes r tokens per stream:
``TopK(r)``: r; ``TopFraction(f)``: ``ceil(f N)`` (as the policy rounds it); ``FixedCapacityThreshold``:
its capacity (the worst case: padding slots are computed too); ``Threshold``: N (the worst case,
every token above tau); ``All``: N; ``AdaptiveBudget``: ``ceil(target N)``, its steady-state
average (the steady figure is average FLOPs per frame; its peak, ``ceil(peak N)``, is the
latency figure: ``policy.peak_tokens_per_frame(N)``, and the report shows both);
``Staleness(p, k)``: p's count plus ``ceil(N / k)`` (at most N / k tokens come due per frame on
average). Counting works on a copy: the model's state is never touched.

Eventful models whose stream is the time steps inside a call (``stream_axis="steps"``) are
counted per call: the per-step sub-model's ops of every time step (the first step dense, the
others at the policy) plus the dense ops outside it; per layer under the sub-model's own names.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from evtrace.eventful import EventfulModel
from evtrace.graph.errors import where
from evtrace.graph.meta import module_path, region_of, site_of
from evtrace.graph.tracer import as_args, trace
from evtrace.runtime.attention import ExactDeltaAttention, PaperDeltaAttention
from evtrace.runtime.gates import SparseRegion
from evtrace.runtime.policies import Policy, as_policy, counted_tokens, static_for_counting
from evtrace.runtime.steps import StepLoop

CONVENTIONS = ("paper", "fvcore")
LEFT_OUT_WARNING = 0.10  # share of the model's FLOPs the paper convention may leave out quietly

aten = torch.ops.aten


class PaperConventionWarning(UserWarning):
    """The paper convention leaves out more than 10 % of the model's FLOPs (its convolutions, as
    fvcore counts them): ratios in it overstate the savings of the whole model."""


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per frame (per call, all streams of the batch together).

    ``per_layer`` holds the steady-state FLOPs by module path (original models: the innermost
    module that ran the op; ``""`` for ops of the root) or, in an eventful model, by region name
    (gates, token-wise ops), attention site name, or module path for ops outside both.
    ``sum(per_layer.values()) == steady``.
    """

    convention: str
    first_frame: int
    steady: int
    per_layer: dict[str, int]
    first_frame_per_layer: dict[str, int] = field(default_factory=dict)
    tokens_per_gate: dict[str, int] = field(default_factory=dict)  # r per gate in the steady state
    #: ops no rule of the convention covers, counted by the generic element-wise rule (one FLOP
    #: per output element): qualified op name -> FLOPs in the steady state
    generic_ops: dict[str, int] = field(default_factory=dict)
    #: paper convention: the FLOPs it leaves out (convolutions, as fvcore counts their MACs) in the
    #: steady state, in total and by layer
    left_out: int = 0
    left_out_per_layer: dict[str, int] = field(default_factory=dict)
    #: eventful models: gates whose budget is no larger than their always-updated prefix (class
    #: and register tokens): the steady figure is what runs there, the prefix rows alone, and
    #: every patch token is frozen after the first frame
    frozen_gates: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.steady

    @property
    def left_out_share(self) -> float:
        """The share of the model's FLOPs (counted + left out) that this count leaves out."""
        whole = self.steady + self.left_out
        return self.left_out / whole if whole else 0.0

    @property
    def gflops(self) -> float:
        return self.steady / 1e9

    def __str__(self) -> str:
        head = f"{self.convention} convention: {self.steady / 1e9:.3f} GFLOPs per frame"
        if self.first_frame != self.steady:
            head += f" (steady state; first frame {self.first_frame / 1e9:.3f})"
        rows = sorted(self.per_layer.items(), key=lambda kv: -kv[1])
        width = max([len(k or "(root)") for k, _ in rows] + [5])
        lines = [head] + [f"  {(k or '(root)').ljust(width)}  {v / 1e9:10.4f} G" for k, v in rows if v]
        if self.generic_ops:
            ops = ", ".join(f"{k} ({v})" for k, v in sorted(self.generic_ops.items()))
            lines.append(f"counted by the generic rule (one FLOP per output element): {ops}")
        if self.left_out_share > LEFT_OUT_WARNING:
            lines.append(self.left_out_text())
        if self.frozen_gates:
            lines.append(
                f"{len(self.frozen_gates)} gate(s) with a budget no larger than the always-updated prefix: "
                "the steady state computes the prefix rows alone there and every patch token is frozen"
            )
        return "\n".join(lines)

    def left_out_text(self) -> str:
        top = sorted(self.left_out_per_layer.items(), key=lambda kv: -kv[1])[:3]
        where = ", ".join(f"{k or '(root)'} {_human(v)}" for k, v in top)
        return (
            f"the paper convention leaves out {100 * self.left_out_share:.0f} % of this model's FLOPs: "
            f"convolutions ({_human(self.left_out)} per frame; {where}), which run densely "
            "every frame; ratios in this convention overstate the savings of the whole model: count "
            "with convention='fvcore' too"
        )


def _human(flops: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}FLOPs"
    return f"{flops} FLOPs"


# --------------------------------------------------------------------------------------------
# Paper convention: rules per ATen op
# --------------------------------------------------------------------------------------------


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _mm(args, out) -> int:  # (M, K) @ (K, N)
    return out.numel() * args[0].shape[-1]


def _addmm(args, out) -> int:  # bias + (M, K) @ (K, N): MACs and one add per output
    return out.numel() * args[1].shape[-1] + out.numel()


def _sdpa(args, out) -> int:
    """q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv), attn_mask: both products and the mask add."""
    q, k, v = args[:3]
    rows = _numel(q.shape[:-1])
    macs = rows * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    mask = args[3] if len(args) > 3 and isinstance(args[3], torch.Tensor) else None
    return macs + (rows * k.shape[-2] if mask is not None else 0)


def _elementwise_add(args, out) -> int:
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return 0  # integer index arithmetic is not a FLOP
    return out.numel()


def _indexed_add(
    args, out
) -> int:  # index_add(self, dim, index, source) / scatter_add(self, dim, index, src)
    source = args[3]
    return source.numel() if source.is_floating_point() else 0


_PAPER_RULES = {
    aten.index_add: _indexed_add,
    aten.index_add_: _indexed_add,
    aten.scatter_add: _indexed_add,
    aten.scatter_add_: _indexed_add,
    aten.mm: _mm,
    aten.bmm: _mm,
    aten.mv: lambda a, o: o.numel() * a[0].shape[-1],
    aten.dot: lambda a, o: a[0].numel(),
    aten.addmm: _addmm,
    aten.baddbmm: _addmm,
    aten.add: _elementwise_add,
    aten.add_: _elementwise_add,
    aten.sub: _elementwise_add,
    aten.sub_: _elementwise_add,
    aten.rsub: _elementwise_add,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa,
    aten._scaled_dot_product_flash_attention: _sdpa,
    aten._scaled_dot_product_efficient_attention: _sdpa,
    aten._scaled_dot_product_cudnn_attention: _sdpa,
}

# Ops that are free in the paper convention, by why. Pointwise ops other than add/sub (their
# ATen tag) and view ops are free without being listed.
_PAPER_FREE = {
    "data movement": (
        "index_fill",
        "index_fill_",
        "masked_scatter",
        "clone",
        "copy_",
        "_to_copy",
        "cat",
        "stack",
        "index_select",
        "index_copy",
        "index_copy_",
        "index_put",
        "index_put_",
        "_index_put_impl_",
        "index",
        "_unsafe_index",
        "gather",
        "scatter",
        "scatter_",
        "slice_scatter",
        "select_scatter",
        "constant_pad_nd",
        "roll",
        "repeat",
        "flip",
        "masked_fill",
        "masked_fill_",
        "fill_",
        "zero_",
        "lift_fresh",
        "lift_fresh_copy",
        "resize_",
        "set_",
        "contiguous",
        "_unsafe_view",
        "split",
        "split_with_sizes",
        "unbind",
        "chunk",
        "tril",
        "triu",
        "detach",
        "narrow",
        "embedding",
        "alias",
        "as_strided_",
    ),
    "checks (export's guards)": (
        "_assert_tensor_metadata",
        "_assert_async",
        "_assert_scalar",
        "sym_constrain_range",
    ),
    "creation": (
        "empty",
        "empty_like",
        "empty_strided",
        "zeros",
        "zeros_like",
        "ones",
        "ones_like",
        "full",
        "full_like",
        "new_empty",
        "new_empty_strided",
        "new_zeros",
        "new_ones",
        "new_full",
        "arange",
        "scalar_tensor",
        "_local_scalar_dense",
        "equal",
        "rand",
        "rand_like",
        "randn",
        "randn_like",
        "bernoulli",
        "uniform_",
        "normal_",
    ),
    "index arithmetic": ("floor_divide", "remainder"),
    "normalisation and softmax": (
        "native_layer_norm",
        "_softmax",
        "_safe_softmax",
        "_log_softmax",
        "native_group_norm",
        "native_batch_norm",
        "_native_batch_norm_legit_no_training",
    ),
    "reductions, norms and selection": (
        "sum",
        "mean",
        "amax",
        "amin",
        "max",
        "min",
        "topk",
        "sort",
        "argmax",
        "argmin",
        "argsort",
        "linalg_vector_norm",
        "norm",
        "all",
        "any",
        "prod",
        "var",
        "var_mean",
        "std",
    ),
    "convolution (patch embedding, heads)": (
        "convolution",
        "_convolution",
        "max_pool2d_with_indices",
        "avg_pool2d",
        "upsample_nearest2d",
        "upsample_bilinear2d",
        "_upsample_bilinear2d_aa",
        "upsample_bicubic2d",
    ),
}
_PAPER_FREE_NAMES = {name for names in _PAPER_FREE.values() for name in names}


def generic_flops(args, out) -> int:
    """The generic element-wise rule: one FLOP per element of the op's (first tensor) output."""
    for value in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(value, torch.Tensor):
            return value.numel()
    return 0


def _conv_macs(args, out) -> int:
    """A convolution's MACs as fvcore counts them: output elements x input channels per group x
    kernel size (what the paper convention leaves out)."""
    weight = args[1]
    return out.numel() * _numel(weight.shape[1:])


_LEFT_OUT = {aten.convolution: _conv_macs, aten._convolution: _conv_macs}

# Rules registered with register_flop_rule: qualified op name ("aten::cumsum") -> convention -> rule.
_USER_RULES: dict[str, dict[str, object]] = {}


def _qualified(op) -> str:
    """``"aten::cumsum"`` for torch.ops.aten.cumsum, its overloads and the strings "aten::cumsum",
    "aten.cumsum", "cumsum" (an ATen op)."""
    if isinstance(op, torch._ops.OpOverload):
        op = op.overloadpacket
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name
    if isinstance(op, str) and op.strip():
        text = op.strip().replace("torch.ops.", "")
        if "::" in text:
            namespace, name = text.split("::", 1)
            return f"{namespace}::{name.split('.')[0]}"
        parts = text.split(".")
        return f"aten::{parts[0]}" if len(parts) == 1 else f"{parts[0]}::{parts[1]}"
    raise TypeError(f"op must be an ATen op (torch.ops.aten.cumsum) or its name ('aten::cumsum'), got {op!r}")


def register_flop_rule(op, rule, convention: str = "both") -> None:
    """Count ``op`` with ``rule`` in ``count_flops`` (replacing the built-in rule, and the generic
    element-wise rule an op without one gets).

    Args:
        op: the op: ``torch.ops.aten.cumsum`` (or an overload of it), or its name
            (``"aten::cumsum"``, ``"aten.cumsum"``, or ``"cumsum"`` for an ATen op).
        rule: ``rule(args, out) -> int``, the op's FLOPs per call. ``args`` are the op's
            positional arguments (tensors with the shapes and dtypes of the call: meta tensors in
            the paper convention, stand-ins of the traced shapes in fvcore's; other arguments as
            values where they are constants, else None), ``out`` its output (a tensor or a tuple).
            ``None`` removes a rule registered before.
        convention: ``"paper"``, ``"fvcore"`` or ``"both"``.

    Raises:
        TypeError: ``op`` is not an op or a name, ``rule`` not callable; ValueError: an unknown
        convention.
    """
    if convention not in (*CONVENTIONS, "both"):
        raise ValueError(f"unknown convention {convention!r}: choose 'paper', 'fvcore' or 'both'")
    if rule is not None and not callable(rule):
        raise TypeError(f"rule must be a function (args, out) -> FLOPs or None, got {type(rule).__name__}")
    name = _qualified(op)
    chosen = CONVENTIONS if convention == "both" else (convention,)
    rules = _USER_RULES.setdefault(name, {})
    for c in chosen:
        if rule is None:
            rules.pop(c, None)
        else:
            rules[c] = rule
    if not rules:
        del _USER_RULES[name]


def registered_rule(op, convention: str):
    """The rule :func:`register_flop_rule` registered for ``op`` in ``convention``, or None."""
    return _USER_RULES.get(_qualified(op), {}).get(convention)


def _checked(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise TypeError(
            f"the FLOP rule registered for {name} returned {value!r}; it must return a number >= 0"
        )
    return int(value)


def _paper_rule(func):
    """The counting rule of an ATen op: (a function (args, out) -> FLOPs or None for free, whether
    it is the generic rule)."""
    packet = func.overloadpacket
    user = _USER_RULES.get(packet._qualified_op_name, {}).get("paper")
    if user is not None:
        return user, False
    if packet in _PAPER_RULES:
        return _PAPER_RULES[packet], False
    name = packet.__name__
    if name in _PAPER_FREE_NAMES or func.is_view or torch.Tag.pointwise in func.tags:
        return None, False
    return generic_flops, True


def _fake_scalar(t: torch.Tensor):
    """A value for ``.item()`` / ``bool()`` on a meta tensor: data-dependent branches take their
    common path (no fallback recompute, zero data-dependent counts)."""
    if t.dtype == torch.bool:
        return False
    return 0 if not t.is_floating_point() else 0.0


class _PaperCounter(TorchDispatchMode):
    """Counts FLOPs of every ATen op under it into ``counts[self.key]``."""

    def __init__(self, on_meta: bool = True):
        super().__init__()
        self.counts: dict[str, int] = defaultdict(int)
        self.generic: dict[str, int] = defaultdict(int)  # op -> FLOPs of the generic rule
        self.left_out: dict[str, int] = defaultdict(int)  # layer -> convolution MACs
        self.key = ""
        self.on_meta = on_meta

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            return _fake_scalar(args[0])
        if self.on_meta and kwargs.get("device") is not None:
            kwargs = dict(kwargs, device=torch.device("meta"))  # factories the trace pinned to a device
        rule, generic = _paper_rule(func)
        out = func(*args, **kwargs)
        if rule is not None:
            name = func.overloadpacket._qualified_op_name
            flops = _checked(rule(args, out), name)
            if flops:
                self.counts[self.key] += flops
            if generic:
                self.generic[name] += flops
        left_out = _LEFT_OUT.get(func.overloadpacket)
        if left_out is not None and not (rule is not None and not generic):
            self.left_out[self.key] += int(left_out(args, out))
        return out


# --------------------------------------------------------------------------------------------
# Copies to count on
# --------------------------------------------------------------------------------------------


def _meta_tensor(t: torch.Tensor) -> torch.Tensor:
    m = torch.empty_like(t, device="meta")
    if isinstance(t, nn.Parameter):
        return nn.Parameter(m, requires_grad=t.requires_grad)
    return m


def _copy_module(module: nn.Module, tensor) -> nn.Module:
    """A structural copy: new module objects (own flags, hooks and tensor slots) with every
    tensor replaced by ``tensor(t)``; fx graphs and other read-only records are shared (a deep
    copy of a large graph's node metadata recurses too deep)."""
    new = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, dict) and "hooks" in name:
            setattr(new, name, type(value)(value))
        elif name not in vars(new):  # GraphModule.__copy__ keeps only the graph (export's flags too)
            object.__setattr__(new, name, value)
    new._parameters = {k: (tensor(v) if v is not None else None) for k, v in module._parameters.items()}
    new._buffers = {k: (tensor(v) if v is not None else None) for k, v in module._buffers.items()}
    new._modules = {
        k: (_copy_module(v, tensor) if v is not None else None) for k, v in module._modules.items()
    }
    for name, value in vars(module).items():
        if isinstance(value, torch.Tensor):
            setattr(new, name, tensor(value))
    return new


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose tensors all live on the meta device (no data copied)."""
    return _copy_module(module, _meta_tensor)


def _shared_copy(module: nn.Module) -> nn.Module:
    """A copy sharing the parameters; state buffers are cloned."""
    return _copy_module(module, lambda t: t if isinstance(t, nn.Parameter) else t.clone())


def _to_meta_args(args: tuple) -> tuple:
    return tuple(torch.empty_like(a, device="meta") if isinstance(a, torch.Tensor) else a for a in args)


# --------------------------------------------------------------------------------------------
# Eventful models
# --------------------------------------------------------------------------------------------


def counting_policy(policy: Policy) -> Policy:
    """The static policy a count uses for ``policy``: static policies as they are; data-dependent
    and stateful ones select their priced count (``evtrace.runtime.policies.counted_tokens``:
    Threshold every token, AdaptiveBudget its target, Staleness adds the due tokens)."""
    return static_for_counting(policy)


def layer_names(graph_module: torch.fx.GraphModule) -> dict[str, str]:
    """Module name in an eventful graph -> the layer name counts are reported under: regions by
    their name, attention modules by their site's name."""
    names = {}
    for name, module in graph_module.named_children():
        if isinstance(module, SparseRegion):
            names[name] = module.name
        elif isinstance(module, (ExactDeltaAttention, PaperDeltaAttention)):
            names[name] = module.site_name or name
    return names


def _node_key(node: torch.fx.Node, names: dict[str, str]) -> str:
    if node.op == "call_module" and str(node.target) in names:
        return names[str(node.target)]
    return site_of(node) or region_of(node) or module_path(node)


class _KeyedInterpreter(torch.fx.Interpreter):
    def __init__(self, gm, counter: _PaperCounter, names: dict[str, str]):
        super().__init__(gm, garbage_collect_values=True)
        self.counter = counter
        self.names = names

    def call_module(self, target, args, kwargs):
        module = self.fetch_attr(target)
        if isinstance(module, StepLoop):  # count each time step's ops under their own layers
            names = layer_names(module.step)

            def runner(step, *inputs):
                return _KeyedInterpreter(step, self.counter, names).run(*inputs)

            return module(*args, runner=runner, **kwargs)
        return super().call_module(target, args, kwargs)

    def run_node(self, n):
        self.counter.key = _node_key(n, self.names)
        try:
            return super().run_node(n)
        except RuntimeError as error:
            if not (_is_view(n) and "view size is not compatible" in str(error)):
                raise RuntimeError(f"counting FLOPs failed at {where(n)}: {error}") from error
            # The traced graph relied on the memory layout of a fused kernel (export's flash
            # attention hands out (B, N, H, d) memory as (B, H, N, d)); on meta tensors the same
            # op runs its math decomposition, contiguous. A view costs nothing: take the shape.
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            return args[0].reshape(*args[1:], **kwargs)
        except TypeError as error:
            if "FLOP rule registered" in str(error):
                raise
            raise RuntimeError(f"counting FLOPs failed at {where(n)}: {error}") from error
        except Exception as error:
            raise RuntimeError(f"counting FLOPs failed at {where(n)}: {error}") from error


def _is_view(n: torch.fx.Node) -> bool:
    if n.op == "call_method":
        return n.target == "view"
    return n.op == "call_function" and n.target in (aten.view.default, aten.view, torch.Tensor.view)


def _prepare_eventful(emodel: EventfulModel, args: tuple, policy: Policy | None, on_meta: bool):
    try:
        gm = emodel.graph_module_for(*args)
    except ValueError:
        raise ValueError(
            "example_inputs differ in shape or dtype from the frames this eventful model was built "
            "for; count with a frame of the size the model was transformed with"
        ) from None
    work = _meta_copy(gm) if on_meta else _shared_copy(gm)
    budgets, frozen = {}, []
    for module in work.modules():
        if isinstance(module, SparseRegion):
            chosen = as_policy(policy) if policy is not None else module.gate.policy
            module.gate.policy = counting_policy(chosen)
            budgets[module.name] = counted_tokens(chosen, module.gate.tokens)
            if module.gate.n_forced and budgets[module.name] <= module.gate.n_forced:
                frozen.append(module.name)
            module.fresh = True
        elif isinstance(module, (ExactDeltaAttention, PaperDeltaAttention, StepLoop)):
            module.reset()
    return work, layer_names(work), budgets, tuple(frozen)


def _count_paper_eventful(emodel, args, policy) -> FlopCount:
    work, names, budgets, frozen = _prepare_eventful(emodel, args, policy, on_meta=True)
    meta_args = _to_meta_args(args)
    frames = []
    with torch.no_grad():
        for _ in range(2):
            counter = _PaperCounter()
            with counter:
                _KeyedInterpreter(work, counter, names).run(*meta_args)
            frames.append(counter)
    first, steady = (dict(c.counts) for c in frames)
    count = FlopCount(
        "paper", sum(first.values()), sum(steady.values()), steady, first, budgets, frozen_gates=frozen
    )
    return _paper_result(count, frames[1])


def _paper_result(count: FlopCount, counter: _PaperCounter) -> FlopCount:
    """``count`` with the generic ops and the left-out FLOPs of ``counter``; warns where the
    convention leaves out more than ``LEFT_OUT_WARNING`` of the model."""
    left = {k: v for k, v in counter.left_out.items() if v}
    count = dataclasses.replace(
        count, generic_ops=dict(counter.generic), left_out=sum(left.values()), left_out_per_layer=left
    )
    if count.left_out_share > LEFT_OUT_WARNING:
        warnings.warn(count.left_out_text(), PaperConventionWarning, stacklevel=3)
    return count


# --------------------------------------------------------------------------------------------
# Original models
# --------------------------------------------------------------------------------------------


def _count_paper_module(module: nn.Module, args: tuple) -> FlopCount:
    """Counts the traced graph, not the module's Python code: code run under the counter's meta
    tensors would leave meta-derived values in the model library's caches (HF BEiT caches its
    relative-position index per window size), and the real model would read them later."""
    work = _meta_copy(trace(module, args))
    counter = _PaperCounter()
    with torch.no_grad(), counter:
        _KeyedInterpreter(work, counter, {}).run(*_to_meta_args(args))
    counts = dict(counter.counts)
    total = sum(counts.values())
    return _paper_result(FlopCount("paper", total, total, counts, counts), counter)


# --------------------------------------------------------------------------------------------
# fvcore
# --------------------------------------------------------------------------------------------


def _exclusive(by_module: dict[str, int], module: nn.Module) -> dict[str, int]:
    """fvcore's inclusive per-module totals -> counts by the innermost module."""
    out = {}
    for name, sub in module.named_modules():
        children = [f"{name}.{c}" if name else c for c, _ in sub.named_children()]
        own = round(by_module.get(name, 0) - sum(by_module.get(c, 0) for c in children))
        if own:
            out[name] = own
    return out


def _fvcore_once(module: nn.Module, args: tuple) -> tuple[dict[str, int], dict[str, int]]:
    """(FLOPs by innermost module, FLOPs of the generic rule by op). Ops that neither fvcore nor
    ``HANDLES`` nor a registered rule covers get the generic rule (the analysis runs again with
    it: fvcore lists unsupported ops only after a run)."""
    from evtrace.cost.fvcore_handles import flop_count_analysis, generic_handle, user_handles

    handles = user_handles(_USER_RULES)
    analysis = flop_count_analysis(module, args, handles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis.total()
        unsupported = sorted(dict(analysis.unsupported_ops()))
        generic: dict[str, int] = {}
        if unsupported:
            analysis = flop_count_analysis(module, args, handles | {op: generic_handle for op in unsupported})
            analysis.total()
            by_op = dict(analysis.by_operator())
            generic = {op: int(by_op.get(op.split("::", 1)[-1], 0)) for op in unsupported}
    return _exclusive(dict(analysis.by_module()), module), generic


def _collapse(counts: dict[str, int], names: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for name, value in counts.items():
        head = name.split(".", 1)[0]
        out[names.get(head, name)] += value
    return dict(out)


def _count_fvcore_eventful(emodel, args, policy) -> FlopCount:
    work, names, budgets, frozen = _prepare_eventful(emodel, args, policy, on_meta=False)
    with torch.no_grad():
        first, _ = _fvcore_once(work, args)
        steady, generic = _fvcore_once(work, args)
    first, steady = _collapse(first, names), _collapse(steady, names)
    return FlopCount(
        "fvcore",
        sum(first.values()),
        sum(steady.values()),
        steady,
        first,
        budgets,
        generic_ops=generic,
        frozen_gates=frozen,
    )


def _count_fvcore_module(module: nn.Module, args: tuple) -> FlopCount:
    """fvcore on the traced graph, as for eventful models: the same ops on both sides of a ratio,
    and no scripted helpers (HF VitDet's) that fvcore's jit trace cannot look into."""
    with torch.no_grad():
        counts, generic = _fvcore_once(trace(module, args), args)
    total = sum(counts.values())
    return FlopCount("fvcore", total, total, counts, counts, generic_ops=generic)


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


def count_flops(module: nn.Module, example_inputs, convention: str = "paper", *, policy=None) -> FlopCount:
    """FLOPs per frame of ``module`` called on ``example_inputs``.

    Args:
        module: an original model (eval mode) or an :class:`~evtrace.EventfulModel`.
        example_inputs: a tensor or tuple of tensors as the model is called (only shapes and
            dtypes matter in the paper convention).
        convention: ``"paper"`` or ``"fvcore"`` (see the module docstring).
        policy: eventful models only: count the steady state at this policy (a Policy or an int
            r) instead of the model's own; the model is not changed.

    Returns:
        A :class:`FlopCount`: ``first_frame``, ``steady`` (== ``total``), ``per_layer``.
        Original models: ``first_frame == steady``.

        Ops without a rule are counted by the generic element-wise rule and listed in
        ``generic_ops``; :func:`register_flop_rule` gives them one.

    Raises:
        ValueError: an unknown convention; TypeError: a registered rule returned something
        other than a number >= 0.

    Warns:
        PaperConventionWarning: paper convention, the model's convolutions are more than 10 %
        of its FLOPs (left out of this convention; see ``FlopCount.left_out``).
    """
    if convention not in CONVENTIONS:
        raise ValueError(
            f"unknown convention {convention!r}: choose one of {', '.join(map(repr, CONVENTIONS))}"
        )
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    args = as_args(example_inputs)
    if isinstance(module, EventfulModel):
        if convention == "paper":
            return _count_paper_eventful(module, args, policy)
        return _count_fvcore_eventful(module, args, policy)
    if policy is not None:
        raise ValueError("policy applies to eventful models only; transform the model first")
    if convention == "paper":
        return _count_paper_module(module, args)
    return _count_fvcore_module(module, args)
