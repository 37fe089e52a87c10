"""Walking an analysed graph: the one helper that follows producers back through ops."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx

from evtrace.graph.meta import tensor_info, token_layout


def tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The inputs of ``node`` that are tensors (or token tensors)."""
    return [a for a in node.all_input_nodes if tensor_info(a) is not None or token_layout(a) is not None]


def trace_back(
    node: torch.fx.Node,
    through: Callable[[torch.fx.Node], bool],
    inputs: Callable[[torch.fx.Node], list[torch.fx.Node]] = tensor_inputs,
    limit: int = 32,
) -> torch.fx.Node:
    """The first node, from ``node`` back along its producers, that ``through`` does not pass.

    The walk follows a node's single input (from ``inputs``) while ``through(node)`` holds;
    it stops at a node with several inputs or none, and after ``limit`` steps.
    """
    for _ in range(limit):
        if not through(node):
            return node
        found = inputs(node)
        if len(found) != 1:
            return node
        node = found[0]
    return node
