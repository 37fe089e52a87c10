"""The public entry points."""
from __future__ import annotations

from torch import nn

from evtrace.analysis import analyze
from evtrace.report import Report, build_report


def inspect(model: nn.Module, example_inputs, frontend: str = "auto", *, policy=None, **trace_options) -> Report:
    """Trace ``model`` and report what evtrace would rewrite.

    Per token-wise region: which tensors would be gated and which linears become sparse; per
    attention site: its form, head layout, logit terms, q/k/v producers and whether it can be
    delta-updated exactly or stays dense (and why); every op on a token path that evtrace does
    not understand, with the reason it stays dense.

    Args:
        model: the vision Transformer, in eval mode.
        example_inputs: a tensor or tuple of tensors as the model is called.
        frontend: ``"auto"``, ``"fx"`` or ``"export"`` (see :func:`evtrace.trace`).
        policy: a Policy or an int r: the FLOP and memory columns then show the eventful model
            :func:`evtrace.transform` would build (exact attention) at this policy, and the
            savings; without it they show the original model's cost.
        **trace_options: ``leaf_modules``, ``concrete_args`` (see :func:`evtrace.trace`).

    Returns:
        A :class:`Report`; ``print(report)`` shows the tables, ``report.to_dict()`` the data,
        ``report.cost_formula()`` each layer's FLOPs as a formula.
    """
    analysis = analyze(model, example_inputs, frontend=frontend, **trace_options)
    report = build_report(analysis)
    if policy is not None:
        from passes.delta_attention import plan_sites

        from evtrace.cost.count import tokens_per_frame
        from evtrace.cost.model import build_cost_model
        from evtrace.eventful import _validate_policy
        from evtrace.runtime.policies import as_policy

        policy = as_policy(policy)
        gated = [region for region in analysis.regions if region.gated]
        modes = {plan.site.name: plan.mode for plan in plan_sites(analysis.sites, "exact", {g.name for g in gated})}
        for region in gated:
            _validate_policy(policy, region.space.tokens, region.name)
        budgets = {region.name: tokens_per_frame(policy, region.space.tokens) for region in gated}
        report.costs = build_cost_model(analysis, modes).with_budgets(budgets)
    return report
