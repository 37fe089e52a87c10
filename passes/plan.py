"""Planning: decide what the rewrite does, and record it as data (:class:`~evtrace.graph.plan.Plan`).

Per attention site, its mode: delta-updated (``exact`` or ``paper``, as asked) when its q, k, v
come from gated regions through layout ops and its logit terms are understood, else ``dense``
with the reason. Per region, per linear, per op no rule understands: what it becomes and why.
Besides, the numbers the cost model needs (the counted ops of each region, the FLOPs outside
regions and sites), so that nothing after the rewrite has to read the graph.

Reads: ``meta[OP]``, ``meta[ROLE]``, ``meta[TOKENS]``, ``meta[TENSOR]``, ``meta[REGION]``, the
SPACES, SITES and REGIONS records. Writes: the PLAN record. The policy's budget is checked at
every gate here, before the graph is touched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from evtrace.graph.meta import (
    FRONTEND,
    MODULE_PATH,
    OP,
    PLAN,
    REGION,
    REGIONS,
    ROLE,
    SITES,
    SPACES,
    STEPS,
    TENSOR,
    TOKENS,
    OpKind,
    Role,
    TokenSpace,
    frontend_of,
    module_path,
    op_kind,
    region_of,
    role,
    tensor_info,
    token_layout,
)
from evtrace.graph.plan import (
    AttentionMode,
    BiasPlan,
    CountedOp,
    FallbackPlan,
    LinearPlan,
    Plan,
    RegionPlan,
    SitePlan,
    TensorPlan,
)
from evtrace.graph.walk import trace_back
from evtrace.runtime.policies import check_budget

from .attention_sites import AttentionSite
from .canonicalize import op_name
from .context import PassResult
from .regions import Region

ADDS = ("add", "add_", "iadd", "sub", "sub_", "isub", "rsub")


def producing_region(node: torch.fx.Node) -> str:
    """The region whose exit feeds ``node`` through row-local ops only (token-wise, layout, token
    slices), or ''.

    Such ops map each token row to itself (or move rows), so a row of ``node`` changes only
    when that token's row of the region's exit changes: the region's selection index covers
    it. Constants on the way (a rotary table, a scale) do not matter; a second region, or an op
    that mixes tokens, does.
    """
    if not isinstance(node, torch.fx.Node):
        return ""
    found: set[str] = set()
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        if region_of(current):
            found.add(region_of(current))
            continue
        record = role(current)
        if record is None or record.role == Role.NON_TOKEN:
            continue
        row_local = record.role in (Role.TOKENWISE, Role.LAYOUT) or (
            record.role == Role.SELECTING and token_layout(current) is not None  # a slice of the tokens
        )
        if not row_local or len(seen) > 256:
            return ""
        frontier.extend(
            a for a in current.all_input_nodes if role(a) is not None and role(a).role != Role.NON_TOKEN
        )
    return found.pop() if len(found) == 1 else ""


def _token_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [
        a
        for a in node.all_input_nodes
        if tensor_info(a) is not None and role(a) is not None and role(a).role != Role.NON_TOKEN
    ][:1]


def _producer(node: torch.fx.Node) -> str:
    """The module path of the nearest linear that feeds ``node`` through its token inputs."""
    found = trace_back(node, lambda n: op_kind(n) != OpKind.LINEAR, _token_inputs)
    if op_kind(found) == OpKind.LINEAR:
        return module_path(found) or found.name
    return found.name


def _consumer(node: torch.fx.Node) -> str:
    """The module path of the first linear that reads ``node`` through layout ops."""
    frontier = [node]
    for _ in range(16):
        following = []
        for n in frontier:
            for user in n.users:
                if op_kind(user) == OpKind.LINEAR:
                    return module_path(user) or user.name
                if op_kind(user) in (OpKind.LAYOUT, OpKind.UNARY):
                    following.append(user)
        frontier = following
    return ""


def _why_not_member(node: torch.fx.Node) -> str:
    """Why a linear is not in any token-wise region."""
    record = role(node)
    layout = token_layout(node)
    if record is None:
        return "not analysed"
    if record.role == Role.NON_TOKEN:
        return "does not act on tokens" + (f" ({record.reason})" if record.reason else "")
    if record.role != Role.TOKENWISE:
        return record.reason or record.role.value
    if layout is not None and not layout.complete:
        return "acts on a subset of the tokens (readout)"
    if layout is not None and not layout.row_major:
        return "tokens and channels interleave in its input"
    return "its input is not a gatherable token tensor"


def _shape(node) -> tuple[int, ...] | None:
    info = tensor_info(node) if isinstance(node, torch.fx.Node) else None
    return tuple(info.shape) if info is not None and not isinstance(info, tuple) else None


def _is_float(node: torch.fx.Node) -> bool:
    info = tensor_info(node)
    return info is not None and not isinstance(info, tuple) and info.dtype.is_floating_point


def _rows(node: torch.fx.Node) -> int:
    layout = token_layout(node)
    shape = _shape(node)
    return math.prod(shape[: layout.token_ndim]) if layout is not None else math.prod(shape[:-1])


def _linear(node: torch.fx.Node, root: torch.nn.Module) -> tuple[int, int, bool]:
    """(in, out, has bias) of a linear node."""
    fan_in, fan_out = _shape(node.args[0])[-1], _shape(node)[-1]
    if node.op == "call_module":
        return fan_in, fan_out, root.get_submodule(str(node.target)).bias is not None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return fan_in, fan_out, bias is not None


def _counted(node: torch.fx.Node, root: torch.nn.Module) -> CountedOp | None:
    """A region op the paper convention counts, per token row."""
    kind = op_kind(node)
    shape = _shape(node)
    if shape is None:
        return None
    if kind == OpKind.LINEAR:
        fan_in, fan_out, bias = _linear(node, root)
        return CountedOp(node.name, _rows(node), fan_in=fan_in, fan_out=fan_out, bias=bias)
    if kind == OpKind.BINARY and op_name(node) in ADDS and _is_float(node):
        rows = _rows(node)
        return CountedOp(node.name, rows, adds=math.prod(shape) // rows)
    return None


def other_op_flops(node: torch.fx.Node, root: torch.nn.Module) -> int:
    """FLOPs of an op outside regions and sites, from its traced shapes."""
    kind = op_kind(node)
    shape = _shape(node)
    if shape is None:
        return 0
    if kind == OpKind.LINEAR:
        fan_in, fan_out, bias = _linear(node, root)
        return math.prod(shape[:-1]) * (fan_in * fan_out + (fan_out if bias else 0))
    if kind == OpKind.BINARY and op_name(node) in ADDS and _is_float(node):
        return math.prod(shape)
    if kind == OpKind.MATMUL:
        return math.prod(shape) * _shape(node.args[0])[-1]
    return 0


def _tensor(node: torch.fx.Node) -> TensorPlan:
    return TensorPlan(node.name, _shape(node), tensor_info(node).dtype, _rows(node))


def _space_dims(regions: list[Region]) -> dict[str, int]:
    """Channels D of each token sequence: the input width of its first linear."""
    dims: dict[str, int] = {}
    for region in regions:
        for node in region.nodes:
            if op_kind(node) == OpKind.LINEAR:
                dims.setdefault(region.space.name, _shape(node.args[0])[-1])
                break
    return dims


def _site_space(site: AttentionSite, spaces: list[TokenSpace]) -> TokenSpace:
    layout = token_layout(site.q)
    if layout is not None:
        return layout.space
    shape = _shape(site.q)
    bh = math.prod(shape[:-2])
    return next((s for s in spaces if s.tokens == shape[-2] and bh % s.batch == 0), spaces[-1])


def _site_mode(
    site: AttentionSite, mode: AttentionMode, gated: set[str]
) -> tuple[AttentionMode, str, str, str]:
    """(mode, reason, q region, k/v region) of one site."""
    if mode == AttentionMode.DENSE:
        return AttentionMode.DENSE, "attention='dense' was asked for", "", ""
    if site.dense_reason:
        return AttentionMode.DENSE, site.dense_reason, "", ""
    if site.group_ids is not None and mode == AttentionMode.PAPER:
        return AttentionMode.DENSE, "grouped (windowed) attention is delta-updated in exact mode only", "", ""
    q_region, k_region, v_region = (producing_region(n) for n in (site.q, site.k, site.v))
    if not (q_region and k_region and v_region) or not {q_region, k_region, v_region} <= gated:
        return AttentionMode.DENSE, "q, k or v is not produced by a gated region", "", ""
    if k_region != v_region:
        return AttentionMode.DENSE, "keys and values come from different gates", "", ""
    return mode, "", q_region, k_region


def _site(site: AttentionSite, spaces, dims, mode: AttentionMode, gated: set[str]) -> SitePlan:
    space = _site_space(site, spaces)
    chosen, reason, q_region, kv_region = _site_mode(site, mode, gated)
    bias = None if site.bias is None else BiasPlan(site.bias.kind, site.bias.q_grid, site.bias.k_grid)
    return SitePlan(
        name=site.name,
        form=site.form,
        q_shape=_shape(site.q),
        k_shape=_shape(site.k),
        v_shape=_shape(site.v),
        dtype=tensor_info(site.q).dtype,
        scale=site.scale,
        bias=bias,
        windowed=site.windowed,
        heads_shape=site.heads_shape,
        space=space,
        dim=dims.get(space.name, 0),
        mode=chosen,
        reason=reason,
        q_region=q_region,
        kv_region=kv_region,
        q_from=_producer(site.q),
        k_from=_producer(site.k),
        v_from=_producer(site.v),
        then=_consumer(site.output),
        grouped=site.group_ids is not None,
    )


def _op_label(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def build_plan(
    gm: torch.fx.GraphModule,
    spaces: list[TokenSpace],
    sites: list[AttentionSite],
    regions: list[Region],
    *,
    mode: AttentionMode = AttentionMode.EXACT,
    policy=None,
    repair_rows: int = 8,
    model_name: str = "",
    frontend: str = "fx",
    keep_dense: tuple[tuple[str, str], ...] = (),
    step_search=None,
) -> Plan:
    """The plan of an analysed graph; see the module docstring. ``keep_dense`` names regions
    and sites not to rewrite, with the reason the report gives.

    Raises:
        BudgetError: ``policy`` selects a number of tokens outside [1, N] at some gate.
    """
    forced = dict(keep_dense)
    for record in [*regions, *sites]:
        if record.name in forced:
            record.dense_reason = forced[record.name]
    dims = _space_dims(regions)
    gated = {r.name for r in regions if r.gated}
    if policy is not None:
        for region in regions:
            if region.gated:
                check_budget(policy, region.space.tokens, region.name)
    region_plans = []
    for region in regions:
        ops = tuple(op for op in (_counted(n, gm) for n in region.nodes) if op is not None)
        region_plans.append(
            RegionPlan(
                name=region.name,
                space=region.space,
                entries=tuple(_tensor(e) for e in region.entries),
                exits=tuple(_tensor(x) for x in region.exits),
                linears=tuple(module_path(h) or h.name for h in region.heavy),
                ops=ops,
                dim=dims.get(region.space.name, 1),
                reason=region.dense_reason,
            )
        )
    site_plans = tuple(_site(s, spaces, dims, mode, gated) for s in sites)

    by_name = {r.name: r for r in regions}
    linears = []
    for node in gm.graph.nodes:
        if op_kind(node) != OpKind.LINEAR:
            continue
        region = by_name.get(region_of(node) or "")
        reason = region.dense_reason if region is not None else _why_not_member(node)
        info = tensor_info(node)
        linears.append(
            LinearPlan(
                node.name,
                module_path(node),
                tuple(info.shape) if info else (),
                region.name if region else "",
                reason,
            )
        )
    fallbacks = tuple(
        FallbackPlan(n.name, module_path(n), _op_label(n), role(n).reason)
        for n in gm.graph.nodes
        if role(n) is not None and role(n).role == Role.UNKNOWN
    )

    inside = {n for region in regions for n in region.nodes} | {n for site in sites for n in site.nodes}
    other: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node in inside or node.op in ("placeholder", "output", "get_attr"):
            continue
        flops = other_op_flops(node, gm)
        if flops:
            key = module_path(node) or node.name
            other[key] = other.get(key, 0) + flops
    windows = tuple(
        sorted({s.bias.q_grid[0] for s in sites if s.windowed and s.bias is not None and s.bias.q_grid})
    )
    return Plan(
        model=model_name,
        frontend=frontend,
        spaces=tuple(spaces),
        regions=tuple(region_plans),
        sites=site_plans,
        linears=tuple(linears),
        fallbacks=fallbacks,
        other_flops=tuple(other.items()),
        windows=windows,
        repair_rows=repair_rows,
        attention=mode,
        step_search=step_search,
    )


@dataclass(frozen=True)
class Planning:
    """Pass: the plan record (modes, reasons, shapes, counted ops); checks the policy's budget.

    Its options: the attention ``mode``, the ``policy`` whose budget is checked (None: none),
    ``repair_rows`` and ``keep_dense`` (names and reasons of regions and sites not to rewrite).
    """

    mode: AttentionMode = AttentionMode.EXACT
    policy: Any = None
    repair_rows: int = 8
    keep_dense: tuple[tuple[str, str], ...] = ()

    name: ClassVar[str] = "plan"
    reads: ClassVar[frozenset] = frozenset(
        {OP, ROLE, TOKENS, TENSOR, REGION, MODULE_PATH, FRONTEND, SPACES, STEPS, SITES, REGIONS}
    )
    writes: ClassVar[frozenset] = frozenset({PLAN})

    def configured(self, options) -> Planning:
        return dataclasses.replace(
            self,
            mode=options.attention,
            policy=options.policy,
            repair_rows=options.repair_rows,
            keep_dense=options.keep_dense,
        )

    def run(self, gm: torch.fx.GraphModule, ctx) -> PassResult:
        plan = build_plan(
            gm,
            ctx.spaces,
            ctx.sites,
            ctx.regions,
            mode=self.mode,
            policy=self.policy,
            repair_rows=self.repair_rows,
            model_name=ctx.model_name,
            frontend=frontend_of(gm),
            keep_dense=self.keep_dense,
            step_search=ctx.find(STEPS),
        )
        ctx.put(PLAN, plan)
        gated = plan.gated_regions
        delta = [s for s in plan.sites if s.delta]
        return PassResult(
            (
                ("regions gated", len(gated)),
                ("regions dense", len(plan.regions) - len(gated)),
                ("sites delta-updated", len(delta)),
                ("sites dense", len(plan.sites) - len(delta)),
            )
        )
