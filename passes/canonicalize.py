"""Canonicalisation: give every node one op kind, whichever front end produced it.

fx graphs spell a linear as ``call_module nn.Linear``, ``F.linear`` or ``x @ w.t()``; export
graphs as ``aten.linear.default``. Later passes match on ``meta[OP]`` only. Export's metadata
asserts (``aten._assert_tensor_metadata``: a dtype check with no data and no users) are removed,
so that a tensor they check has only its real users (HF's eager attention asserts the softmax
output's dtype).

Reads: ``meta[TENSOR]``. Writes: ``meta[OP]`` (OpKind) on every node; erases unused asserts.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from evtrace.graph.meta import OP, TENSOR, OpKind, TensorInfo, set_op, tensor_info

from .context import PassResult

_BY_NAME: dict[str, OpKind] = {}


def _register(kind: OpKind, *names: str) -> None:
    for name in names:
        _BY_NAME[name] = kind


_register(OpKind.LINEAR, "linear")
_register(
    OpKind.CONV,
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "_convolution",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)
_register(
    OpKind.POOL,
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "max_pool2d_with_indices",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "interpolate",
    "upsample_bilinear2d",
    "upsample_nearest2d",
    "upsample_bicubic2d",
)
_register(OpKind.LAYER_NORM, "layer_norm", "native_layer_norm", "rms_norm")
_register(
    OpKind.UNARY,
    "gelu",
    "relu",
    "silu",
    "tanh",
    "sigmoid",
    "hardswish",
    "hardsigmoid",
    "mish",
    "elu",
    "leaky_relu",
    "quick_gelu",
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "neg",
    "exp",
    "sqrt",
    "rsqrt",
    "abs",
    "erf",
    "reciprocal",
    "square",
    "to",
    "type",
    "float",
    "half",
    "double",
    "bfloat16",
    "_to_copy",
    "detach",
    "clone",
    "alias",
    "lift_fresh_copy",
    "contiguous",
    "identity",
    "type_as",
)
_register(
    OpKind.BINARY,
    "add",
    "sub",
    "mul",
    "div",
    "truediv",
    "rsub",
    "pow",
    "maximum",
    "minimum",
    "iadd",
    "imul",
    "add_",
    "mul_",
    "div_",
    "sub_",
    "floordiv",
    "where",
)
_register(OpKind.SOFTMAX, "softmax", "_softmax", "log_softmax", "_safe_softmax")
_register(
    OpKind.REDUCE, "mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "logsumexp", "prod"
)
_register(OpKind.MATMUL, "matmul", "bmm", "mm", "baddbmm")
_register(OpKind.EINSUM, "einsum")
_register(OpKind.SDPA, "scaled_dot_product_attention")
_register(
    OpKind.LAYOUT,
    "view",
    "reshape",
    "_unsafe_view",
    "permute",
    "transpose",
    "t",
    "flatten",
    "unflatten",
    "expand",
    "expand_as",
    "squeeze",
    "unsqueeze",
    "unbind",
    "split",
    "split_with_sizes",
    "chunk",
    "getitem",
    "select",
    "slice",
    "cat",
    "concat",
    "concatenate",
    "stack",
    "pad",
    "constant_pad_nd",
    "roll",
    "narrow",
    "repeat",
    "index_select",
    "gather",
    "take_along_dim",
    "index",
    "_unsafe_index",
    "movedim",
    "swapaxes",
    "view_as",
    "reshape_as",
    "tensor_split",
)
_register(
    OpKind.SHAPE,
    "size",
    "sym_size",
    "dim",
    "numel",
    "getattr",
    "sym_numel",
    "floordiv_int",
    "sym_float",
    "sym_int",
)
_register(
    OpKind.GUARD,
    "_assert_tensor_metadata",
    "_assert_async",
    "_assert_scalar",
    "sym_constrain_range_for_size",
    "_guards_fn",
)

_MODULE_KINDS: tuple[tuple[type, OpKind], ...] = (
    (nn.Linear, OpKind.LINEAR),
    (nn.modules.conv._ConvNd, OpKind.CONV),
    (nn.modules.pooling._MaxPoolNd, OpKind.POOL),
    (nn.modules.pooling._AvgPoolNd, OpKind.POOL),
    (nn.modules.pooling._AdaptiveAvgPoolNd, OpKind.POOL),
    (nn.Upsample, OpKind.POOL),
    (nn.LayerNorm, OpKind.LAYER_NORM),
    (nn.Softmax, OpKind.SOFTMAX),
    (nn.Flatten, OpKind.LAYOUT),
    (nn.Unflatten, OpKind.LAYOUT),
    (nn.Identity, OpKind.UNARY),
    (nn.modules.dropout._DropoutNd, OpKind.UNARY),
    (nn.GELU, OpKind.UNARY),
    (nn.ReLU, OpKind.UNARY),
    (nn.SiLU, OpKind.UNARY),
    (nn.Tanh, OpKind.UNARY),
    (nn.Sigmoid, OpKind.UNARY),
    (nn.Hardswish, OpKind.UNARY),
    (nn.Mish, OpKind.UNARY),
    (nn.ELU, OpKind.UNARY),
    (nn.LeakyReLU, OpKind.UNARY),
)

_OPERATORS = {
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.truediv: "truediv",
    operator.floordiv: "floordiv",
    operator.matmul: "matmul",
    operator.getitem: "getitem",
    operator.neg: "neg",
    operator.iadd: "iadd",
    operator.isub: "isub",
    operator.imul: "imul",
    operator.itruediv: "itruediv",
    operator.pow: "pow",
    getattr: "getattr",
}


# One spelling per arithmetic function: the operator, in-place and method forms of an op are
# the same op to every matcher (``x += y``, ``x.add_(y)``, ``torch.add``, ``aten.add.Tensor``).
SPELLINGS = {
    "iadd": "add",
    "add_": "add",
    "isub": "sub",
    "sub_": "sub",
    "imul": "mul",
    "mul_": "mul",
    "truediv": "div",
    "itruediv": "div",
    "div_": "div",
}
# In-place forms and their out-of-place targets (operator form, method name).
_IN_PLACE = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}
_IN_PLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}


def raw_name(node: torch.fx.Node) -> str:
    """The name of a node's operation as the front end spelled it."""
    target = node.target
    if node.op == "call_method":
        return str(target)
    if node.op == "call_function":
        if isinstance(target, torch._ops.OpOverload):
            return target._opname
        if isinstance(target, torch._ops.OpOverloadPacket):
            return target._qualified_op_name.split("::")[-1]
        if target in _OPERATORS:
            return _OPERATORS[target]
        return getattr(target, "__name__", str(target))
    return node.op


def op_name(node: torch.fx.Node) -> str:
    """The canonical base name of a node's operation (``"linear"``, ``"view"``, ``"add"`` for
    ``+``, ``+=``, ``add_`` and ``torch.add`` alike, ``"div"`` for ``/`` and ``div``)."""
    name = raw_name(node)
    return SPELLINGS.get(name, name)


def out_of_place(gm: torch.fx.GraphModule) -> int:
    """Rewrite in-place arithmetic (``x += y``, ``x.add_(y)``) to its out-of-place form where
    no later node reads the mutated tensor (so nothing can observe the difference); returns how
    many nodes were rewritten. The sparse graphs then never write into a gathered input."""
    rewritten = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _IN_PLACE:
            replacement = ("call_function", _IN_PLACE[node.target])
        elif node.op == "call_method" and node.target in _IN_PLACE_METHODS:
            replacement = ("call_method", _IN_PLACE_METHODS[node.target])
        else:
            continue
        target = node.args[0] if node.args else None
        if not isinstance(target, torch.fx.Node) or len(target.users) != 1:
            continue  # another node reads the mutated tensor (or a view of it)
        if kind_of(target, gm) in (OpKind.INPUT, OpKind.PARAM, OpKind.LAYOUT, OpKind.UNKNOWN):
            continue  # the caller's tensor, a parameter, or a view that aliases another tensor
        node.op, node.target = replacement
        rewritten += 1
    return rewritten


def kind_of(node: torch.fx.Node, root: nn.Module) -> OpKind:
    """The canonical OpKind of one node."""
    if node.op == "placeholder":
        return OpKind.INPUT
    if node.op == "output":
        return OpKind.OUTPUT
    if node.op == "get_attr":
        return OpKind.PARAM
    if node.op == "call_module":
        if str(node.target) == "_guards_fn":
            return OpKind.GUARD
        module = root.get_submodule(str(node.target))
        for cls, kind in _MODULE_KINDS:
            if isinstance(module, cls):
                return kind
        return OpKind.UNKNOWN
    name = op_name(node)
    info = tensor_info(node)
    # a tuple of sizes (``x.size()[:-1] + (h, d)``) is recorded as a tuple of no tensors
    produces_tensor = isinstance(info, TensorInfo) or (
        isinstance(info, tuple) and any(isinstance(i, TensorInfo) for i in info)
    )
    if name in ("getitem", "getattr") and not produces_tensor:
        return OpKind.SHAPE
    if name == "getattr" and isinstance(info, TensorInfo):  # a named-tuple field (topk(...).indices)
        return OpKind.LAYOUT
    kind = _BY_NAME.get(name)
    if kind is None:
        if not produces_tensor and not _has_tensor_arg(node):
            return OpKind.SHAPE
        return OpKind.UNKNOWN
    if kind in (OpKind.BINARY, OpKind.UNARY) and not produces_tensor:
        return OpKind.SHAPE  # Python arithmetic on sizes
    return kind


def _has_tensor_arg(node: torch.fx.Node) -> bool:
    found = False

    def visit(a):
        nonlocal found
        info = tensor_info(a) if isinstance(a, torch.fx.Node) else None
        if isinstance(info, TensorInfo) or (
            isinstance(info, tuple) and any(isinstance(i, TensorInfo) for i in info)
        ):
            found = True
        return a

    torch.fx.map_arg((node.args, node.kwargs), visit)
    return found


def canonicalize(gm: torch.fx.GraphModule) -> dict[OpKind, int]:
    """Write ``meta[OP]`` on every node of ``gm``; returns how many nodes got each kind."""
    counts: dict[OpKind, int] = {}
    out_of_place(gm)
    for node in list(gm.graph.nodes):
        kind = kind_of(node, gm)
        if kind == OpKind.GUARD and node.op == "call_function" and not node.users:
            gm.graph.erase_node(node)
            continue
        set_op(node, kind)
        counts[kind] = counts.get(kind, 0) + 1
    gm.recompile()
    return counts


class Canonicalize:
    """Pass: one OpKind per node."""

    name = "canonicalize"
    reads = frozenset({TENSOR})
    writes = frozenset({OP})
    rewrites = True  # drops export's unused dtype asserts

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        counts = canonicalize(gm)
        return PassResult((("ops", sum(counts.values())),))
