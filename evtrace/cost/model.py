"""A symbolic cost model: every layer's FLOPs (paper convention) as a sympy formula.

Built from the analysis records, not by running the model, so it is an independent account of
what :func:`evtrace.count_flops` measures (the tests hold the two equal). Layers are the ones
``count_flops`` reports for an eventful model: token-wise regions (with their gate), attention
sites, and the ops outside both by module path.

Symbols, bound per layer (``LayerCost.values``):

``B``  streams in the layer's token sequence (ViViT's spatial encoder: one per time step)
``N``  tokens per stream            ``D``  channels of the sequence (embedding width)
``H``  attention heads (d = D / H)  ``w``  attention window side (windowed attention)
``r``  tokens recomputed per stream and gate in the steady state (see :mod:`evtrace.cost.count`)
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
  When the delta update's products plus its fixed work (``delta_overhead_macs``) reach a full
  recompute's, ``Bh (3 r + c) n (d + dv) + K >= Bh n^2 (d + dv)``, the site is recomputed in full
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
import torch
import torch.fx

from passes.canonicalize import op_name

from evtrace.graph.meta import OP, TENSOR, TOKENS, OpKind, module_path

B, N, D, H, w, r, c = sympy.symbols("B N D H w r c", positive=True, integer=True)
SYMBOLS = (B, N, D, H, w, r, c)
_ADDS = ("add", "add_", "iadd", "sub", "sub_", "isub", "rsub")


@dataclass(frozen=True)
class LayerCost:
    """One layer: its first-frame and steady-state FLOPs as formulas, and their symbol values."""

    name: str
    kind: str  # "region", "region (dense)", "attention (<mode>)", "other"
    first_frame: sympy.Expr
    steady: sympy.Expr
    values: dict = field(default_factory=dict)  # sympy Symbol -> int
    state_bytes: int = 0  # ours, all streams
    paper_state_bytes: int = 0  # the paper implementation's layout, all streams
    streams: int = 1

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


@dataclass(frozen=True)
class CostModel:
    """Per-layer formulas of one model (see the module docstring); ``eventful`` says whether
    the steady state is the rewritten model's or the original's (then equal to the first frame)."""

    layers: tuple[LayerCost, ...]
    eventful: bool

    def steady(self) -> int:
        return sum(layer.steady_flops for layer in self.layers)

    def first_frame(self) -> int:
        return sum(layer.first_frame_flops for layer in self.layers)

    def dense(self) -> int:
        """The original model's FLOPs per frame (every layer dense)."""
        return sum(layer.first_frame_flops if layer.kind.startswith("region") or layer.kind == "other"
                   else layer.evaluate(_dense_of(layer)) for layer in self.layers)

    def per_layer(self, first_frame: bool = False) -> dict[str, int]:
        """FLOPs by layer name (layers that cost nothing are left out, as in ``count_flops``)."""
        values = {layer.name: layer.first_frame_flops if first_frame else layer.steady_flops for layer in self.layers}
        return {name: value for name, value in values.items() if value}

    def state_bytes(self) -> int:
        return sum(layer.state_bytes for layer in self.layers)

    def paper_state_bytes(self) -> int:
        return sum(layer.paper_state_bytes for layer in self.layers)

    def with_budgets(self, budgets: dict[str, int], repair_rows: int | None = None,
                     state: dict[str, int] | None = None) -> "CostModel":
        """The same model with r per region (by name; attention sites take the r of the regions
        that feed them, recorded at build time), c and our state bytes replaced."""
        layers = []
        for layer in self.layers:
            values = dict(layer.values)
            source = layer.name if layer.kind == "region" else values.get("_region")
            if source is not None and source in budgets:
                values[r] = budgets[source]
            if repair_rows is not None and c in values:
                values[c] = min(repair_rows, values.get("_n", repair_rows))
            layer = replace(layer, values=values)
            if state is not None and layer.name in state:
                layer = replace(layer, state_bytes=state[layer.name])
            layers.append(layer)
        return CostModel(tuple(layers), self.eventful)

    def formula(self) -> str:
        """Every layer's formula with its symbol values, and the totals."""
        lines = ["FLOPs per frame (paper convention); steady state [first frame]:"]
        for layer in self.layers:
            bound = ", ".join(f"{k}={v}" for k, v in layer.values.items() if isinstance(k, sympy.Symbol)
                              and (k in layer.steady.free_symbols or k in layer.first_frame.free_symbols))
            text = f"  {layer.name} ({layer.kind}): {sympy.factor(layer.steady)}"
            if sympy.simplify(layer.first_frame - layer.steady) != 0:
                text += f"  [{sympy.factor(layer.first_frame)}]"
            lines.append(text + (f"   with {bound}" if bound else "") + f"  = {layer.steady_flops:,}")
        lines.append(f"  total: {self.steady():,} steady, {self.first_frame():,} first frame, "
                     f"{self.dense():,} dense")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.formula()


def _dense_of(layer: LayerCost) -> sympy.Expr:
    return layer.values.get("_dense", layer.first_frame)


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def _shape(node) -> tuple[int, ...] | None:
    info = node.meta.get(TENSOR) if isinstance(node, torch.fx.Node) else None
    return tuple(info.shape) if info is not None and not isinstance(info, tuple) else None


def _float(node) -> bool:
    info = node.meta.get(TENSOR)
    return info is not None and not isinstance(info, tuple) and info.dtype.is_floating_point


def _linear(node: torch.fx.Node, root: torch.nn.Module) -> tuple[int, int, bool]:
    """(in, out, has bias) of a linear node."""
    x = node.args[0]
    fan_in, fan_out = _shape(x)[-1], _shape(node)[-1]
    if node.op == "call_module":
        return fan_in, fan_out, root.get_submodule(str(node.target)).bias is not None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return fan_in, fan_out, bias is not None


def _channels(count: int, dim: int) -> sympy.Expr:
    return sympy.Rational(count, dim) * D


def _row_cost(node: torch.fx.Node, root: torch.nn.Module, dim: int) -> sympy.Expr:
    """FLOPs per token row of a token-wise op, as a formula in D."""
    kind = node.meta.get(OP)
    shape = _shape(node)
    if shape is None:
        return sympy.Integer(0)
    if kind == OpKind.LINEAR:
        fan_in, fan_out, bias = _linear(node, root)
        return _channels(fan_in, dim) * _channels(fan_out, dim) + (_channels(fan_out, dim) if bias else 0)
    if kind == OpKind.BINARY and op_name(node) in _ADDS and _float(node):
        rows = _rows(node)
        return _channels(math.prod(shape) // rows, dim)
    return sympy.Integer(0)


def _rows(node: torch.fx.Node) -> int:
    layout = node.meta.get(TOKENS)
    shape = _shape(node)
    return math.prod(shape[: layout.token_ndim]) if layout is not None else math.prod(shape[:-1])


def _rows_expr(rows: int, batch: int, tokens: int, windows: list[int]) -> sympy.Expr:
    """Token rows of a tensor as a formula: B N, or padded to whole windows, or a number."""
    if rows == batch * tokens:
        return B * N
    side = math.isqrt(tokens)
    for size in windows:
        if side * side == tokens and rows == batch * (-(-side // size) * size) ** 2:
            return B * (sympy.ceiling(sympy.sqrt(N) / w) * w) ** 2
    return sympy.Integer(rows)


def _other_cost(node: torch.fx.Node, root: torch.nn.Module) -> int:
    """FLOPs of an op outside regions and sites, from its traced shapes."""
    kind = node.meta.get(OP)
    shape = _shape(node)
    if shape is None:
        return 0
    if kind == OpKind.LINEAR:
        fan_in, fan_out, bias = _linear(node, root)
        return math.prod(shape[:-1]) * (fan_in * fan_out + (fan_out if bias else 0))
    if kind == OpKind.BINARY and op_name(node) in _ADDS and _float(node):
        return math.prod(shape)
    if kind == OpKind.MATMUL:
        return math.prod(shape) * _shape(node.args[0])[-1]
    return 0


def _space_dim(regions, space) -> int:
    for region in regions:
        if region.space == space:
            for node in region.nodes:
                if node.meta.get(OP) == OpKind.LINEAR:
                    return _shape(node.args[0])[-1]
    return 0


def _site_space(site, spaces):
    layout = site.q.meta.get(TOKENS)
    if layout is not None:
        return layout.space
    bh = math.prod(_shape(site.q)[:-2])
    return next((s for s in spaces if s.tokens == _shape(site.q)[-2] and bh % s.batch == 0), spaces[-1])


def _attention(site, space, dim: int, mode: str) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, dict]:
    """(first frame, steady, dense) formulas of one site and its symbol values."""
    q, k, v = _shape(site.q), _shape(site.k), _shape(site.v)
    bh, n, d, dv = math.prod(q[:-2]), q[-2], q[-1], v[-1]
    heads = dim // d if dim and dim % d == 0 else bh // space.batch
    values = {B: space.batch, N: space.tokens, D: dim or heads * d, H: heads}
    sd = D / H
    if n == space.tokens and bh == space.batch * heads:
        BH, n_expr = B * H, N
    elif site.windowed and site.bias is not None and site.bias.q_grid and site.bias.q_grid[0] == site.bias.q_grid[1]:
        size = site.bias.q_grid[0]
        values[w] = size
        BH, n_expr = B * H * sympy.ceiling(sympy.sqrt(N) / w) ** 2, w ** 2
        if sympy.Integer(BH.subs(values)) != bh:
            BH = sympy.Integer(bh)
    else:
        BH, n_expr = sympy.Integer(bh), sympy.Integer(n)
    sdv = sd if dv == d else sympy.Integer(dv)
    bias = site.bias.kind if site.bias is not None else ""
    if bias == "decomposed_rel_pos":
        kh, kw = site.bias.k_grid
        k_rows = (2 * sympy.sqrt(N) if kh == kw and kh * kw == space.tokens and n_expr == N
                  else 2 * w if w in values and kh == kw == values[w] else sympy.Integer(kh + kw))
    else:
        k_rows = 0

    def logit_terms(rows):  # the bias entries of `rows` query rows against all keys, added to logits
        if bias == "decomposed_rel_pos":
            return BH * rows * k_rows * sd + 2 * BH * rows * n_expr
        return BH * rows * n_expr if bias else 0

    dense = BH * n_expr ** 2 * (sd + sdv) + logit_terms(n_expr)
    if mode == "exact":
        rows = r + c
        cols_bias = (BH * n_expr * k_rows * sd + BH * n_expr * r) if bias == "decomposed_rel_pos" else 0
        key_swap = (BH * n_expr * 2 * r * (sd + sdv) + cols_bias + (BH * n_expr * 2 * r if bias else 0)
                    + BH * n_expr * 2 * r + BH * n_expr * sdv + 5 * BH * n_expr)
        # rel-pos rows reuse the factor tables computed once for the columns: adds only
        row_terms = 2 * BH * rows * n_expr if bias == "decomposed_rel_pos" else logit_terms(rows)
        recompute = BH * rows * n_expr * (sd + sdv) + row_terms + BH * rows * n_expr
        first = dense + BH * n_expr ** 2
        values[c] = 0
        values["_n"] = n
        # ExactDeltaAttention.delta_is_costlier: past it the site is recomputed in full
        from evtrace.runtime.attention import ExactDeltaAttention

        swap_and_rows = BH * (n_expr * 2 * r + (r + c) * n_expr) * (sd + sdv)
        costlier = swap_and_rows + ExactDeltaAttention.delta_overhead_macs >= BH * n_expr ** 2 * (sd + sdv)
        steady = sympy.Piecewise((dense, costlier), (key_swap + recompute, True))
        return first, steady, dense, values
    if mode == "paper":
        cols_bias = (BH * n_expr * k_rows * sd + 2 * BH * n_expr * r if bias == "decomposed_rel_pos"
                     else BH * n_expr * r if bias else 0)
        steady = (BH * r * n_expr * sd + logit_terms(r) + BH * n_expr * r * sd + cols_bias
                  + 2 * BH * n_expr * r * sdv + 2 * BH * n_expr * sdv)
        return dense, steady, dense, values
    return dense, dense, dense, values


def _paper_state(site, space, dim: int, elsize: int) -> int:
    """The paper implementation's state for the block of this site (see the module docstring)."""
    tokens, batch = space.tokens, space.batch
    block = 8 * tokens * dim
    if not site.windowed:
        heads = dim // _shape(site.q)[-1]
        block += 2 * heads * tokens * tokens + 2 * tokens * dim
    return batch * block * elsize


def _our_attention_state(site, mode: str, space) -> int:
    from evtrace.runtime.attention import ExactDeltaAttention, PaperDeltaAttention

    q, v = _shape(site.q), _shape(site.v)
    bh, n, d, dv = math.prod(q[:-2]), q[-2], q[-1], v[-1]
    dtype = site.q.meta[TENSOR].dtype
    if mode == "exact":
        return ExactDeltaAttention.state_bytes_for(bh, 1, n, d, dv, dtype)
    if mode == "paper":
        return PaperDeltaAttention.state_bytes_for(bh, 1, n, d, dv, dtype)
    return 0


def build_cost_model(analysis, site_modes: dict[str, str] | None = None, gated: bool | None = None,
                     repair_rows: int = 8) -> CostModel:
    """The cost model of an analysed graph (intact: before the rewrite consumes it).

    Args:
        analysis: an :class:`~evtrace.analysis.Analysis`.
        site_modes: site name -> "exact" | "paper" | "dense" as the rewrite plans them; None for
            the original model (every layer dense, no gates).
        gated: whether gated regions get gates (default: when ``site_modes`` is given).
        repair_rows: exact attention's repair budget c.
    Regions start at r = N; bind budgets with :meth:`CostModel.with_budgets`.
    """
    from passes.delta_attention import producing_region

    eventful = site_modes is not None if gated is None else gated
    root = analysis.gm
    spaces = analysis.spaces
    windows = sorted({s.bias.q_grid[0] for s in analysis.sites if s.windowed and s.bias is not None and s.bias.q_grid})
    region_nodes = {n for region in analysis.regions for n in region.nodes}
    site_nodes = {n for site in analysis.sites for n in site.nodes}
    layers = []
    for region in analysis.regions:
        space = region.space
        dim = _space_dim(analysis.regions, space) or 1
        values = {B: space.batch, N: space.tokens, D: dim, r: space.tokens}
        if windows:
            values[w] = windows[0]
        dense = sympy.Integer(0)
        per_token = sympy.Integer(0)
        for node in region.nodes:
            cost = _row_cost(node, root, dim)
            if cost != 0:
                per_token += cost
                dense += _rows_expr(_rows(node), space.batch, space.tokens, windows) * cost
        state = sum(math.prod(_shape(e)) * e.meta[TENSOR].dtype.itemsize for e in region.entries + region.exits)
        if eventful and region.gated:
            gate = sum(_rows_expr(_rows(e), space.batch, space.tokens, windows)
                       * _channels(math.prod(_shape(e)) // _rows(e), dim) for e in region.entries)
            steady = B * r * per_token + gate
            layers.append(LayerCost(region.name, "region", dense, steady, values, state, 0, space.batch))
        else:
            layers.append(LayerCost(region.name, "region (dense)", dense, dense, values, 0, 0, space.batch))
    for site in analysis.sites:
        mode = (site_modes or {}).get(site.name, "dense")
        space = _site_space(site, spaces)
        dim = _space_dim(analysis.regions, space)
        first, steady, dense, values = _attention(site, space, dim, mode)
        values["_dense"] = dense
        if mode in ("exact", "paper"):
            values[r] = space.tokens
            values["_region"] = producing_region(site.q)
            if mode == "exact":
                values[c] = min(repair_rows, values["_n"])
        elsize = site.q.meta[TENSOR].dtype.itemsize
        layers.append(LayerCost(site.name, f"attention ({mode})", first, steady, values,
                                _our_attention_state(site, mode, space) if eventful else 0,
                                _paper_state(site, space, dim, elsize), space.batch))
    other: dict[str, int] = {}
    for node in root.graph.nodes:
        if node in region_nodes or node in site_nodes or node.op in ("placeholder", "output", "get_attr"):
            continue
        cost = _other_cost(node, root)
        if cost:
            key = module_path(node) or node.name
            other[key] = other.get(key, 0) + cost
    for key, cost in other.items():
        layers.append(LayerCost(key, "other", sympy.Integer(cost), sympy.Integer(cost), {}))
    return CostModel(tuple(layers), eventful)


def _bytes(value: int) -> str:
    return f"{value / 1e6:.2f} MB" if value else "-"


def cost_table(model: CostModel) -> str:
    """The report's FLOP and memory columns, per layer, and the savings line."""
    from evtrace.report import _table

    rows = []
    for layer in model.layers:
        dense = layer.evaluate(_dense_of(layer)) if layer.kind.startswith("attention") else layer.first_frame_flops
        rows.append([layer.name, layer.kind, f"{dense / 1e9:.4f}", f"{layer.steady_flops / 1e9:.4f}",
                     _bytes(layer.state_bytes),
                     _bytes(layer.paper_state_bytes)])
    table = _table(["layer", "kind", "dense GFLOPs", "steady GFLOPs", "state (ours)", "state (paper layout)"], rows)
    dense, steady = model.dense(), model.steady()
    lines = [table]
    if model.eventful:
        ratio = dense / steady if steady else float("inf")
        lines.append(f"FLOPs per frame (paper convention): dense {dense / 1e9:.3f} G, first frame "
                     f"{model.first_frame() / 1e9:.3f} G, steady {steady / 1e9:.3f} G: {ratio:.2f}x fewer")
        lines.append(f"state (all streams): ours {_bytes(model.state_bytes())}, "
                     f"the paper's layout {_bytes(model.paper_state_bytes())}")
    else:
        lines.append(f"FLOPs per frame (paper convention): {dense / 1e9:.3f} G")
    return "\n".join(lines)
