"""Rewrite: attention sites become delta-updated attention modules.

Each site whose q, k, v come from gated regions (through layout ops only) and whose logit
terms are understood is replaced by ``call_module(ExactDeltaAttention | PaperDeltaAttention,
(q, k, v, index_q, index_kv, tables))``, with q, k, v viewed as (B, H, N, d). The index inputs
are the selection outputs of the regions that produced q and k/v: the rows that changed this
frame (None after a dense frame, which initialises the state). Sites that cannot be rewritten
keep their original nodes: dense attention on the buffered q, k, v, exact by construction.

Reads: the AttentionSite records, ``meta[REGION]``. Writes: ``call_module`` nodes
(``evtrace_attention_<i>``); the replaced site nodes become dead and are removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from evtrace.runtime.attention import ConstantBias, DecomposedRelPos, ExactDeltaAttention, PaperDeltaAttention
from evtrace.graph.meta import OP, REGION, TENSOR, TOKENS, OpKind

from .attention_sites import AttentionSite

MODES = ("exact", "paper", "dense")


@dataclass
class SitePlan:
    site: AttentionSite
    mode: str  # what the site becomes: "exact", "paper" or "dense"
    reason: str = ""
    q_region: str = ""
    kv_region: str = ""


def producing_region(node: torch.fx.Node) -> str:
    """The region whose exit feeds ``node`` through layout ops only, or ''."""
    seen = 0
    while isinstance(node, torch.fx.Node) and seen < 32:
        if node.meta.get(REGION):
            return node.meta[REGION]
        if node.meta.get(OP) != OpKind.LAYOUT:
            return ""
        inputs = [a for a in node.all_input_nodes if a.meta.get(TENSOR) is not None or a.meta.get(TOKENS) is not None]
        if len(inputs) != 1:
            return ""
        node = inputs[0]
        seen += 1
    return ""


def plan_sites(sites: list[AttentionSite], mode: str, gated_regions: set[str]) -> list[SitePlan]:
    """Decide per site what the rewrite does, before any region is replaced."""
    plans = []
    for site in sites:
        if mode == "dense":
            plans.append(SitePlan(site, "dense", "attention='dense' was asked for"))
            continue
        if site.dense_reason:
            plans.append(SitePlan(site, "dense", site.dense_reason))
            continue
        q_region = producing_region(site.q)
        k_region = producing_region(site.k)
        v_region = producing_region(site.v)
        if not (q_region and k_region and v_region) or not {q_region, k_region, v_region} <= gated_regions:
            plans.append(SitePlan(site, "dense", "q, k or v is not produced by a gated region"))
        elif k_region != v_region:
            plans.append(SitePlan(site, "dense", "keys and values come from different gates"))
        else:
            plans.append(SitePlan(site, mode, "", q_region, k_region))
    return plans


def _heads(graph: torch.fx.Graph, node: torch.fx.Node, shape: tuple[int, ...]) -> torch.fx.Node:
    if tuple(node.meta[TENSOR].shape) == tuple(shape):
        return node
    return graph.call_method("reshape", (node, tuple(shape)))


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean SDPA mask (True = attend) as an additive logit term."""
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, float("-inf"))
    return mask


def rewrite_site(gm: torch.fx.GraphModule, plan: SitePlan, index: int, index_of_region: dict[str, torch.fx.Node],
                 repair_rows: int) -> str:
    """Replace one site by a delta attention module; returns the module's name."""
    site = plan.site
    graph = gm.graph
    bias, tables = None, ()
    with graph.inserting_before(site.output):
        if site.bias is not None and site.bias.kind == "constant":
            bias = ConstantBias()
            tables = (graph.call_function(additive_mask, (site.bias.inputs[0],)),)
        elif site.bias is not None:
            bias = DecomposedRelPos(site.bias.q_grid, site.bias.k_grid)
            tables = tuple(site.bias.inputs)
        module = (ExactDeltaAttention(site.scale, bias, repair_rows=repair_rows, full_when_cheaper=True)
                  if plan.mode == "exact" else PaperDeltaAttention(site.scale, bias))
        module.site_name = site.name
        name = f"evtrace_attention_{index}"
        gm.add_submodule(name, module)
        shape = site.heads_shape
        module.preallocate(shape, shape[:3] + (site.k.meta[TENSOR].shape[-1],),
                           shape[:3] + (site.v.meta[TENSOR].shape[-1],), site.q.meta[TENSOR].dtype)
        q = _heads(graph, site.q, shape)
        k = _heads(graph, site.k, shape[:3] + (site.k.meta[TENSOR].shape[-1],))
        v = _heads(graph, site.v, shape[:3] + (site.v.meta[TENSOR].shape[-1],))
        call = graph.call_module(name, (q, k, v, index_of_region[plan.q_region], index_of_region[plan.kv_region], tables))
        out = graph.call_method("reshape", (call, tuple(site.output.meta[TENSOR].shape)))
    out.meta[TENSOR] = site.output.meta[TENSOR]
    site.output.replace_all_uses_with(out)
    return name
