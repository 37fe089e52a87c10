"""evtrace.advice: transform warns, once and with its reasons, when the rewrite saves little."""

import warnings

import pytest

import evtrace
from evtrace.advice import savings, top_reasons
from evtrace.graph.errors import LowSavingsWarning
from tests.passes_models import Attention, NoLinear, TokenMLP, image


def transform_warnings(model, policy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emodel = evtrace.transform(model.eval(), image(), policy=policy)
    return emodel, [str(w.message) for w in caught if issubclass(w.category, LowSavingsWarning)]


def test_no_warning_when_the_rewrite_pays():
    emodel, found = transform_warnings(Attention(), evtrace.TopK(4))
    assert found == []
    assert savings(emodel.plan, evtrace.TopK(4)) > 1.2


def test_a_model_with_nothing_to_gate_warns_with_the_reason():
    _, found = transform_warnings(NoLinear(), evtrace.TopK(4))
    assert len(found) == 1
    assert "no token-wise region is gated" in found[0]
    assert "region: no linear inside: gating would cost more than it saves" in found[0]


def test_attention_sites_that_all_stay_dense_are_named():
    emodel, found = transform_warnings(Attention(q_from_input=True), evtrace.TopK(4))
    assert len(found) == 1 and "none of its 1 attention sites is delta-updated" in found[0]
    assert "attention: q, k or v is not produced by a gated region" in top_reasons(emodel.plan)


def test_a_budget_that_saves_little_warns_but_all_does_not():
    _, found = transform_warnings(TokenMLP(), evtrace.TopK(15))  # 15 of 16 tokens
    assert len(found) == 1 and "fewer steady-state FLOPs at TopK(r=15) (under 1.2x)" in found[0]
    _, found = transform_warnings(TokenMLP(), evtrace.All())
    assert found == []
    with pytest.warns(LowSavingsWarning):
        evtrace.transform(TokenMLP().eval(), image(), policy=16)


def test_attention_dense_when_asked_for_is_not_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emodel = evtrace.transform(Attention().eval(), image(), policy=evtrace.TopK(4), attention="dense")
    assert not [w for w in caught if issubclass(w.category, LowSavingsWarning)]
    assert emodel.plan.attention == evtrace.AttentionMode.DENSE
