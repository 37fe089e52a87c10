"""count_flops on ops without a rule, rules added by users, and what the paper convention leaves out.

Exact figures: an op no rule covers costs one FLOP per output element and is listed in
``generic_ops``, in both conventions; ``evtrace.register_flop_rule`` replaces that (or a built-in
rule) in one convention or both; convolutions, free in the paper convention, are reported as
left out (fvcore's MACs) and warned about above 10 % of the model; a budget no larger than the
always-updated prefix names its gates.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import evtrace
import models_zoo
from evtrace.cost.count import count_flops, registered_rule
from tests.models import small_dinov2

pytestmark = pytest.mark.usefixtures("one_thread")


class _Uncommon(nn.Module):
    """cumsum and hardswish have no rule in either convention; sin is pointwise (free in the paper
    convention) and has no fvcore handle; the two adds are counted in the paper convention only."""

    def forward(self, x):
        return torch.cumsum(x, dim=-1) + nn.functional.hardswish(x) + torch.sin(x)


X = torch.randn(2, 8)  # 16 elements


@pytest.fixture
def clean_rules():
    from evtrace.cost import count

    saved = {k: dict(v) for k, v in count._USER_RULES.items()}
    yield
    count._USER_RULES.clear()
    count._USER_RULES.update(saved)


def test_ops_without_a_rule_cost_one_flop_per_output_element_and_are_listed():
    paper = count_flops(_Uncommon(), X, "paper")
    assert paper.generic_ops == {"aten::cumsum": 16, "aten::hardswish": 16}
    assert paper.total == 16 + 16 + 2 * 16  # generic ops + the two adds
    fvcore = count_flops(_Uncommon(), X, "fvcore")
    assert fvcore.generic_ops == {"aten::cumsum": 16, "aten::hardswish": 16, "aten::sin": 16}
    assert fvcore.total == 3 * 16  # adds are free in fvcore's convention
    assert "aten::cumsum (16)" in str(paper)


def test_ops_with_a_rule_are_not_listed():
    model, x = small_dinov2()
    for convention in ("paper", "fvcore"):
        assert count_flops(model, x, convention).generic_ops == {}


def test_a_registered_rule_replaces_the_generic_one_in_both_conventions(clean_rules):
    evtrace.register_flop_rule(torch.ops.aten.cumsum, lambda args, out: 3 * out.numel())
    paper = count_flops(_Uncommon(), X, "paper")
    assert paper.generic_ops == {"aten::hardswish": 16}
    assert paper.total == 48 + 16 + 32
    fvcore = count_flops(_Uncommon(), X, "fvcore")
    assert fvcore.generic_ops == {"aten::hardswish": 16, "aten::sin": 16}
    assert fvcore.total == 48 + 16 + 16


def test_a_rule_sees_the_shapes_and_constants_of_the_call(clean_rules):
    seen = {}

    def rule(args, out):
        seen.setdefault("shapes", []).append((tuple(args[0].shape), args[1], tuple(out.shape)))
        return 5

    evtrace.register_flop_rule("aten::cumsum", rule)
    assert count_flops(_Uncommon(), X, "paper").total == 5 + 16 + 32
    assert count_flops(_Uncommon(), X, "fvcore").total == 5 + 16 + 16
    assert set(seen["shapes"]) == {((2, 8), -1, (2, 8))}  # with the op's dim argument, in both


def test_a_rule_for_one_convention_and_removing_it(clean_rules):
    evtrace.register_flop_rule("aten.sin", lambda args, out: 0, convention="fvcore")
    assert count_flops(_Uncommon(), X, "fvcore").generic_ops == {"aten::cumsum": 16, "aten::hardswish": 16}
    assert registered_rule("sin", "paper") is None
    evtrace.register_flop_rule("sin", None, convention="fvcore")
    assert registered_rule(torch.ops.aten.sin.default, "fvcore") is None
    assert "aten::sin" in count_flops(_Uncommon(), X, "fvcore").generic_ops


def test_a_rule_can_replace_a_built_in_one(clean_rules):
    model, x = small_dinov2()
    before = count_flops(model, x)
    evtrace.register_flop_rule(torch.ops.aten.add, lambda args, out: 0, convention="paper")
    after = count_flops(model, x)
    assert after.total < before.total
    evtrace.register_flop_rule(torch.ops.aten.add, None)
    assert count_flops(model, x).total == before.total


def test_bad_rules_are_refused_naming_the_op(clean_rules):
    with pytest.raises(ValueError, match="'paper', 'fvcore' or 'both'"):
        evtrace.register_flop_rule("cumsum", lambda a, o: 1, convention="macs")
    with pytest.raises(TypeError, match="function"):
        evtrace.register_flop_rule("cumsum", 3)
    with pytest.raises(TypeError, match="ATen op"):
        evtrace.register_flop_rule(42, lambda a, o: 1)
    evtrace.register_flop_rule("cumsum", lambda a, o: -1)
    for convention in ("paper", "fvcore"):
        with pytest.raises(TypeError, match=r"aten::cumsum returned -1; it must return a number >= 0"):
            count_flops(_Uncommon(), X, convention)


class _ConvNeck(nn.Module):
    """A 3x3 convolution neck on a linear's tokens: free in the paper convention."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.neck = nn.Conv2d(16, 32, 3, padding=1)

    def forward(self, x):  # x (1, 64, 16): 8 x 8 tokens
        y = self.fc(x).transpose(1, 2).reshape(1, 16, 8, 8)
        return self.neck(y)


def test_convolutions_left_out_of_the_paper_convention_are_reported_and_warned():
    x = torch.randn(1, 64, 16)
    with pytest.warns(evtrace.PaperConventionWarning, match=r"leaves out 94 % .* neck"):
        count = count_flops(_ConvNeck().eval(), x)
    assert count.total == 64 * 16 * 16 + 64 * 16  # the linear: MACs and bias adds
    assert count.left_out == 64 * 32 * 16 * 9  # output elements x input channels x kernel
    assert count.left_out_per_layer == {"neck": count.left_out}
    assert "leaves out 94 %" in str(count)
    fvcore = count_flops(_ConvNeck().eval(), x, "fvcore")
    assert fvcore.total == 64 * 16 * 16 + count.left_out  # fvcore counts the convolution


def test_a_patch_embedding_under_ten_percent_is_not_warned():
    model = models_zoo.vit(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=0)
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", evtrace.PaperConventionWarning)
        count = count_flops(model.eval(), x)
        emodel = evtrace.transform(model.eval(), x, policy=evtrace.TopFraction(0.5))
        steady = count_flops(emodel, x)
    assert count.left_out == 16 * 3 * 8 * 8 * 64 and count.left_out_share < 0.1
    assert steady.left_out == count.left_out  # the stem runs densely every frame


def test_a_budget_within_the_prefix_names_its_gates():
    model, x = small_dinov2()  # class token + 2 registers: 3 always updated
    with pytest.warns(evtrace.FrozenTokensWarning):
        frozen = evtrace.transform(model, x, policy=3)
    count = count_flops(frozen, x)
    assert set(count.frozen_gates) == set(count.tokens_per_gate) and count.frozen_gates
    assert all(r == 3 for r in count.tokens_per_gate.values())  # what runs: the prefix rows
    assert "every patch token is frozen" in str(count)
    assert count_flops(frozen, x, policy=4).frozen_gates == ()
