"""fvcore op handles for every op of original and rewritten evtrace graphs.

fvcore 0.1.5 counts MACs of matmul-like ops (``addmm``, ``bmm``, ``einsum``, ``matmul``,
``linear``, convolutions) and estimates norms, upsampling and pooling; every other op it meets
is *unsupported*: skipped with a warning, counted as zero. That silently drops
``scaled_dot_product_attention`` (both attention products) and leaves every gate and delta
attention op unaccounted for. ``HANDLES`` gives each of them a rule:

- contractions: MACs (``scaled_dot_product_attention``: both products; ``baddbmm``;
  vector norms: one multiply-accumulate per element, as a dot product with itself);
- everything else (elementwise arithmetic, reductions, softmax, activations, top-k, gathers,
  scatters, copies, creation, index arithmetic): zero, the value fvcore's own ignore list and
  MAC convention give such ops, now stated rather than skipped.

:func:`flop_count_analysis` builds a ``FlopCountAnalysis`` with them (and the rules registered
with ``evtrace.register_flop_rule``, through :func:`user_handles`), with fvcore's
DeprecationWarnings filtered. Ops still without a handle get :func:`generic_handle` (one FLOP
per output element) and are listed in the count's ``generic_ops``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn


def _shape(value) -> list[int] | None:
    return value.type().sizes() if value.isCompleteTensor() else None


def sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """q (..., Nq, d), k (..., Nk, d), v (..., Nk, dv): Nq Nk d for q k^T plus Nq Nk dv for A v."""
    q, k, v = (_shape(x) for x in inputs[:3])
    rows = math.prod(q[:-1])
    return rows * k[-2] * (q[-1] + v[-1])


def baddbmm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """input + (b, n, k) @ (b, k, m): the product's MACs."""
    a = _shape(inputs[1])
    return math.prod(_shape(outputs[0])) * a[-1]


def norm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """A vector norm: one multiply-accumulate per input element."""
    return math.prod(_shape(inputs[0]))


def free(inputs: list[Any], outputs: list[Any]) -> int:
    """No MACs: elementwise, reduction, selection or data movement."""
    return 0


_FREE = (
    # elementwise arithmetic and activations
    "add",
    "add_",
    "sub",
    "sub_",
    "rsub",
    "mul",
    "mul_",
    "div",
    "div_",
    "neg",
    "exp",
    "exp_",
    "sqrt",
    "rsqrt",
    "hypot",
    "square",
    "pow",
    "abs",
    "maximum",
    "minimum",
    "where",
    "clamp_min",
    "clamp_max",
    "clamp",
    "gelu",
    "silu",
    "relu",
    "tanh",
    "sigmoid",
    "erf",
    "reciprocal",
    "log",
    "lt",
    "le",
    "gt",
    "ge",
    "eq",
    "ne",
    "logical_not",
    "logical_and",
    "logical_or",
    "bitwise_not",
    "__and__",
    "__or__",
    "floor_divide",
    "remainder",
    "fill_",
    "masked_fill",
    "masked_fill_",
    "dropout",
    "type_as",
    "to",
    "float",
    "long",
    "bool",
    "isfinite",
    "nan_to_num",
    # reductions, softmax and selection
    "softmax",
    "log_softmax",
    "_safe_softmax",
    "sum",
    "mean",
    "amax",
    "amin",
    "max",
    "min",
    "all",
    "any",
    "topk",
    "sort",
    "argsort",
    "argmax",
    "argmin",
    # data movement and layout
    "index_fill",
    "index_fill_",
    "index_add",
    "index_add_",
    "scatter_add",
    "scatter_add_",
    "index_select",
    "index_copy",
    "index_copy_",
    "index_put",
    "index_put_",
    "index",
    "gather",
    "scatter",
    "scatter_",
    "copy_",
    "clone",
    "contiguous",
    "cat",
    "stack",
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "expand",
    "expand_as",
    "squeeze",
    "unsqueeze",
    "slice",
    "select",
    "narrow",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "repeat",
    "roll",
    "flip",
    "constant_pad_nd",
    "pad",
    "detach",
    "alias",
    "lift_fresh",
    "lift_fresh_copy",
    "as_strided",
    "as_strided_",
    "meshgrid",
    "embedding",
    "numpy_T",
    "mT",
    "tril",
    "triu",
    "max_pool2d",
    # creation and scalars
    "zeros",
    "zeros_like",
    "ones",
    "ones_like",
    "empty",
    "empty_like",
    "full",
    "full_like",
    "new_zeros",
    "new_ones",
    "new_empty",
    "new_full",
    "arange",
    "rand",
    "rand_like",
    "randn",
    "randn_like",
    "bernoulli",
    "scalar_tensor",
    "ScalarImplicit",
    "Int",
    "Float",
    "Bool",
    "size",
    "numel",
    "dim",
    "item",
    "_local_scalar_dense",
    "is_floating_point",
)


def pool1d_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """adaptive_avg_pool1d as fvcore prices its 2-d form: one operation per input element."""
    return math.prod(_shape(inputs[0]))


def conv_mode_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``_convolution_mode`` (a convolution with string padding, as SigLIP's patch embedding):
    output elements x input channels per group x kernel size, as fvcore prices ``_convolution``."""
    weight = _shape(inputs[1])
    return math.prod(_shape(outputs[0])) * math.prod(weight[1:])


def bicubic_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """Bicubic resampling (position-embedding interpolation): 16 taps per output element, where
    fvcore prices bilinear at 4."""
    return 16 * math.prod(_shape(outputs[0]))


#: fvcore op name -> handle, registered on top of fvcore's defaults.
HANDLES = {
    "aten::_convolution_mode": conv_mode_macs,
    "aten::upsample_bicubic2d": bicubic_flops,
    "aten::_upsample_bicubic2d_aa": bicubic_flops,
    "aten::adaptive_avg_pool1d": pool1d_flops,
    "aten::scaled_dot_product_attention": sdpa_macs,
    "aten::baddbmm": baddbmm_macs,
    "aten::linalg_vector_norm": norm_macs,
    "aten::norm": norm_macs,
    "aten::frobenius_norm": norm_macs,
    **{f"aten::{name}": free for name in _FREE},
}


def generic_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """The generic element-wise rule: one FLOP per element of the first output."""
    shape = _shape(outputs[0]) if outputs else None
    return math.prod(shape) if shape is not None else 0


_DTYPES = {
    "Float": torch.float32, "Double": torch.float64, "Half": torch.float16, "BFloat16": torch.bfloat16,
    "Long": torch.int64, "Int": torch.int32, "Bool": torch.bool, "Byte": torch.uint8,
}  # fmt: skip


def _stand_in(value):
    """A jit value as a registered rule sees it: a meta tensor of its traced shape and dtype, a
    constant's value, or None."""
    if value.isCompleteTensor():
        scalar = value.type().scalarType()
        return torch.empty(value.type().sizes(), dtype=_DTYPES.get(scalar, torch.float32), device="meta")
    try:
        return value.toIValue()
    except Exception:  # noqa: BLE001 - not a constant
        return None


def user_handles(rules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """fvcore handles for the rules registered in the fvcore convention (op name -> rule)."""
    handles = {}
    for name, by_convention in rules.items():
        rule = by_convention.get("fvcore")
        if rule is None:
            continue

        def handle(inputs, outputs, rule=rule, name=name):
            args = [_stand_in(v) for v in inputs]
            outs = [_stand_in(v) for v in outputs]
            value = rule(args, outs[0] if len(outs) == 1 else tuple(outs))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise TypeError(
                    f"the FLOP rule registered for {name} returned {value!r}; it must return a number >= 0"
                )
            return int(value)

        handles[name] = handle
    return handles


def flop_count_analysis(module: nn.Module, inputs: tuple, extra: dict[str, Any] | None = None):
    """A ``fvcore.nn.FlopCountAnalysis`` of ``module`` on ``inputs`` with ``HANDLES`` (and
    ``extra`` handles on top) and quiet warnings (fvcore's DeprecationWarnings, tracer
    warnings; unsupported ops stay queryable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(module, inputs).set_op_handle(**(HANDLES | (extra or {})))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis
