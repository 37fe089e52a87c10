"""Rewrite: the linears of the sparse regions run with packed weights.

Every linear in a SparseRegion's ``sparse`` graph (the r gathered tokens per stream) and in
its ``dense`` graph (first frame, refresh) whose weight is a parameter or buffer of the model
(a ``get_attr``, or an ``nn.Linear`` call) becomes a call of
:class:`evtrace.runtime.packed.PackedLinear` with the same input, weight and bias nodes; the two
graphs share one kernel, so one packed copy per weight, reused every frame (the kernel itself
goes back to ``F.linear`` above ``MAX_PACKED_ROWS`` rows). Not rewritten: linears outside the
regions (they run once per frame on full tensors), and a linear whose weight is computed in the
graph (a fresh tensor each call: nothing to keep).

Reads: ``meta[OP]`` (copied into the region graphs by sparse_regions). Writes: the region
graphs only; the new nodes keep the replaced nodes' metadata.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from evtrace.graph.meta import OP, OpKind, module_path, op_kind
from evtrace.runtime.gates import SparseRegion
from evtrace.runtime.packed import PackedLinear


def _stored(arg) -> bool:
    return isinstance(arg, torch.fx.Node) and arg.op == "get_attr"


def _linear_operands(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """``(x, weight, bias)`` nodes (bias may be None) of a linear node with a stored weight, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear) or node.kwargs or len(node.args) != 1:
            return None
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight")
            bias = gm.graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
        return node.args[0], weight, bias
    if node.op != "call_function":
        return None
    names = ("input", "weight", "bias")
    operands = dict(zip(names, node.args)) | dict(node.kwargs)
    if set(operands) - set(names) or "weight" not in operands:
        return None
    weight, bias = operands["weight"], operands.get("bias")
    if not _stored(weight) or not (bias is None or _stored(bias)):
        return None
    return operands["input"], weight, bias


def pack_graph(gm: torch.fx.GraphModule, kernels: dict[str, PackedLinear] | None = None) -> list[str]:
    """Replace the linears of ``gm`` that read a stored weight by PackedLinear calls; returns the
    new modules' names. ``kernels`` (weight target -> kernel) shares one packed copy between the
    graphs that read the same weight (a region's sparse and dense graphs); new kernels are added."""
    kernels = {} if kernels is None else kernels
    packed = []
    for node in list(gm.graph.nodes):
        if op_kind(node) != OpKind.LINEAR:
            continue
        operands = _linear_operands(gm, node)
        if operands is None:
            continue
        name = f"evtrace_packed_{len(packed)}"
        weight_target = operands[1].target
        kernel = kernels.setdefault(weight_target, PackedLinear(module_path(node) or weight_target))
        gm.add_submodule(name, kernel)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, operands)
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        packed.append(name)
    if packed:
        gm.graph.lint()
        gm.recompile()
    return packed


class PackLinears:
    """Pass: the sparse regions' linears read packed weights (skipped when packing is off)."""

    name = "pack_linears"
    reads = frozenset({OP})
    writes = frozenset()

    def run(self, gm: torch.fx.GraphModule, ctx) -> None:
        if not ctx.options.pack_linears:
            return
        for module in list(gm.modules()):
            if isinstance(module, SparseRegion):
                kernels: dict[str, PackedLinear] = {}
                pack_graph(module.sparse, kernels)
                pack_graph(module.dense, kernels)
