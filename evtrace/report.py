"""The report: what the analysis found and what the rewrite will do (or did) with it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch.fx

from evtrace.graph.meta import OP, REGION, ROLE, TENSOR, OpKind, Role, module_path


@dataclass
class LinearEntry:
    node: str
    module: str
    shape: tuple[int, ...]
    status: str  # "sparse" | "dense"
    region: str
    reason: str = ""


@dataclass
class RegionEntry:
    name: str
    space: str
    entries: list[str]
    exits: list[str]
    linears: list[str]
    gated: bool
    reason: str = ""
    policy: str = ""


@dataclass
class SiteEntry:
    name: str
    form: str
    heads: tuple[int, ...] | None
    bias: str
    windowed: bool
    q_from: str
    k_from: str
    v_from: str
    output_projection: str
    mode: str  # what the rewrite does: "exact", "paper", "dense" or "analysis only"
    reason: str = ""


@dataclass
class FallbackEntry:
    node: str
    module: str
    op: str
    reason: str


@dataclass
class Report:
    """Per region and attention site: what is gated, what becomes sparse, what stays dense and why.

    ``str(report)`` is a readable table; ``report.to_dict()`` is JSON-serialisable.
    """

    model: str
    frontend: str
    spaces: list[dict]
    regions: list[RegionEntry]
    sites: list[SiteEntry]
    linears: list[LinearEntry]
    fallbacks: list[FallbackEntry]
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    costs: object = None  # evtrace.cost.model.CostModel: FLOPs per layer and state bytes

    def cost_formula(self) -> str:
        """Each layer's FLOPs (paper convention) as a formula in N, r, D, H, w, with its values."""
        if self.costs is None:
            return "no cost model: " + str(self.extra.get("cost model", "not built"))
        return self.costs.formula()

    def to_dict(self) -> dict:
        return json.loads(json.dumps(_with_str_keys(asdict(self)), default=str))

    @property
    def sparse_linears(self) -> list[LinearEntry]:
        return [x for x in self.linears if x.status == "sparse"]

    def __str__(self) -> str:
        lines = [f"evtrace report: {self.model} (traced with {self.frontend})"]
        for space in self.spaces:
            lines.append(f"  token sequence {space['name']}: {space['batch']} stream(s) x {space['tokens']} tokens"
                         f"{', always-updated prefix ' + str(space['prefix']) if space['prefix'] else ''}"
                         f" (starts at {space['source']})")
        lines.append("")
        lines.append(_table(
            ["region", "gate on", "sparse linears", "status"],
            [[r.name, ", ".join(r.entries), _abbrev(r.linears), ("gated" + (f" {r.policy}" if r.policy else "")) if r.gated else f"dense: {r.reason}"]
             for r in self.regions]))
        lines.append("")
        lines.append(_table(
            ["attention", "form", "heads (B,H,N,d)", "logit terms", "q/k/v from", "then", "mode"],
            [[s.name, s.form, "x".join(map(str, s.heads)) if s.heads else "-", s.bias or "-",
              s.q_from if s.q_from == s.k_from == s.v_from else f"{s.q_from}/{s.k_from}/{s.v_from}",
              s.output_projection or "-", s.mode + (f" ({s.reason})" if s.reason else "")] for s in self.sites]))
        dense = [x for x in self.linears if x.status == "dense"]
        lines.append("")
        lines.append(f"linears: {len(self.sparse_linears)} sparse, {len(dense)} dense")
        for x in dense:
            lines.append(f"  dense {x.module or x.node}: {x.reason}")
        if self.fallbacks:
            lines.append("ops kept dense on token paths:")
            for f in self.fallbacks:
                lines.append(f"  {f.node} ({f.module or '-'}, {f.op}): {f.reason}")
        if self.costs is not None:
            from evtrace.cost.model import cost_table

            lines.append("")
            lines.append(cost_table(self.costs))
        for key, value in self.extra.items():
            lines.append(f"{key}: {value}")
        if self.seconds:
            lines.append("analysis time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _abbrev(items: list[str], limit: int = 4) -> str:
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", +{len(items) - limit}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "(none: " + header[0] + ")"
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    widths = [min(w, 60) for w in widths]

    def fmt(row):
        return "  ".join(str(c)[:60].ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _producer(node: torch.fx.Node) -> str:
    """The module path of the nearest linear that feeds ``node`` through layout ops."""
    seen = 0
    while isinstance(node, torch.fx.Node) and seen < 32:
        if node.meta.get(OP) == OpKind.LINEAR:
            return module_path(node) or node.name
        inputs = [a for a in node.all_input_nodes if a.meta.get(TENSOR) is not None and a.meta.get(ROLE) and a.meta[ROLE].role != Role.NON_TOKEN]
        if not inputs:
            break
        node = inputs[0]
        seen += 1
    return node.name if isinstance(node, torch.fx.Node) else "-"


def _consumer(node: torch.fx.Node) -> str:
    """The module path of the first linear that reads ``node`` through layout ops."""
    frontier = [node]
    for _ in range(16):
        nxt = []
        for n in frontier:
            for user in n.users:
                if user.meta.get(OP) == OpKind.LINEAR:
                    return module_path(user) or user.name
                if user.meta.get(OP) in (OpKind.LAYOUT, OpKind.UNARY):
                    nxt.append(user)
        frontier = nxt
    return ""


def build_report(analysis, site_modes: dict[str, str] | None = None, region_policies: dict[str, str] | None = None,
                 extra: dict | None = None) -> Report:
    """A Report of an :class:`~evtrace.analysis.Analysis`; ``site_modes`` (site name -> mode) and
    ``region_policies`` describe a rewrite when there is one."""
    gm = analysis.gm
    region_by_name = {r.name: r for r in analysis.regions}
    linears = []
    for node in gm.graph.nodes:
        if node.meta.get(OP) != OpKind.LINEAR:
            continue
        region = region_by_name.get(node.meta.get(REGION, ""))
        if region is not None and region.gated:
            status, reason = "sparse", ""
        elif region is not None:
            status, reason = "dense", region.dense_reason
        else:
            status, reason = "dense", _why_not_member(node)
        info = node.meta.get(TENSOR)
        linears.append(LinearEntry(node.name, module_path(node), tuple(info.shape) if info else (), status,
                                   region.name if region else "", reason))
    regions = [RegionEntry(r.name, r.space.name, [e.name for e in r.entries], [e.name for e in r.exits],
                           [module_path(h) or h.name for h in r.heavy], r.gated, r.dense_reason,
                           (region_policies or {}).get(r.name, "")) for r in analysis.regions]
    sites = []
    for s in analysis.sites:
        mode = (site_modes or {}).get(s.name, "analysis only")
        sites.append(SiteEntry(s.name, s.form, s.heads_shape, s.bias.kind if s.bias else "", s.windowed,
                               _producer(s.q), _producer(s.k), _producer(s.v), _consumer(s.output), mode,
                               s.dense_reason))
    fallbacks = [FallbackEntry(n.name, module_path(n), str(n.target) if n.op != "call_function" else getattr(n.target, "__name__", str(n.target)),
                               n.meta[ROLE].reason) for n in gm.graph.nodes
                 if n.meta.get(ROLE) and n.meta[ROLE].role == Role.UNKNOWN]
    spaces = [dict(name=sp.name, batch=sp.batch, tokens=sp.tokens, prefix=list(sp.prefix), source=sp.source)
              for sp in analysis.spaces]
    extra = dict(extra or {})
    try:
        from evtrace.cost.model import build_cost_model

        costs = build_cost_model(analysis, site_modes)
    except Exception as error:  # a cost model it cannot build is a line in the report, never a failure
        costs = None
        extra["cost model"] = f"not built: {type(error).__name__}: {error}"
    return Report(analysis.model_name, analysis.frontend, spaces, regions, sites, linears, fallbacks,
                  dict(analysis.seconds), extra, costs)


def _why_not_member(node: torch.fx.Node) -> str:
    from evtrace.graph.meta import TOKENS

    record = node.meta.get(ROLE)
    layout = node.meta.get(TOKENS)
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


def _with_str_keys(obj):
    """JSON wants string keys; cost formulas are keyed by sympy symbols."""
    if isinstance(obj, dict):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): _with_str_keys(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_with_str_keys(v) for v in obj]
    return obj
