"""Cleanup: leave a valid, compiled graph after the rewrite.

Outputs are cloned (they may alias state buffers that the next frame overwrites) and dead nodes
(the replaced regions' and sites' originals, export's SDPA included, which fx alone keeps as
impure) are removed; the runner then puts the nodes in order, lints and recompiles the graph, as
after every rewriting pass.

Reads: ``meta[TENSOR]``. Writes: the graph only.
"""

from __future__ import annotations

import torch
import torch.fx

from evtrace.graph.meta import TENSOR, tensor_info

from .context import PassResult


def clone_outputs(gm: torch.fx.GraphModule) -> None:
    """Hand out copies of the graph's tensor outputs."""
    output = next(n for n in gm.graph.nodes if n.op == "output")

    def clone(arg):
        if isinstance(arg, torch.fx.Node) and (tensor_info(arg) is not None or arg.op == "call_function"):
            with gm.graph.inserting_before(output):
                return gm.graph.call_method("clone", (arg,))
        return arg

    output.args = torch.fx.node.map_arg(output.args, clone)


def is_impure(node: torch.fx.Node) -> bool:
    """Nodes dead-code elimination must keep: graph inputs and outputs, ops that mutate an
    argument, and non-ATen calls fx deems impure. An unused ATen op that only draws random
    numbers (SDPA's dropout makes fx call it impure) is dead: the rewrite replaced it."""
    if node.op in ("placeholder", "output"):
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.is_mutable
    return node.is_impure()


class Cleanup:
    """Pass: cloned outputs, no dead code (then, by the runner: a legal node order, lint,
    recompile)."""

    name = "cleanup"
    reads = frozenset({TENSOR})
    writes = frozenset()
    rewrites = True

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        clone_outputs(gm)
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        return PassResult((("dead nodes removed", before - len(gm.graph.nodes)),))
