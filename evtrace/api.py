"""``evtrace.inspect``: what evtrace would rewrite in a model, without rewriting it."""

from __future__ import annotations

import os

from torch import nn

from evtrace.cost.model import build_cost_model, peak_line, priced_cost_model
from evtrace.graph.meta import SITE_MISSES
from evtrace.report import Report, build_report
from evtrace.runtime.policies import as_policy
from passes.context import PassOptions
from passes.pipeline import ANALYSIS, analyze


def inspect(
    model: nn.Module,
    example_inputs,
    frontend: str = "auto",
    *,
    policy=None,
    explain: bool | None = None,
    **trace_options,
) -> Report:
    """Trace ``model`` and report what evtrace would rewrite.

    Per token-wise region: which tensors would be gated and which linears become sparse; per
    attention site: its form, head layout, logit terms, q/k/v producers and the mode
    :func:`evtrace.transform` would give it (exact delta attention or dense, and why); every op
    on a token path that evtrace does not understand, with the reason it stays dense. Runs the
    analysis prefix of ``passes.pipeline.PIPELINE`` (up to the plan), the same passes
    ``transform`` runs.

    Args:
        model: the vision Transformer, in eval mode.
        example_inputs: a tensor or tuple of tensors as the model is called.
        frontend: ``"auto"``, ``"fx"`` or ``"export"`` (see :func:`evtrace.trace`).
        policy: a Policy or an int r: the FLOP and memory columns then show the eventful model
            :func:`evtrace.transform` would build (exact attention) at this policy, and the
            savings; without it they show the original model's cost. A data-dependent budget is
            priced at its average (``AdaptiveBudget`` at its target), with its peak (the latency
            figure) on its own line.
        explain: also show, for every pairwise (query x key) matmul and every other
            token-mixing matmul, which attention pattern matched it, or why none did (the
            ``"attention matches"`` entry of ``report.extra``). ``None`` (the default) reads the
            environment variable ``EVTRACE_EXPLAIN`` (``1`` turns it on).
        **trace_options: ``leaf_modules``, ``concrete_args`` (see :func:`evtrace.trace`).

    Returns:
        A :class:`Report`; ``print(report)`` shows the tables, ``report.to_dict()`` the data,
        ``report.cost_formula()`` each layer's FLOPs as a formula.

    Raises:
        BudgetError: ``policy`` selects a number of tokens outside [1, N] at some gate.
    """
    policy = as_policy(policy) if policy is not None else None
    ctx = analyze(
        model,
        example_inputs,
        frontend=frontend,
        options=PassOptions(policy=policy),
        passes=ANALYSIS,
        **trace_options,
    )
    plan = ctx.plan
    done = {name: str(result) for name, result in ctx.results.items()}
    if policy is None:
        report = build_report(plan, build_cost_model(plan, eventful=False), seconds=ctx.seconds, passes=done)
    else:
        report = build_report(
            plan,
            priced_cost_model(plan, policy),
            {region.name: repr(policy) for region in plan.gated_regions},
            ctx.seconds,
            peak_line(plan, policy),
            done,
        )
    if explain is None:
        explain = os.environ.get("EVTRACE_EXPLAIN", "") == "1"
    if explain:
        report.extra["attention matches"] = explain_matches(ctx)
    return report


def explain_matches(ctx) -> str:
    """One line per attention site found and per matmul that is not one, with the reason."""
    modes = {site.name: site for site in ctx.plan.sites}
    rows = []
    for site in ctx.sites:
        planned = modes.get(site.name)
        mode = planned.mode.value if planned is not None else "-"
        why = f" ({planned.reason})" if planned is not None and planned.reason else ""
        rows.append((site.output.name, site.name, f"site, pattern '{site.form}', {mode}{why}"))
    for miss in ctx.get(SITE_MISSES):
        pattern = f"pattern '{miss.pattern}' failed: " if miss.pattern != "-" else ""
        rows.append((miss.node, miss.module or "-", f"not a site: {pattern}{miss.reason}"))
    if not rows:
        return "no pairwise (query x key) matmul and no token-mixing matmul in the graph"
    return "".join(f"\n  {node} ({where}): {what}" for node, where, what in rows)
