"""Cleanup: leave a valid, compiled graph after the rewrite.

Outputs are cloned (they may alias state buffers that the next frame overwrites), dead nodes
(the replaced regions' and sites' originals) are removed, the node order is legalised, the
graph is linted and recompiled.

Reads: ``meta[TENSOR]``. Writes: the graph only.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.tools_common import legalize_graph

from evtrace.graph.meta import TENSOR, tensor_info


def clone_outputs(gm: torch.fx.GraphModule) -> None:
    """Hand out copies of the graph's tensor outputs."""
    output = next(n for n in gm.graph.nodes if n.op == "output")

    def clone(arg):
        if isinstance(arg, torch.fx.Node) and (tensor_info(arg) is not None or arg.op == "call_function"):
            with gm.graph.inserting_before(output):
                return gm.graph.call_method("clone", (arg,))
        return arg

    output.args = torch.fx.node.map_arg(output.args, clone)


class Cleanup:
    """Pass: cloned outputs, no dead code, a legal node order, lint, recompile."""

    name = "cleanup"
    reads = frozenset({TENSOR})
    writes = frozenset()

    def run(self, gm: torch.fx.GraphModule, ctx) -> None:
        clone_outputs(gm)
        gm.graph.eliminate_dead_code()
        legalize_graph(gm)
        gm.graph.lint()
        gm.recompile()
