"""The report: what the analysis found and what the rewrite does (or would do) with it.

Built on demand from the plan (:class:`evtrace.graph.plan.Plan`) and the cost model; it reads
no graph, so it can be made at any time after planning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from evtrace.cost.model import CostModel
from evtrace.graph.plan import Plan


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
    mode: str  # what the rewrite does: "exact", "paper" or "dense"
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
    costs: CostModel | None = None  # FLOPs per layer and state bytes
    time_steps: str = ""  # the stream inside each call, or what the time-step analysis found
    passes: dict[str, str] = field(default_factory=dict)  # what each pass did, by pass name

    def cost_formula(self) -> str:
        """Each layer's FLOPs (paper convention) as a formula in N, r, D, H, w, with its values."""
        if self.costs is None:
            return "no cost model"
        return self.costs.formula()

    def to_dict(self) -> dict:
        return json.loads(json.dumps(_with_str_keys(asdict(self)), default=str))

    @property
    def sparse_linears(self) -> list[LinearEntry]:
        return [x for x in self.linears if x.status == "sparse"]

    def __str__(self) -> str:
        lines = [f"evtrace report: {self.model} (traced with {self.frontend})"]
        for space in self.spaces:
            prefix = f", always-updated prefix {space['prefix']}" if space["prefix"] else ""
            lines.append(
                f"  token sequence {space['name']}: {space['batch']} stream(s) x {space['tokens']} tokens"
                f"{prefix} (starts at {space['source']})"
            )
        if self.time_steps:
            lines.append(f"  time steps: {self.time_steps}")
        lines.append("")
        lines.append(
            _table(
                ["region", "gate on", "sparse linears", "status"],
                [
                    [
                        r.name,
                        ", ".join(r.entries),
                        _abbrev(r.linears),
                        ("gated" + (f" {r.policy}" if r.policy else "")) if r.gated else f"dense: {r.reason}",
                    ]
                    for r in self.regions
                ],
            )
        )
        lines.append("")
        lines.append(
            _table(
                ["attention", "form", "heads (B,H,N,d)", "logit terms", "q/k/v from", "then", "mode"],
                [
                    [
                        s.name,
                        s.form,
                        "x".join(map(str, s.heads)) if s.heads else "-",
                        s.bias or "-",
                        s.q_from if s.q_from == s.k_from == s.v_from else f"{s.q_from}/{s.k_from}/{s.v_from}",
                        s.output_projection or "-",
                        s.mode + (f" ({s.reason})" if s.reason else ""),
                    ]
                    for s in self.sites
                ],
            )
        )
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
            lines.append("")
            lines.append(cost_table(self.costs))
        for key, value in self.extra.items():
            lines.append(f"{key}: {value}")
        if self.passes:
            lines.append("analysis: " + "; ".join(f"{k}: {v}" for k, v in self.passes.items()))
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


def _bytes(value: int) -> str:
    return f"{value / 1e6:.2f} MB" if value else "-"


def cost_table(model: CostModel) -> str:
    """The report's FLOP and memory columns, per layer, and the savings line."""
    rows = []
    for layer in model.layers:
        rows.append(
            [
                layer.name,
                layer.kind,
                f"{layer.dense_flops / 1e9:.4f}",
                f"{layer.steady_flops / 1e9:.4f}",
                _bytes(layer.state_bytes),
                _bytes(layer.paper_state_bytes),
            ]
        )
    table = _table(
        ["layer", "kind", "dense GFLOPs", "steady GFLOPs", "state (ours)", "state (paper layout)"], rows
    )
    dense, steady = model.dense(), model.steady()
    lines = [table]
    per = f"call ({model.steps} time steps)" if model.steps else "frame"
    if model.eventful:
        ratio = dense / steady if steady else float("inf")
        first = "first call" if model.steps else "first frame"
        lines.append(
            f"FLOPs per {per} (paper convention): dense {dense / 1e9:.3f} G, {first} "
            f"{model.first_frame() / 1e9:.3f} G, steady {steady / 1e9:.3f} G: {ratio:.2f}x fewer"
        )
        lines.append(
            f"state (all streams): ours {_bytes(model.state_bytes())}, "
            f"the paper's layout {_bytes(model.paper_state_bytes())}"
        )
    else:
        lines.append(f"FLOPs per {per} (paper convention): {dense / 1e9:.3f} G")
    return "\n".join(lines)


def build_report(
    plan: Plan,
    costs: CostModel | None = None,
    policies: dict[str, str] | None = None,
    seconds: dict[str, float] | None = None,
    extra: dict | None = None,
    passes: dict[str, str] | None = None,
) -> Report:
    """A Report of ``plan``; ``policies`` (region name -> policy) describes the gates in force;
    ``passes`` (pass name -> what it did) makes the analysis line."""
    policies = policies or {}
    linears = [
        LinearEntry(x.node, x.module, x.shape, "sparse" if x.sparse else "dense", x.region, x.reason)
        for x in plan.linears
    ]
    regions = [
        RegionEntry(
            r.name,
            r.space.name,
            [e.name for e in r.entries],
            [e.name for e in r.exits],
            list(r.linears),
            r.gated,
            r.reason,
            policies.get(r.name, ""),
        )
        for r in plan.regions
    ]
    sites = [
        SiteEntry(
            s.name,
            s.form,
            s.heads_shape,
            s.bias.kind.value if s.bias else "",
            s.windowed,
            s.q_from,
            s.k_from,
            s.v_from,
            s.then,
            s.mode.value,
            s.reason,
        )
        for s in plan.sites
    ]
    fallbacks = [FallbackEntry(f.node, f.module, f.op, f.reason) for f in plan.fallbacks]
    spaces = [
        dict(name=sp.name, batch=sp.batch, tokens=sp.tokens, prefix=list(sp.prefix), source=sp.source)
        for sp in plan.spaces
    ]
    return Report(
        plan.model,
        plan.frontend,
        spaces,
        regions,
        sites,
        linears,
        fallbacks,
        dict(seconds or {}),
        dict(extra or {}),
        costs,
        time_steps_line(plan),
        dict(passes or {}),
    )


def time_steps_line(plan: Plan) -> str:
    """What the report says about time steps: the stream inside each call, or what the analysis
    found (a per-step sub-model the user could run step by step, or why a video model has none)."""
    if plan.steps is not None:
        steps = plan.steps
        state = "carried across calls (sliding clips)" if steps.carry else "reset at every call"
        outside = ", ".join(k for k, _ in steps.outer_flops) or "nothing counted"
        return (
            f"the stream is the {steps.steps} time steps inside each call: {steps.modules} runs them in "
            f"order for {steps.views} view(s) ({steps.order} rows), state {state}; dense once per call: "
            f"{_abbrev([k for k, _ in steps.outer_flops], 3) if steps.outer_flops else outside}"
        )
    search = plan.step_search
    if search is None:
        return ""
    if search.structure is not None:
        return (
            f"{search.reason}; transform(..., stream_axis='steps') runs them in order, eventful within a call"
        )
    return f"eventful across calls only: {search.reason}" if search.reason else ""


def _with_str_keys(obj):
    """JSON wants string keys; cost formulas are keyed by sympy symbols."""
    if isinstance(obj, dict):
        return {
            k if isinstance(k, (str, int, float, bool)) or k is None else str(k): _with_str_keys(v)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_with_str_keys(v) for v in obj]
    return obj
