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

import torch
import torch.fx

from evtrace.graph.errors import RewriteError
from evtrace.graph.meta import PLAN, SELECTIONS, SITES, TENSOR, set_tensor_info, tensor_info, token_layout
from evtrace.graph.plan import AttentionMode, LogitTerm, SitePlan
from evtrace.runtime.attention import (
    ConstantBias,
    DecomposedRelPos,
    ExactDeltaAttention,
    GroupedDeltaAttention,
    PaperDeltaAttention,
)

from .attention_sites import AttentionSite


def _heads(graph: torch.fx.Graph, node: torch.fx.Node, shape: tuple[int, ...]) -> torch.fx.Node:
    if tuple(tensor_info(node).shape) == tuple(shape):
        return node
    return graph.call_method("reshape", (node, tuple(shape)))


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
    set_tensor_info(out, tensor_info(site.output))
    site.output.replace_all_uses_with(out)
    return name


class DeltaAttention:
    """Pass: every site the plan delta-updates becomes an attention module."""

    name = "delta_attention"
    reads = frozenset({PLAN, SITES, SELECTIONS, TENSOR})
    writes = frozenset()

    def run(self, gm: torch.fx.GraphModule, ctx) -> None:
        selections = ctx.get(SELECTIONS)
        for index, (site, plan) in enumerate(zip(ctx.sites, ctx.plan.sites)):
            if plan.delta:
                try:
                    rewrite_site(gm, site, plan, index, selections, ctx.options.repair_rows)
                except Exception as error:
                    raise RewriteError(site.name, error) from error
