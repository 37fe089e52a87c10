"""Fold shape computations to constants.

The rewrite runs some nodes on gathered rows, whose shapes differ from the traced ones; a
``B, N, C = x.shape`` read from such a node would give the wrong N to every later reshape.
Eventful graphs are specialised to the traced input shape anyway (state is preallocated for
it), so every ``x.shape`` / ``x.size(i)`` and the Python arithmetic on it becomes the literal
it evaluated to.

Reads: ``meta[OP]``, ``meta[TENSOR]``. Writes: replaces SHAPE nodes by literals, erases them.
"""

from __future__ import annotations

import torch
import torch.fx

from evtrace.graph.meta import OP, TENSOR, OpKind, op_kind, tensor_info

from .context import PassResult


def _stand_in(node: torch.fx.Node):
    info = tensor_info(node)
    if info is None or isinstance(info, tuple):
        return None
    return torch.empty(info.shape, dtype=info.dtype, device="meta")


def fold_shapes(gm: torch.fx.GraphModule) -> int:
    """Replace every SHAPE node of ``gm`` by its value; returns how many were folded."""
    values: dict[torch.fx.Node, object] = {}
    folded = 0
    for node in list(gm.graph.nodes):
        if op_kind(node) != OpKind.SHAPE:
            continue

        def load(arg):
            if isinstance(arg, torch.fx.Node):
                if arg in values:
                    return values[arg]
                return _stand_in(arg)
            return arg

        args = torch.fx.node.map_aggregate(node.args, load)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, load)
        if node.op == "call_method":
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "call_function":
            value = node.target(*args, **kwargs)
        else:
            continue
        if isinstance(value, torch.Size):
            value = tuple(int(v) for v in value)
        if isinstance(value, torch.SymInt):
            value = int(value)
        values[node] = value
    for node in reversed(list(values)):
        node.replace_all_uses_with(values[node])  # works for literals too: users' args are remapped
        if not node.users:
            gm.graph.erase_node(node)
            folded += 1
    gm.graph.lint()
    gm.recompile()
    return folded


class FoldShapes:
    """Pass: shape reads become literals (the rewrite runs nodes on gathered rows)."""

    name = "fold_shapes"
    reads = frozenset({OP, TENSOR})
    writes = frozenset()
    rewrites = True

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        return PassResult((("shape reads folded", fold_shapes(gm)),))
