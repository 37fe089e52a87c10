"""A symbolic cost model: every layer's FLOPs (paper convention) as a sympy formula.

Built from the plan (:class:`evtrace.graph.plan.Plan`), not by running the model, so it is an
independent account of
what :func:`evtrace.count_flops` measures (the tests hold the two equal). Layers are the ones
``count_flops`` reports for an eventful model: token-wise regions (with their gate), attention
sites, and the ops outside both by module path.

Symbols, bound per layer (``LayerCost.values``):

``B``  streams in the layer's token sequence (ViViT's spatial encoder: one per time step)
``N``  tokens per stream            ``D``  channels of the sequence (embedding width)
``H``  attention heads (d = D / H)  ``w``  attention window side (windowed attention)
``r``  tokens recomputed per stream and gate in the steady state (see :mod:`evtrace.cost.count`;
       a data-dependent budget at its average, :func:`priced_cost_model`)
``c``  exact delta attention's repair rows per frame

Formulas (steady state; ``n`` = N, or w^2 in a window; ``Bh`` = B H, times the window count
ceil(sqrt(N) / w)^2 in windowed attention; rel-pos tables of ``kh + kw`` rows):

- gated region: ``B r sum_i f_i + sum_e numel(e)``, where ``f_i`` is each counted op's cost
  per token (a linear: in out + out; an add: its channels) and ``numel(e)`` the gate's
  subtraction ``c - p`` on each input (the per-token norms and their combination are
  reductions: free); first frame ``B N sum_i f_i``.
- dense attention: ``Bh n^2 (d + dv)`` plus ``Bh n (kh + kw) d + 2 Bh n^2`` (decomposed
  relative position) or ``Bh n^2`` (an additive bias).
- exact delta attention (``evtrace.runtime.attention.ExactDeltaAttention``): key swap
  ``Bh n 2r (d + dv) + Bh n (2r + dv + 5)`` (+ rel-pos columns ``Bh n (kh + kw) d + 3 Bh n r``),
  then ``r + c`` rows recomputed: ``Bh (r + c) n (d + dv + 1)`` (+ their logit terms; rel-pos
  rows are gathered from the column step's factor tables, ``2 Bh (r + c) n`` adds).
  When the delta update's products, each worth ``a = delta_mac_cost`` (7/5) fused-attention
  ones, plus its fixed work (``K = delta_overhead_macs``) reach a full recompute's,
  ``a Bh (3 r + c) n (d + dv) + K >= Bh n^2 (d + dv)``, the site is recomputed in full
  (plain attention, the dense cost; no state is kept, the next delta update starts afresh).
- the paper's delta attention: ``Bh r n d + Bh n r d + 2 Bh n r dv + 2 Bh n dv`` plus the logit
  terms of the r rows and r columns; every frame also runs softmax over the whole n x n matrix,
  which this convention does not count.

State memory (bytes per stream): ours from the gate references, region buffers and attention
state; beside it the paper implementation's layout for the same model: per block three gate
references (D) and three buffers (3D, D, D), i.e. ``8 N D``, plus per global (delta) attention
block two ``H N N`` tensors (logits, attention reference) and ``2 N D`` (value reference, output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import sympy

from evtrace.graph.plan import AttentionMode, CountedOp, LayerKind, LogitTerm, Plan, SitePlan
from evtrace.runtime.attention import ExactDeltaAttention, PaperDeltaAttention, delta_costs_more
from evtrace.runtime.cost_profile import DEFAULT_PROFILE, CostProfile
from evtrace.runtime.policies import Policy, counted_tokens, has_peak

B, N, D, H, w, r, c = sympy.symbols("B N D H w r c", positive=True, integer=True)
T = sympy.Symbol("T", positive=True, integer=True)  # time steps per call (stream_axis="steps")
SYMBOLS = (B, N, D, H, w, r, c, T)


@dataclass(frozen=True)
class LayerCost:
    """One layer: its first-frame and steady-state FLOPs as formulas, and their symbol values."""

    name: str
    layer_kind: LayerKind
    first_frame: sympy.Expr
    steady: sympy.Expr
    values: dict = field(default_factory=dict)  # sympy Symbol -> int
    state_bytes: int = 0  # ours, all streams
    paper_state_bytes: int = 0  # the paper implementation's layout, all streams
    streams: int = 1
    mode: AttentionMode | None = None  # attention layers: the site's mode

    @property
    def kind(self) -> str:
        """``region``, ``region (dense)``, ``attention (<mode>)`` or ``other``."""
        if self.layer_kind == LayerKind.ATTENTION:
            return f"attention ({self.mode.value})"
        return self.layer_kind.value

    def evaluate(self, expr: sympy.Expr | None = None) -> int:
        bound = {k: v for k, v in self.values.items() if isinstance(k, sympy.Symbol)}
        value = (self.steady if expr is None else expr).subs(bound)
        return int(sympy.Integer(value))

    @property
    def steady_flops(self) -> int:
        return self.evaluate(self.steady)

    @property
    def first_frame_flops(self) -> int:
        return self.evaluate(self.first_frame)

    @property
    def dense_flops(self) -> int:
        """The layer's FLOPs in the original model."""
        return self.evaluate(self.values.get("_dense", self.first_frame))


@dataclass(frozen=True)
class CostModel:
    """Per-layer formulas of one model (see the module docstring); ``eventful`` says whether
    the steady state is the rewritten model's or the original's (then equal to the first frame)."""

    layers: tuple[LayerCost, ...]
    eventful: bool
    steps: int = 0  # time steps per call when the stream is the steps inside a call (else 0)

    def steady(self) -> int:
        return sum(layer.steady_flops for layer in self.layers)

    def first_frame(self) -> int:
        return sum(layer.first_frame_flops for layer in self.layers)

    def dense(self) -> int:
        """The original model's FLOPs per frame (every layer dense)."""
        return sum(layer.dense_flops for layer in self.layers)

    def per_layer(self, first_frame: bool = False) -> dict[str, int]:
        """FLOPs by layer name (layers that cost nothing are left out, as in ``count_flops``)."""
        values = {
            layer.name: layer.first_frame_flops if first_frame else layer.steady_flops
            for layer in self.layers
        }
        return {name: value for name, value in values.items() if value}

    def state_bytes(self) -> int:
        return sum(layer.state_bytes for layer in self.layers)

    def paper_state_bytes(self) -> int:
        return sum(layer.paper_state_bytes for layer in self.layers)

    def with_budgets(
        self, budgets: dict[str, int], repair_rows: int | None = None, state: dict[str, int] | None = None
    ) -> CostModel:
        """The same model with r per region (by name; attention sites take the r of the regions
        that feed them, recorded at build time), c and our state bytes replaced."""
        layers = []
        for layer in self.layers:
            values = dict(layer.values)
            source = layer.name if layer.layer_kind == LayerKind.REGION else values.get("_region")
            if source is not None and source in budgets:
                values[r] = budgets[source]
            if repair_rows is not None and c in values:
                values[c] = min(repair_rows, values.get("_n", repair_rows))
            layer = replace(layer, values=values)
            if state is not None and layer.name in state:
                layer = replace(layer, state_bytes=state[layer.name])
            layers.append(layer)
        return CostModel(tuple(layers), self.eventful, self.steps)

    def formula(self) -> str:
        """Every layer's formula with its symbol values, and the totals."""
        lines = ["FLOPs per frame (paper convention); steady state [first frame]:"]
        for layer in self.layers:
            bound = ", ".join(
                f"{k}={v}"
                for k, v in layer.values.items()
                if isinstance(k, sympy.Symbol)
                and (k in layer.steady.free_symbols or k in layer.first_frame.free_symbols)
            )
            text = f"  {layer.name} ({layer.kind}): {sympy.factor(layer.steady)}"
            if sympy.simplify(layer.first_frame - layer.steady) != 0:
                text += f"  [{sympy.factor(layer.first_frame)}]"
            lines.append(text + (f"   with {bound}" if bound else "") + f"  = {layer.steady_flops:,}")
        lines.append(
            f"  total: {self.steady():,} steady, {self.first_frame():,} first frame, {self.dense():,} dense"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.formula()


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def _channels(count: int, dim: int) -> sympy.Expr:
    return sympy.Rational(count, dim) * D


def _row_cost(op: CountedOp, dim: int) -> sympy.Expr:
    """FLOPs per token row of a counted region op, as a formula in D."""
    if op.is_linear:
        return _channels(op.fan_in, dim) * _channels(op.fan_out, dim) + (
            _channels(op.fan_out, dim) if op.bias else 0
        )
    return _channels(op.adds, dim)


def _rows_expr(rows: int, batch: int, tokens: int, windows: tuple[int, ...]) -> sympy.Expr:
    """Token rows of a tensor as a formula: B N, or padded to whole windows, or a number."""
    if rows == batch * tokens:
        return B * N
    side = math.isqrt(tokens)
    for size in windows:
        if side * side == tokens and rows == batch * (-(-side // size) * size) ** 2:
            return B * (sympy.ceiling(sympy.sqrt(N) / w) * w) ** 2
    return sympy.Integer(rows)


def _attention(
    site: SitePlan, mode: AttentionMode, profile: CostProfile = DEFAULT_PROFILE
) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, dict]:
    """(first frame, steady, dense) formulas of one site and its symbol values."""
    space, dim = site.space, site.dim
    q, v = site.q_shape, site.v_shape
    bh, n, d, dv = math.prod(q[:-2]), q[-2], q[-1], v[-1]
    heads = dim // d if dim and dim % d == 0 else bh // space.batch
    values = {B: space.batch, N: space.tokens, D: dim or heads * d, H: heads}
    sd = D / H
    bias = site.bias
    if n == space.tokens and bh == space.batch * heads:
        BH, n_expr = B * H, N
    elif site.windowed and bias is not None and bias.q_grid and bias.q_grid[0] == bias.q_grid[1]:
        size = bias.q_grid[0]
        values[w] = size
        BH, n_expr = B * H * sympy.ceiling(sympy.sqrt(N) / w) ** 2, w**2
        if sympy.Integer(BH.subs(values)) != bh:
            BH = sympy.Integer(bh)
    else:
        BH, n_expr = sympy.Integer(bh), sympy.Integer(n)
    sdv = sd if dv == d else sympy.Integer(dv)
    rel_pos = bias is not None and bias.kind == LogitTerm.DECOMPOSED_REL_POS
    if rel_pos:
        kh, kw = bias.k_grid
        k_rows = (
            2 * sympy.sqrt(N)
            if kh == kw and kh * kw == space.tokens and n_expr == N
            else 2 * w
            if w in values and kh == kw == values[w]
            else sympy.Integer(kh + kw)
        )
    else:
        k_rows = 0

    def logit_terms(rows):  # the bias entries of `rows` query rows against all keys, added to logits
        if rel_pos:
            return BH * rows * k_rows * sd + 2 * BH * rows * n_expr
        return BH * rows * n_expr if bias is not None else 0

    dense = BH * n_expr**2 * (sd + sdv) + logit_terms(n_expr)
    if mode == AttentionMode.EXACT:
        # grouped attention: each group row updates as many positions as r, at most its n
        rr = sympy.Min(r, n_expr) if site.grouped else r
        rows = rr + c
        cols_bias = (BH * n_expr * k_rows * sd + BH * n_expr * rr) if rel_pos else 0
        key_swap = (
            BH * n_expr * 2 * rr * (sd + sdv)
            + cols_bias
            + (BH * n_expr * 2 * rr if bias is not None else 0)
            + BH * n_expr * 2 * rr
            + BH * n_expr * sdv
            + 5 * BH * n_expr
        )
        # rel-pos rows reuse the factor tables computed once for the columns: adds only
        row_terms = 2 * BH * rows * n_expr if rel_pos else logit_terms(rows)
        recompute = BH * rows * n_expr * (sd + sdv) + row_terms + BH * rows * n_expr
        first = dense + BH * n_expr**2
        values[c] = 0
        values["_n"] = n
        costlier = delta_costs_more(
            BH,
            n_expr,
            n_expr,
            sd,
            sdv,
            rr,
            rr,
            c,
            profile.delta_overhead_macs,
            profile.delta_mac_cost,
        )
        steady = sympy.Piecewise((dense, costlier), (key_swap + recompute, True))
        return first, steady, dense, values
    if mode == AttentionMode.PAPER:
        cols_bias = (
            BH * n_expr * k_rows * sd + 2 * BH * n_expr * r
            if rel_pos
            else BH * n_expr * r
            if bias is not None
            else 0
        )
        steady = (
            BH * r * n_expr * sd
            + logit_terms(r)
            + BH * n_expr * r * sd
            + cols_bias
            + 2 * BH * n_expr * r * sdv
            + 2 * BH * n_expr * sdv
        )
        return dense, steady, dense, values
    return dense, dense, dense, values


def _paper_state(site: SitePlan) -> int:
    """The paper implementation's state for the block of this site (see the module docstring)."""
    tokens, batch, dim = site.space.tokens, site.space.batch, site.dim
    block = 8 * tokens * dim
    if not site.windowed:
        heads = dim // site.q_shape[-1]
        block += 2 * heads * tokens * tokens + 2 * tokens * dim
    return batch * block * site.dtype.itemsize


def _our_attention_state(site: SitePlan, mode: AttentionMode) -> int:
    q, v = site.q_shape, site.v_shape
    bh, n, d, dv = math.prod(q[:-2]), q[-2], q[-1], v[-1]
    if mode == AttentionMode.EXACT:
        return ExactDeltaAttention.state_bytes_for(bh, 1, n, d, dv, site.dtype)
    if mode == AttentionMode.PAPER:
        return PaperDeltaAttention.state_bytes_for(bh, 1, n, d, dv, site.dtype)
    return 0


def build_cost_model(plan: Plan, eventful: bool = True, profile: CostProfile | None = None) -> CostModel:
    """The cost model of a plan.

    Args:
        plan: the :class:`~evtrace.graph.plan.Plan` of a model.
        eventful: the rewritten model (gated regions, each site in its planned mode) or, when
            False, the original (every layer dense, no gates, no state of ours).
        profile: the device constants of exact attention's static choice (``transform``'s
            ``cost_profile``); the shipped default when None.
    Regions start at r = N; bind budgets with :meth:`CostModel.with_budgets`.
    """
    windows = plan.windows
    layers = []
    for region in plan.regions:
        space, dim = region.space, region.dim
        values = {B: space.batch, N: space.tokens, D: dim, r: space.tokens}
        if windows:
            values[w] = windows[0]
        dense = sympy.Integer(0)
        per_token = sympy.Integer(0)
        for op in region.ops:
            cost = _row_cost(op, dim)
            per_token += cost
            dense += _rows_expr(op.rows, space.batch, space.tokens, windows) * cost
        if eventful and region.gated:
            gate = sum(
                _rows_expr(e.rows, space.batch, space.tokens, windows) * _channels(e.channels, dim)
                for e in region.entries
            )
            steady = B * r * per_token + gate
            layers.append(
                LayerCost(
                    region.name, LayerKind.REGION, dense, steady, values, region.state_bytes, 0, space.batch
                )
            )
        else:
            layers.append(
                LayerCost(region.name, LayerKind.DENSE_REGION, dense, dense, values, 0, 0, space.batch)
            )
    for site in plan.sites:
        mode = site.mode if eventful else AttentionMode.DENSE
        first, steady, dense, values = _attention(site, mode, profile or DEFAULT_PROFILE)
        values["_dense"] = dense
        if mode != AttentionMode.DENSE:
            values[r] = site.space.tokens
            values["_region"] = site.q_region
            if mode == AttentionMode.EXACT:
                values[c] = min(plan.repair_rows, values["_n"])
        layers.append(
            LayerCost(
                site.name,
                LayerKind.ATTENTION,
                first,
                steady,
                values,
                _our_attention_state(site, mode) if eventful else 0,
                _paper_state(site),
                site.space.batch,
                mode,
            )
        )
    for key, flops in plan.other_flops:
        layers.append(LayerCost(key, LayerKind.OTHER, sympy.Integer(flops), sympy.Integer(flops), {}))
    if plan.steps is not None:
        layers = [_per_call(layer, plan.steps.steps, plan.steps.carry) for layer in layers]
        for key, flops in plan.steps.outer_flops:
            layers.append(LayerCost(key, LayerKind.OTHER, sympy.Integer(flops), sympy.Integer(flops), {}))
    return CostModel(tuple(layers), eventful, plan.steps.steps if plan.steps is not None else 0)


def _per_call(layer: LayerCost, steps: int, carry: bool) -> LayerCost:
    """A per-step layer's FLOPs per call of T time steps: the first step fills the state (its
    first-frame cost), the T - 1 others are steady; with state carried across calls, a call
    after the first is T steady steps."""
    first = layer.first_frame + (T - 1) * layer.steady
    steady = T * layer.steady if carry else first
    values = dict(layer.values)
    values[T] = steps
    values["_dense"] = T * values.get("_dense", layer.first_frame)
    return replace(layer, first_frame=first, steady=steady, values=values)


# --------------------------------------------------------------------------------------------
# pricing policies
# --------------------------------------------------------------------------------------------


def _gates(plan: Plan, policies: Policy | dict[str, Policy]) -> list[tuple[str, int, Policy]]:
    """(region name, N, policy) of every gated region that has a policy."""
    return [
        (g.name, g.space.tokens, policies if isinstance(policies, Policy) else policies[g.name])
        for g in plan.gated_regions
        if isinstance(policies, Policy) or g.name in policies
    ]


def priced_cost_model(
    plan: Plan,
    policies: Policy | dict[str, Policy],
    repair_rows: int | None = None,
    state: dict[str, int] | None = None,
    peak: bool = False,
    profile: CostProfile | None = None,
) -> CostModel:
    """The eventful cost model of ``plan`` with every gated region's r bound to its policy's
    priced count (:func:`evtrace.runtime.policies.counted_tokens`): the steady-state average
    (``AdaptiveBudget`` at its target, ``Threshold`` at N), or with ``peak=True`` the most one
    frame selects (the latency figure).

    policies: one policy for every gate, or region name -> policy.
    """
    budgets = {name: counted_tokens(policy, n, peak) for name, n, policy in _gates(plan, policies)}
    return build_cost_model(plan, eventful=True, profile=profile).with_budgets(budgets, repair_rows, state)


def peak_line(
    plan: Plan,
    policies: Policy | dict[str, Policy],
    repair_rows: int | None = None,
    profile: CostProfile | None = None,
) -> dict[str, str]:
    """The report's peak entry, ``{"steady FLOPs at the peak budgets (latency bound)": ...}``,
    when some gate's policy selects more in one frame than the average it is priced at (an
    ``AdaptiveBudget``); ``{}`` otherwise."""
    if not any(has_peak(policy, n) for _, n, policy in _gates(plan, policies)):
        return {}
    mean = priced_cost_model(plan, policies, repair_rows, profile=profile)
    top = priced_cost_model(plan, policies, repair_rows, peak=True, profile=profile)
    return {
        "steady FLOPs at the peak budgets (latency bound)": (
            f"{top.steady() / 1e9:.3f} G ({top.dense() / max(1, top.steady()):.2f}x fewer than dense); "
            f"the steady figure above is the average, {mean.steady() / 1e9:.3f} G"
        )
    }
