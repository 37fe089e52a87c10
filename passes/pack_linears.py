"""Rewrite: the linears of the sparse regions run with packed weights.

Every linear in a SparseRegion's ``sparse`` graph (the r gathered tokens per stream) and in
its ``dense`` graph (first frame, refresh) whose weight is a parameter or buffer of the model
(a ``get_attr``, or an ``nn.Linear`` call) becomes a call of
:class:`evtrace.runtime.packed.PackedLinear` with the same input, weight and bias nodes; the two
graphs share one kernel, so one packed copy per weight, reused every frame (the kernel itself
goes back to ``F.linear`` above ``MAX_PACKED_ROWS`` rows). Linears that read the same input (HF's
q, k and v projections) become one :class:`evtrace.runtime.packed.PackedSiblingLinears` call on
the stacked weights, one kernel call for the three. Not rewritten: linears outside the
regions (they run once per frame on full tensors), and a linear whose weight is computed in the
graph (a fresh tensor each call: nothing to keep).

Reads: ``meta[OP]`` (copied into the region graphs by sparse_regions). Writes: the region
graphs only; the new nodes keep the replaced nodes' metadata.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from evtrace.graph.meta import MODULE_PATH, OP, OpKind, module_path, op_kind
from evtrace.runtime.gates import SparseRegion
from evtrace.runtime.packed import PackedLinear, PackedSiblingLinears

from .context import PassResult

#: Whether linears of one input are packed as one product (off: one kernel per linear).
GROUP_SIBLINGS = True


def _stored(arg) -> bool:
    return isinstance(arg, torch.fx.Node) and arg.op == "get_attr"


def _linear_spec(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """``(x, weight target, bias target or None)`` of a linear node with a stored weight, or None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear) or node.kwargs or len(node.args) != 1:
            return None
        return (
            node.args[0],
            f"{node.target}.weight",
            f"{node.target}.bias" if module.bias is not None else None,
        )
    if node.op != "call_function":
        return None
    names = ("input", "weight", "bias")
    # args may stop before the optional bias (or give it as a keyword)
    operands = dict(zip(names[: len(node.args)], node.args, strict=True)) | dict(node.kwargs)
    if set(operands) - set(names) or "weight" not in operands:
        return None
    weight, bias = operands["weight"], operands.get("bias")
    if not _stored(weight) or not (bias is None or _stored(bias)):
        return None
    return operands["input"], weight.target, None if bias is None else bias.target


def _replace(gm: torch.fx.GraphModule, node: torch.fx.Node, new: torch.fx.Node) -> None:
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    dropped = [a for a in node.all_input_nodes if a.op == "get_attr"]
    gm.graph.erase_node(node)
    for attr in dropped:  # the old weight / bias reads, now unused
        if not attr.users:
            gm.graph.erase_node(attr)


def pack_graph(gm: torch.fx.GraphModule, kernels: dict | None = None) -> list[str]:
    """Replace the linears of ``gm`` that read a stored weight by packed calls; returns the new
    modules' names. Linears of one input (HF's separate q, k and v projections) become one
    :class:`PackedSiblingLinears` call (their outputs: ``getitem`` of it), the others
    :class:`PackedLinear` calls. ``kernels`` (weight target, or the tuple of a group's targets ->
    kernel) shares one packed copy between the graphs that read the same weights (a region's sparse
    and dense graphs); new kernels are added."""
    kernels = {} if kernels is None else kernels
    by_input: dict[torch.fx.Node, list] = {}
    for node in gm.graph.nodes:
        if op_kind(node) != OpKind.LINEAR:
            continue
        spec = _linear_spec(gm, node)
        if spec is not None:
            by_input.setdefault(spec[0], []).append((node, spec[1], spec[2]))
    packed = []
    replaced: dict[torch.fx.Node, torch.fx.Node] = {}  # a packed linear's input may be one replaced before
    for x, members in by_input.items():
        while x in replaced:
            x = replaced[x]
        with_bias = {bias is not None for _node, _w, bias in members}
        siblings = GROUP_SIBLINGS and len(members) > 1 and len(with_bias) == 1
        groups = [members] if siblings else [[m] for m in members]
        for group in groups:
            name = f"evtrace_packed_{len(packed)}"
            first = group[0][0]
            with gm.graph.inserting_before(first):
                weights = tuple(gm.graph.get_attr(w) for _n, w, _b in group)
                biases = tuple(gm.graph.get_attr(b) for _n, _w, b in group if b is not None)
                if len(group) == 1:
                    key = group[0][1]
                    kernel = kernels.setdefault(key, PackedLinear(module_path(first) or key))
                    gm.add_submodule(name, kernel)
                    call = gm.graph.call_module(name, (x, weights[0], biases[0] if biases else None))
                else:
                    key = tuple(w for _n, w, _b in group)
                    label = ", ".join(module_path(n) or w for n, w, _b in group)
                    kernel = kernels.setdefault(key, PackedSiblingLinears(label))
                    gm.add_submodule(name, kernel)
                    call = gm.graph.call_module(name, (x, weights, biases or None))
            if len(group) == 1:
                _replace(gm, first, call)
                replaced[first] = call
            else:
                call.meta = dict(first.meta)
                for i, (node, _w, _b) in enumerate(group):
                    with gm.graph.inserting_before(node):
                        item = gm.graph.call_function(operator.getitem, (call, i))
                    _replace(gm, node, item)
                    replaced[node] = item
            packed.append(name)
    if packed:
        gm.graph.lint()
        gm.recompile()
    return packed


class PackLinears:
    """Pass: the sparse regions' linears read packed weights (skipped when packing is off)."""

    name = "pack_linears"
    reads = frozenset({OP, MODULE_PATH})
    writes = frozenset()

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def configured(self, options) -> PackLinears:
        return PackLinears(options.pack_linears)

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        if not self.enabled:
            return PassResult(note="off")
        packed = 0
        for module in list(gm.modules()):
            if isinstance(module, SparseRegion):
                kernels: dict = {}
                packed += len(pack_graph(module.sparse, kernels))
                pack_graph(module.dense, kernels)
        return PassResult((("sparse linear calls packed", packed),))
