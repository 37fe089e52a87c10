"""passes.fold_shapes: shape reads and the arithmetic on them become literals."""

import torch

from evtrace.graph.meta import OpKind, op_kind
from evtrace.graph.tracer import trace
from passes.canonicalize import canonicalize
from passes.fold_shapes import fold_shapes
from tests.passes_models import ShapeReads, TokenMLP, image


def test_shape_reads_are_folded_and_numerics_kept():
    model, x = ShapeReads().eval(), image()
    gm = trace(model, x, frontend="fx")
    canonicalize(gm)
    shape_nodes = [n for n in gm.graph.nodes if op_kind(n) == OpKind.SHAPE]
    assert shape_nodes, "the model reads shapes: the test needs SHAPE nodes to fold"
    folded = fold_shapes(gm)
    assert folded == len(shape_nodes)
    assert not [n for n in gm.graph.nodes if op_kind(n) == OpKind.SHAPE]
    reshape = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape")
    assert reshape.args[1:] == (1, 16, 2, 4)  # literals, not nodes
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_a_graph_without_shape_reads_is_left_alone():
    model, x = TokenMLP().eval(), image()
    gm = trace(model, x, frontend="fx")
    canonicalize(gm)
    before = [n.name for n in gm.graph.nodes]
    assert fold_shapes(gm) == 0
    assert [n.name for n in gm.graph.nodes] == before
