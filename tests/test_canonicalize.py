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


class Spellings(nn.Module):
    """The same arithmetic spelled every way: operator, in-place method, torch function; the
    in-place ops whose mutation someone could observe must stay in place."""

    def forward(self, x):
        y = x * 2.0
        z = torch.add(y, 1.0).mul_(3.0)  # in-place on a fresh tensor nobody else reads
        w = z / 4.0  # operator.truediv
        w.sub_(0.5)  # w is read below: observable
        kept = w.clone()
        view = kept[0]
        view.add_(1.0)  # a view of kept, which is read below: observable
        return w.div(2.0) + kept.sum()


def test_spellings_become_one_form_and_in_place_becomes_out_of_place_where_unobservable():
    from passes.canonicalize import op_name, raw_name

    model, x = Spellings(), torch.randn(2, 3)
    gm = trace(model, x, frontend="fx")
    canonicalize(gm)
    spelled = {n.name: (raw_name(n), op_name(n)) for n in gm.graph.nodes if n.op.startswith("call_")}
    assert spelled["mul_"] == ("mul", "mul")  # .mul_ rewritten to .mul
    assert spelled["truediv"] == ("truediv", "div") and spelled["div"] == ("div", "div")
    assert spelled["sub_"] == ("sub_", "sub") and spelled["add_"] == ("add_", "add")  # kept in place
    assert torch.equal(gm(x), model(x))
