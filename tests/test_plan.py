"""passes.plan: the plan record, built from the analysis, free of graph nodes."""

import dataclasses

import pytest
import torch.fx

import evtrace
from evtrace.graph.errors import BudgetError
from evtrace.graph.plan import AttentionMode, Plan
from passes.context import PassOptions
from passes.pipeline import ANALYSIS, analyze
from tests.passes_models import TOKENS, WIDTH, Attention, image


def nodes_in(value, seen=None):
    """Every fx Node reachable from a (nested) record."""
    if isinstance(value, torch.fx.Node):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [n for f in dataclasses.fields(value) for n in nodes_in(getattr(value, f.name))]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in nodes_in(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in nodes_in(v)]
    return []


def plan_of(model, **options) -> Plan:
    return analyze(model.eval(), image(), frontend="fx", options=PassOptions(**options), passes=ANALYSIS).plan


def test_the_plan_describes_regions_and_sites_without_nodes():
    plan = plan_of(Attention())
    assert nodes_in(plan) == []
    assert [r.name for r in plan.gated_regions] == ["qkv", "proj"]
    qkv = plan.region("qkv")
    assert qkv.entries[0].shape == (1, TOKENS, WIDTH) and qkv.dim == WIDTH
    assert [(op.fan_in, op.fan_out, op.bias) for op in qkv.ops if op.is_linear] == [(WIDTH, 3 * WIDTH, True)]
    (site,) = plan.sites
    assert site.mode == AttentionMode.EXACT and site.reason == ""
    assert (site.q_region, site.kv_region, site.q_from, site.then) == ("qkv", "qkv", "qkv", "proj")
    assert site.heads_shape == (1, 2, TOKENS, WIDTH // 2)


def test_attention_dense_is_planned_with_its_reason():
    (site,) = plan_of(Attention(), attention=AttentionMode.DENSE).sites
    assert site.mode == AttentionMode.DENSE and site.reason == "attention='dense' was asked for"


def test_queries_from_outside_a_gate_keep_the_site_dense():
    (site,) = plan_of(Attention(q_from_input=True)).sites
    assert site.mode == AttentionMode.DENSE
    assert site.reason == "q, k or v is not produced by a gated region"


def test_a_budget_beyond_the_tokens_is_refused_before_any_rewrite():
    with pytest.raises(
        BudgetError, match=r"TopK\(r=17\) selects 17 tokens per frame at gate 'qkv'.*\[1, 16\]"
    ):
        plan_of(Attention(), policy=evtrace.TopK(TOKENS + 1))
    assert AttentionMode.parse("paper") is AttentionMode.PAPER
    with pytest.raises(ValueError, match="attention must be one of 'exact', 'paper', 'dense', got 'fast'"):
        AttentionMode.parse("fast")
