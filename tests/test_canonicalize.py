"""passes.canonicalize: one OpKind per node, whichever front end traced the model."""

import torch
import torch.nn.functional as F
from torch import nn

from evtrace.graph.meta import OpKind, op_kind
from evtrace.graph.tracer import trace
from passes.canonicalize import canonicalize
from tests.passes_models import TokenMLP, image


def kinds(gm):
    return [op_kind(n) for n in gm.graph.nodes]


def test_both_front_ends_spell_the_model_alike():
    model, x = TokenMLP().eval(), image()
    found = {}
    for frontend in ("fx", "export"):
        gm = trace(model, x, frontend=frontend)
        counts = canonicalize(gm)
        assert sum(counts.values()) == len(gm.graph.nodes)
        found[frontend] = {k: counts.get(k, 0) for k in (OpKind.LINEAR, OpKind.CONV, OpKind.LAYER_NORM)}
    assert found["fx"] == found["export"] == {OpKind.LINEAR: 2, OpKind.CONV: 1, OpKind.LAYER_NORM: 1}


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        a = F.linear(x, self.weight)  # a linear by function
        b = x @ x.transpose(-2, -1)  # a product of activations: a matmul, never a linear
        return a.sum() + b.sum() + torch.cumsum(x, 0).sum()


def test_function_linears_matmuls_and_unknown_ops():
    gm = trace(Mixed(), torch.randn(3, 4), frontend="fx")
    canonicalize(gm)
    by_name = {n.name: op_kind(n) for n in gm.graph.nodes}
    assert by_name["linear"] == OpKind.LINEAR
    assert by_name["matmul"] == OpKind.MATMUL
    assert by_name["cumsum"] == OpKind.UNKNOWN
    assert by_name["x"] == OpKind.INPUT and by_name["output"] == OpKind.OUTPUT
    assert by_name["weight"] == OpKind.PARAM
