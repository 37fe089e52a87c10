"""Rewrite: attention sites become delta-updated attention modules.

Each site whose q, k, v come from gated regions (through layout ops only) and whose logit
terms are understood is replaced by ``call_module(ExactDeltaAttention | PaperDeltaAttention,
(q, k, v, index_q, index_kv, tables))``, with q, k, v viewed as (B, H, N, d). The index inputs
are the selection outputs of the regions that produced q and k/v: the rows that changed this
frame (None after a dense frame, which initialises the state). Sites that cannot be rewritten
keep their original nodes: dense attention on the buffered q, k, v, exact by construction.

Reads: the PLAN (which sites, which mode), the SITES (their nodes) and SELECTIONS records,
``meta[TENSOR]``. Writes: ``call_module`` nodes (``evtrace_attention_<i>``); the replaced site
nodes become dead and are removed by the cleanup.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from evtrace.graph.errors import RewriteError
from evtrace.graph.meta import (
    PLAN,
    SELECTIONS,
    SITES,
    TENSOR,
    TOKENS,
    example_value,
    set_tensor_info,
    tensor_info,
    token_layout,
)
from evtrace.graph.plan import AttentionMode, LogitTerm, SitePlan
from evtrace.runtime.attention import (
    ConstantBias,
    DecomposedRelPos,
    ExactDeltaAttention,
    GroupedDeltaAttention,
    PaperDeltaAttention,
)

from .attention_sites import AttentionSite
from .context import PassResult


def _heads(graph: torch.fx.Graph, node: torch.fx.Node, shape: tuple[int, ...]) -> torch.fx.Node:
    if tuple(tensor_info(node).shape) == tuple(shape):
        return node
    return graph.call_method("reshape", (node, tuple(shape)))


def memory_order(node: torch.fx.Node) -> tuple[int, ...] | None:
    """The dims of ``node``'s traced value from outermost to innermost in memory, where that is
    not their order (export's fused attention hands out (B, N, H, d) memory viewed as (B, H, N,
    d), and the graph's later ``view`` relies on it); None when contiguous or unknown."""
    value = example_value(node)
    if value is None or value.is_contiguous():
        return None
    strides = value.stride()
    order = tuple(sorted(range(value.dim()), key=lambda d: (-strides[d], d)))
    if not value.permute(order).is_contiguous():
        return None
    return order


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean SDPA mask (True = attend) as an additive logit term."""
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, float("-inf"))
    return mask


def rewrite_site(
    gm: torch.fx.GraphModule,
    site: AttentionSite,
    plan: SitePlan,
    index: int,
    selections: dict[str, torch.fx.Node],
    repair_rows: int,
) -> str:
    """Replace one site by a delta attention module; returns the module's name."""
    graph = gm.graph
    live = set(graph.nodes)
    inputs = {"q": site.q, "k": site.k, "v": site.v}
    inputs |= {"the selection of q's region": selections.get(plan.q_region)}
    inputs |= {"the selection of k's and v's region": selections.get(plan.kv_region)}
    for what, node in inputs.items():
        if node not in live:
            raise ValueError(
                f"its {what} ({node.name if node is not None else 'none'}) is not in the graph after the "
                "regions' rewrite (a region took it in)"
            )
    bias, tables = None, ()
    with graph.inserting_before(site.output):
        if site.bias is not None and site.bias.kind == LogitTerm.CONSTANT:
            bias = ConstantBias()
            tables = (graph.call_function(additive_mask, (site.bias.inputs[0],)),)
        elif site.bias is not None:
            bias = DecomposedRelPos(site.bias.q_grid, site.bias.k_grid)
            tables = tuple(site.bias.inputs)
        if plan.mode == AttentionMode.EXACT and site.group_ids is not None:
            space = token_layout(site.q).space
            module = GroupedDeltaAttention(
                site.scale,
                bias,
                group_ids=site.group_ids,
                offset=space.offset,
                streams=space.batch,
                tokens=space.tokens,
                heads=tensor_info(site.q).shape[1] if len(tensor_info(site.q).shape) == 4 else 1,
                repair_rows=repair_rows,
                full_when_cheaper=True,
                site_name=site.name,
            )
        elif plan.mode == AttentionMode.EXACT:
            module = ExactDeltaAttention(
                site.scale, bias, repair_rows=repair_rows, full_when_cheaper=True, site_name=site.name
            )
        else:
            module = PaperDeltaAttention(site.scale, bias, site_name=site.name)
        name = f"evtrace_attention_{index}"
        gm.add_submodule(name, module)
        shape = site.heads_shape
        k_shape = shape[:3] + (plan.k_shape[-1],)
        v_shape = shape[:3] + (plan.v_shape[-1],)
        module.preallocate(shape, k_shape, v_shape, plan.dtype)
        q = _heads(graph, site.q, shape)
        k = _heads(graph, site.k, k_shape)
        v = _heads(graph, site.v, v_shape)
        call = graph.call_module(
            name, (q, k, v, selections[plan.q_region], selections[plan.kv_region], tables)
        )
        out = graph.call_method("reshape", (call, tuple(tensor_info(site.output).shape)))
        order = memory_order(site.output)
        if order is not None:
            inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
            out = graph.call_method("permute", (out, order))
            out = graph.call_method("contiguous", (out,))
            out = graph.call_method("permute", (out, inverse))
    set_tensor_info(out, tensor_info(site.output))
    site.output.replace_all_uses_with(out)
    return name


@dataclass(frozen=True)
class DeltaAttention:
    """Pass: every site the plan delta-updates becomes an attention module.

    Its option: ``repair_rows``, exact attention's per-frame budget of rows recomputed against
    cancellation. A site is joined to its plan entry by name.
    """

    repair_rows: int = 8

    name: ClassVar[str] = "delta_attention"
    reads: ClassVar[frozenset] = frozenset({PLAN, SITES, SELECTIONS, TENSOR, TOKENS})
    writes: ClassVar[frozenset] = frozenset({TENSOR})
    rewrites: ClassVar[bool] = True

    def configured(self, options) -> DeltaAttention:
        return dataclasses.replace(self, repair_rows=options.repair_rows)

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        selections = ctx.get(SELECTIONS)
        plans = {plan.name: plan for plan in ctx.plan.sites}
        sites = ctx.sites
        unplanned = [site.name for site in sites if site.name not in plans]
        if unplanned or len(plans) != len(sites):
            raise ValueError(
                f"the plan's attention sites {sorted(plans)} are not the analysis' sites "
                f"{[site.name for site in sites]}: run the plan pass on this graph first"
            )
        rewritten = []
        for index, site in enumerate(sites):
            plan = plans[site.name]
            if plan.delta:
                try:
                    rewrite_site(gm, site, plan, index, selections, self.repair_rows)
                except Exception as error:
                    raise RewriteError(site.name, error) from error
                rewritten.append(site.name)
        return PassResult((("sites rewritten", len(rewritten)),), tuple(rewritten))
