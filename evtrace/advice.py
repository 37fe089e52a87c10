"""Loud when it does not pay: one warning when a transform saves little, with the reasons."""

from __future__ import annotations

import warnings
from collections import Counter

from evtrace.cost.model import priced_cost_model
from evtrace.graph.errors import LowSavingsWarning
from evtrace.graph.plan import AttentionMode, Plan
from evtrace.runtime.policies import All, Policy

#: Below this steady-state FLOP ratio (dense / eventful) a transform is reported as not paying.
MIN_SAVING = 1.2
#: Below this share of attention sites delta-updated, or of linears gated, a transform is reported
#: whatever its FLOP ratio (a dense part that the cost convention prices low still runs).
MIN_SHARE = 0.5


def top_reasons(plan: Plan, limit: int = 3) -> list[str]:
    """The most frequent reasons the plan gives for what stays dense, most frequent first."""
    reasons = Counter()
    for site in plan.sites:
        if not site.delta:
            reasons[f"attention: {site.reason}"] += 1
    for region in plan.regions:
        if not region.gated:
            reasons[f"region: {region.reason}"] += 1
    for linear in plan.linears:
        if linear.reason and not linear.region:
            reasons[f"linear: {linear.reason}"] += 1
    for fallback in plan.fallbacks:
        reasons[f"op '{fallback.op}': {fallback.reason}"] += 1
    return [f"{text} (x{count})" if count > 1 else text for text, count in reasons.most_common(limit)]


def savings(plan: Plan, policy: Policy) -> float | None:
    """Dense / average steady-state FLOPs at ``policy`` (an ``AdaptiveBudget`` at its target);
    None when the policy sets no bound on its count (``Threshold``)."""
    if any(policy.mean_tokens_per_frame(region.space.tokens) is None for region in plan.gated_regions):
        return None
    costs = priced_cost_model(plan, policy, plan.repair_rows)
    steady = costs.steady()
    return costs.dense() / steady if steady else float("inf")


def warn_if_unprofitable(plan: Plan, policy: Policy, stacklevel: int = 3) -> str:
    """Emit one LowSavingsWarning when ``plan`` saves under ``MIN_SAVING`` at ``policy``, delta-
    updates fewer than half of its attention sites (unless dense attention was asked for:
    attention='dense'), or gates fewer than half of its linears, whatever the FLOP ratio;
    returns the message ('' when it pays)."""
    problems = []
    ratio = None if isinstance(policy, All) else savings(plan, policy)  # All(): an exactness check, asked for
    if ratio is not None and ratio < MIN_SAVING:
        problems.append(f"{ratio:.2f}x fewer steady-state FLOPs at {policy!r} (under {MIN_SAVING}x)")
    asked = plan.attention == AttentionMode.DENSE
    delta = sum(site.delta for site in plan.sites)
    if plan.sites and not delta and not asked:
        problems.append(f"none of its {len(plan.sites)} attention sites is delta-updated")
    elif plan.sites and delta < MIN_SHARE * len(plan.sites) and not asked:
        problems.append(f"only {delta} of its {len(plan.sites)} attention sites are delta-updated")
    if not plan.gated_regions:
        problems.append("no token-wise region is gated")
    else:
        gated = sum(linear.sparse for linear in plan.linears)
        if gated < MIN_SHARE * len(plan.linears):
            problems.append(f"only {gated} of its {len(plan.linears)} linears are gated")
    if not problems:
        return ""
    reasons = top_reasons(plan)
    message = (
        f"evtrace.transform of {plan.model} saves little: "
        + "; ".join(problems)
        + ". "
        + ("Top reasons: " + "; ".join(reasons) + ". " if reasons else "")
        + "See emodel.report() for every region and site."
    )
    warnings.warn(message, LowSavingsWarning, stacklevel=stacklevel)
    return message
