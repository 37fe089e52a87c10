"""Find attention sites: q, k, v, logit terms and output of every self-attention.

Canonical forms matched (after ``passes.canonicalize`` and ``passes.token_flow``):

  explicit   logits = matmul(q', k^T)      q' = q * s (or s after the matmul), k^T a transpose
             logits = logits (+ bias)*     through views; bias constant or decomposed rel-pos
             probs  = softmax(logits, -1)  (dropout in eval is identity)
             out    = matmul(probs, v)
  fused      out = scaled_dot_product_attention(q, k, v, attn_mask=bias?, scale=s?)

The forms are the rows of ``PATTERNS`` (a name, the form, where a match starts, the matcher);
the ops between the logits and the softmax are the rows of ``_chain_step`` (scale, bias term,
layout, identity). Constant terms entered anywhere in the chain (through views and scales) make
one constant term, materialised by the rewrite (:func:`materialize_bias`). A match that fails
records why (:class:`SiteMiss`, the ``SITE_MISSES`` record: ``inspect(..., explain=True)``).
Both forms feed one record, :class:`AttentionSite`. Attention within groups of tokens (windows: q of
shape (groups, heads, n, d) whose rows hold each token at most once, k and v the same tokens)
records the token id of every row and position (``group_ids``). A site that cannot be
delta-updated exactly (probabilities used elsewhere, an unknown logit term, a layout no view
follows) keeps a ``dense_reason``; the rewrite then recomputes it densely on its buffered q, k, v.

Reads: ``meta[OP]``, ``meta[ROLE]``, ``meta[TOKENS]``, ``meta[TENSOR]``.
Writes: ``meta[ATTENTION]`` (site name) on the site's nodes; returns the sites (``SITES``) and
the failed matches (``SITE_MISSES``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx

from evtrace.graph.meta import (
    ATTENTION,
    MODULE_PATH,
    OP,
    ROLE,
    SITE_MISSES,
    SITES,
    TENSOR,
    TOKENS,
    OpKind,
    Role,
    RoleRecord,
    module_path,
    op_kind,
    role,
    set_op,
    set_role,
    set_site,
    set_tensor_info,
    set_tokens,
    site_of,
    tensor_info,
    token_layout,
)
from evtrace.graph.plan import LogitTerm
from evtrace.graph.walk import trace_back

from .canonicalize import op_name


@dataclass
class LogitBias:
    """An additive logit term: ``constant`` (a tensor that does not depend on tokens) or
    ``decomposed_rel_pos`` (ViTDet: tables Rh (qh, kh, d), Rw (qw, kw, d) contracted with the
    unscaled queries)."""

    kind: LogitTerm
    inputs: tuple[torch.fx.Node, ...]
    q_grid: tuple[int, int] | None = None
    k_grid: tuple[int, int] | None = None
    # constant terms added at different points of the logit chain (timm's shifted-window mask,
    # added in a (B, windows, H, n, n) view after the relative position bias): per term, the
    # add it enters at and the chain ops after it, replayed on the term by materialize_bias
    recipe: tuple[
        tuple[torch.fx.Node, torch.fx.Node, tuple[tuple[torch.fx.Node, torch.fx.Node], ...]], ...
    ] = ()


@dataclass
class AttentionSite:
    name: str
    form: str  # "explicit" | "fused"
    q: torch.fx.Node  # unscaled queries
    k: torch.fx.Node
    v: torch.fx.Node
    output: torch.fx.Node
    scale: float
    bias: LogitBias | None
    nodes: list[torch.fx.Node] = field(default_factory=list)
    heads_shape: tuple[int, int, int, int] | None = None  # (B, H, N, d) view of q, k, v
    windowed: bool = False
    # grouped attention (windows, divided space-time groups): the token id of every (row, position)
    # of q viewed as (rows, n); each row attends within itself, delta-updated as its own stream
    group_ids: torch.Tensor | None = field(default=None, repr=False)
    dense_reason: str = ""

    @property
    def delta_ok(self) -> bool:
        return not self.dense_reason


def _through(node, kinds: tuple[OpKind, ...], names: tuple[str, ...] = ()):
    """Follow single-input producers of the given kinds (and op names) back from ``node``."""
    if not isinstance(node, torch.fx.Node):
        return node
    return trace_back(node, lambda n: op_kind(n) in kinds and (not names or op_name(n) in names))


def _scalar(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _split_scale(node: torch.fx.Node) -> tuple[torch.fx.Node, float]:
    """``q * s`` or ``q / s`` with a Python scalar s -> (q, s); anything else -> (node, 1)."""
    if op_kind(node) == OpKind.BINARY and op_name(node) in ("mul", "div"):
        a, b = node.args[0], node.args[1]
        s = _scalar(b)
        if isinstance(a, torch.fx.Node) and s is not None:
            return a, (1.0 / s if op_name(node) == "div" else s)
        s = _scalar(a)
        if isinstance(b, torch.fx.Node) and s is not None and op_name(node) == "mul":
            return b, s
    return node, 1.0


def _is_last_two_transpose(node: torch.fx.Node) -> bool:
    name = op_name(node)
    if name == "transpose":
        dims = [d for d in node.args[1:3]]
        ndim = len(tensor_info(node).shape)
        return sorted(d % ndim for d in dims) == [ndim - 2, ndim - 1]
    if name == "permute":
        perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        ndim = len(perm)
        return list(perm) == list(range(ndim - 2)) + [ndim - 1, ndim - 2]
    return False


@dataclass(frozen=True)
class SiteMiss:
    """A node where an attention pattern started to match and failed, and why."""

    node: str
    module: str
    pattern: str
    reason: str


@dataclass(frozen=True)
class Pattern:
    """One row of the pattern table: where a match starts and the canonical form it matches."""

    name: str
    form: str
    starts_at: Callable[[torch.fx.Node], bool]
    match: Callable[[torch.fx.Node], AttentionSite | str]  # the site, or why it is not one


def _is_logits(node: torch.fx.Node) -> bool:
    return op_kind(node) == OpKind.MATMUL and role(node) is not None and role(node).pairwise


def find_attention_sites(
    gm: torch.fx.GraphModule, misses: list[SiteMiss] | None = None
) -> list[AttentionSite]:
    """Match every attention in ``gm`` against ``PATTERNS``; see the module docstring.

    ``misses`` (a list) receives a :class:`SiteMiss` for every node where a pattern started and
    failed, and for every other token-mixing matmul (with token_flow's reason)."""
    sites: list[AttentionSite] = []
    for node in gm.graph.nodes:
        pattern = next((p for p in PATTERNS if p.starts_at(node)), None)
        if pattern is None:
            continue
        site = pattern.match(node)
        if isinstance(site, str):
            if misses is not None:
                misses.append(SiteMiss(node.name, module_path(node), pattern.name, site))
            continue
        site.name = _unique(site.name or site.output.name, {s.name for s in sites})
        _check_layout(site)
        for n in site.nodes:
            set_site(n, site.name)
        sites.append(site)
    if misses is not None:
        matched = {n for site in sites for n in site.nodes}
        for node in gm.graph.nodes:
            record = role(node)
            if (
                op_kind(node) in (OpKind.MATMUL, OpKind.EINSUM)
                and node not in matched
                and record is not None
                and record.role == Role.MIXING
                and not record.pairwise
                and record.reason
                not in ("inside attention", "attention internals", "attention: probabilities x values")
                and site_of(node) is None
            ):
                misses.append(SiteMiss(node.name, module_path(node), "-", f"token flow: {record.reason}"))
    return sites


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    i = 1
    while f"{name}#{i}" in taken:
        i += 1
    return f"{name}#{i}"


# Ops allowed between the logits and the softmax, by role in the chain. Casts and eval-mode
# dropout are identities; any other elementwise function (a tanh soft-cap) is not linear, so the
# logit terms would no longer add up and the match fails.
_SCALES = ("mul", "div")  # canonical spellings (passes.canonicalize.SPELLINGS)
_ADDS = ("add",)
_IDENTITIES = (
    "to", "type", "float", "half", "double", "bfloat16", "_to_copy", "type_as",
    "dropout", "feature_dropout", "alpha_dropout", "identity", "clone", "contiguous", "detach", "alias",
)  # fmt: skip


def _chain_step(node: torch.fx.Node, current: torch.fx.Node, softmax_seen: bool) -> str:
    """Which row of the logit chain ``node`` is: "scale", "bias", "layout", "identity" or
    "softmax"; otherwise the reason it ends the match."""
    kind, name = op_kind(node), op_name(node)
    if kind == OpKind.SOFTMAX:
        return "softmax" if not softmax_seen else "a second softmax on the same logits"
    if kind == OpKind.BINARY and name in _SCALES:
        other = node.args[1] if node.args[0] is current else node.args[0]
        if node.args[0] is not current and name != "mul":
            return f"the logits divide a tensor at '{node.name}'"
        if softmax_seen:
            return f"the probabilities are scaled at '{node.name}' before they weight the values"
        return "scale" if _scalar(other) is not None else "scale-tensor"
    if kind == OpKind.BINARY and name in _ADDS:
        if softmax_seen:
            return f"a term is added to the probabilities at '{node.name}'"
        return "bias"
    if kind == OpKind.LAYOUT:
        return "layout"
    if kind == OpKind.UNARY and (name in _IDENTITIES or _identity_module(node)):
        return "identity"
    what = f"'{name}'" if kind != OpKind.UNARY else f"the elementwise function '{name}'"
    return f"{what} at '{node.name}' between the logits and the values is not part of a known attention form"


def _identity_module(node: torch.fx.Node) -> bool:
    if node.op != "call_module" or node.graph.owning_module is None:
        return False
    module = node.graph.owning_module.get_submodule(str(node.target))
    return isinstance(module, (torch.nn.Identity, torch.nn.modules.dropout._DropoutNd)) and not (
        module.training and getattr(module, "p", 0.0)
    )


def _match_explicit(qk: torch.fx.Node) -> AttentionSite | str:
    q_scaled, k_t = qk.args[0], qk.args[1]
    q, scale = _split_scale(q_scaled)
    nodes = [qk] + ([q_scaled] if q_scaled is not q else [])
    if not isinstance(k_t, torch.fx.Node) or not _is_last_two_transpose(k_t):
        name = k_t.name if isinstance(k_t, torch.fx.Node) else repr(k_t)
        return f"the keys operand '{name}' is not a transpose of the last two dims of a key tensor"
    k = k_t.args[0]
    nodes.append(k_t)
    terms: list[tuple[torch.fx.Node, torch.fx.Node, int]] = []  # (term, the add, chain position)
    chain: list[tuple[torch.fx.Node, torch.fx.Node]] = []  # (op, its logits input) after qk
    current = qk
    dense_reason = ""
    softmax = None
    while True:
        users = list(current.users)
        if not users:
            return f"the logits chain ends at '{current.name}' without weighting values"
        if len(users) != 1:
            dense_reason = (
                f"attention logits/probabilities at '{current.name}' are also used outside the attention"
            )
        nxt = users[0]
        if op_kind(nxt) == OpKind.MATMUL and softmax is not None and nxt.args[0] is current:
            av = nxt
            break
        step = _chain_step(nxt, current, softmax is not None)
        if step not in ("softmax", "scale", "scale-tensor", "bias", "layout", "identity"):
            return step
        nodes.append(nxt)
        if step == "softmax":
            softmax = nxt
        elif step == "scale":
            other = nxt.args[1] if nxt.args[0] is current else nxt.args[0]
            s = _scalar(other)
            factor = (1.0 / s) if op_name(nxt) == "div" else s
            if terms:
                chain.append((nxt, current))  # an earlier term is scaled with the logits
            scale *= factor
        elif step == "scale-tensor":
            dense_reason = dense_reason or f"logits are multiplied by a tensor at '{nxt.name}'"
        elif step == "bias":
            other = nxt.args[1] if nxt.args[0] is current else nxt.args[0]
            if isinstance(other, torch.fx.Node):
                terms.append((other, nxt, len(chain)))
            chain.append((nxt, current))
        elif softmax is None:
            chain.append((nxt, current))
        current = nxt
    v = av.args[1]
    nodes.append(av)
    site = AttentionSite(
        name=module_path(av),
        form="explicit",
        q=q,
        k=k,
        v=v,
        output=av,
        scale=scale,
        bias=None,
        nodes=nodes,
        dense_reason=dense_reason,
    )
    _attach_bias(site, [t for t, _, _ in terms], _recipe(terms, chain))
    return site


def _recipe(terms, chain) -> tuple:
    """Per term, the chain ops after its add that change its layout or scale (adds of other
    terms are left out); empty when no term passes through any."""
    recipe = []
    for term, add, position in terms:
        after = tuple(
            (op, source)
            for op, source in chain[position + 1 :]
            if not (op_kind(op) == OpKind.BINARY and op_name(op) in _ADDS)
        )
        recipe.append((term, add, after))
    if len(recipe) == 1 and not any(op_kind(op) != OpKind.UNARY for op, _ in recipe[0][2]):
        return ()
    return tuple(recipe)


def _match_fused(node: torch.fx.Node) -> AttentionSite | str:
    args = list(node.args) + [None] * 7
    q, k, v = args[0], args[1], args[2]
    mask = node.kwargs.get("attn_mask", args[3])
    dropout = node.kwargs.get("dropout_p", args[4]) or 0.0
    causal = node.kwargs.get("is_causal", args[5]) or False
    scale = node.kwargs.get("scale", args[6])
    if scale is None:
        scale = tensor_info(node.args[0]).shape[-1] ** -0.5
    site = AttentionSite(
        name=module_path(node),
        form="fused",
        q=q,
        k=k,
        v=v,
        output=node,
        scale=float(scale),
        bias=None,
        nodes=[node],
    )
    if causal:
        site.dense_reason = "causal attention"
    elif dropout:
        site.dense_reason = "attention dropout is active"
    if isinstance(mask, torch.fx.Node):
        _attach_bias(site, [mask])
    return site


def _attach_bias(site: AttentionSite, terms: list[torch.fx.Node], recipe: tuple = ()) -> None:
    if not terms:
        return
    if all(role(t) and role(t).role == Role.NON_TOKEN for t in terms):
        if len(terms) == 1 and not recipe:
            site.bias = LogitBias(LogitTerm.CONSTANT, (terms[0],))
        else:  # several constants (or one through views): one constant term, built by the rewrite
            site.bias = LogitBias(LogitTerm.CONSTANT, tuple(terms), recipe=recipe)
        return
    rel = _match_rel_pos(terms, site)
    if rel is not None:
        site.bias = rel
        return
    site.dense_reason = site.dense_reason or (
        f"additive logit term '{terms[0].name}' is neither constant nor decomposed relative position"
    )


def _leaf_terms(terms: list[torch.fx.Node]) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """Split sums of additive terms (through views) into their operands; returns (leaves, adds)."""
    leaves, adds = [], []
    stack = list(terms)
    while stack:
        term = stack.pop(0)
        inner = _through(term, (OpKind.LAYOUT,), ("view", "reshape", "_unsafe_view"))
        if (
            op_kind(inner) == OpKind.BINARY
            and op_name(inner) == "add"
            and all(isinstance(a, torch.fx.Node) for a in inner.args[:2])
        ):
            adds.append(inner)
            stack.extend(inner.args[:2])
        else:
            leaves.append(term)
    return leaves, adds


def _match_rel_pos(terms: list[torch.fx.Node], site: AttentionSite) -> LogitBias | None:
    """ViTDet's ``term_h[..., None] + term_w[..., None, :]``: einsums of the unscaled queries with
    (qh, kh, d) and (qw, kw, d) tables, broadcast over the key grid."""
    leaves, adds = _leaf_terms(terms)
    if len(leaves) != 2:
        return None
    found: dict[str, tuple[torch.fx.Node, tuple[int, int]]] = {}
    visited = list(adds)
    for operand in leaves:
        shape = tensor_info(operand).shape
        einsum = _through(operand, (OpKind.LAYOUT,), ("unsqueeze", "getitem", "view", "reshape", "slice"))
        if op_kind(einsum) != OpKind.EINSUM or len(shape) != 5:
            return None
        ins, out = einsum.args[0].replace(" ", "").split("->")
        qsub, tsub = ins.split(",")
        if len(qsub) != 4 or len(tsub) != 3 or qsub[:3] != out[:3] or tsub[2] != qsub[3] or out[3] != tsub[1]:
            return None
        axis = "h" if tsub[0] == qsub[1] else "w" if tsub[0] == qsub[2] else None
        if axis is None or (axis == "h") != (shape[4] == 1):
            return None
        operands = einsum.args[1] if isinstance(einsum.args[1], (list, tuple)) else einsum.args[1:]
        r_q, table = operands[0], operands[1]
        if _through(r_q, (OpKind.LAYOUT,), ("view", "reshape", "_unsafe_view")) is not site.q:
            return None
        found[axis] = (table, tuple(tensor_info(r_q).shape[1:3]))
        visited += [operand, einsum]
    if set(found) != {"h", "w"}:
        return None
    site.nodes.extend(n for n in visited if n not in site.nodes)
    qh, qw = found["h"][1]
    kh, kw = tensor_info(found["h"][0]).shape[1], tensor_info(found["w"][0]).shape[1]
    return LogitBias(LogitTerm.DECOMPOSED_REL_POS, (found["h"][0], found["w"][0]), (qh, qw), (kh, kw))


def _check_layout(site: AttentionSite) -> None:
    """Delta attention needs q, k, v viewable as (B, H, N, d) with tokens in sequence order."""
    layouts = [token_layout(site.q), token_layout(site.k), token_layout(site.v)]
    if any(layout is None for layout in layouts):
        site.dense_reason = site.dense_reason or "q, k or v is not a token tensor"
        return
    spaces = {layout.space for layout in layouts}
    if len(spaces) != 1:
        q_space, kv_space = layouts[0].space, layouts[1].space
        kind = (
            "spatial-reduction attention: keys and values from a reduced sequence"
            if kv_space.tokens < q_space.tokens and kv_space.batch == q_space.batch
            else "cross-attention"
        )
        site.dense_reason = site.dense_reason or (
            f"queries from {q_space.name} ({q_space.tokens} tokens), keys and values from {kv_space.name} "
            f"({kv_space.tokens} tokens) ({kind}); delta attention needs one sequence: dense on its buffers"
        )
        return
    space = layouts[0].space
    shape = tensor_info(site.q).shape
    k_shape = tensor_info(site.k).shape
    if len(k_shape) != len(shape) or k_shape[:-1] != shape[:-1]:
        site.dense_reason = site.dense_reason or (
            f"queries {tuple(shape)} and keys {tuple(k_shape)} hold different positions of {space.name} "
            "(queries subsampled from the keys' tokens); delta attention needs the same tokens"
        )
        return
    canonical = len(shape) >= 3 and shape[-2] == space.tokens and all(lay.heads_canonical for lay in layouts)
    if not canonical:
        site.windowed = len(shape) >= 3 and shape[-2] < space.tokens
        group_ids = _group_ids(layouts, shape)
        if group_ids is not None:
            site.group_ids = group_ids
            site.heads_shape = (group_ids.shape[0], 1, group_ids.shape[1], shape[-1])
            return
        site.dense_reason = site.dense_reason or (
            "windowed attention (tokens attend within groups: windows, or the frames or patch positions of "
            "divided space-time attention) in a layout the delta update does not follow: it stays dense"
            if site.windowed
            else "the query layout is not (batch, heads, tokens, channels)"
        )
        return
    site.heads_shape = (
        space.batch,
        math.prod(shape) // (space.batch * space.tokens * shape[-1]),
        space.tokens,
        shape[-1],
    )
    for layout, node in zip(layouts, (site.q, site.k, site.v), strict=True):
        if not layout.heads_canonical:
            site.dense_reason = (
                site.dense_reason or f"'{node.name}' does not hold the tokens in sequence order per head"
            )
            return


def _group_ids(layouts, shape) -> torch.Tensor | None:
    """(rows, n) token ids of q when q, k and v hold the same tokens in every row of n positions
    (self-attention within groups) and no row holds a token twice; None otherwise."""
    if len(shape) < 3 or any(lay.ids is None or lay.ids.shape[-1] != 1 for lay in layouts):
        return None  # a row must be one token (the ids constant along the channels)
    n = shape[-2]
    ids = [lay.ids.expand(*shape[:-1], 1)[..., 0].reshape(-1, n) for lay in layouts]
    if not all(torch.equal(ids[0], other) for other in ids[1:]):
        return None
    rows = ids[0].long()
    ordered = rows.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] > 0)
    return None if bool(repeated.any()) else rows


def materialize_bias(graph: torch.fx.Graph, bias: LogitBias, before: torch.fx.Node) -> torch.fx.Node:
    """One node, inserted before ``before``, that holds the sum of a site's constant logit
    terms in the layout of the logits the softmax reads: each term is broadcast to the logits
    where it is added, then passed through the views and scales that follow in the chain."""
    total = None
    with graph.inserting_before(before):
        for term, add, after in bias.recipe:
            shape = tuple(tensor_info(add).shape)
            x = graph.call_function(torch.broadcast_to, (term, shape))
            _copy_meta(x, add)
            for op, source in after:
                x = graph.node_copy(op, lambda a, source=source, x=x: x if a is source else a)
                _copy_meta(x, op)
            if total is None:
                total = x
            else:
                total = graph.call_function(operator.add, (total, x))
                _copy_meta(total, x)
    return total


def _copy_meta(node: torch.fx.Node, like: torch.fx.Node) -> None:
    set_tensor_info(node, tensor_info(like))
    set_op(node, op_kind(like) if like.op == "call_function" else OpKind.LAYOUT)
    set_role(node, RoleRecord(Role.NON_TOKEN, "constant logit term"))
    set_tokens(node, None)


PATTERNS = (
    Pattern(
        "explicit",
        "softmax(q' @ k^T (+ terms)*, -1) @ v, scales and views anywhere in the logit chain",
        _is_logits,
        _match_explicit,
    ),
    Pattern(
        "fused",
        "scaled_dot_product_attention(q, k, v, attn_mask=terms?, scale=s?)",
        lambda node: op_kind(node) == OpKind.SDPA,
        _match_fused,
    ),
)


class AttentionSites:
    """Pass: the attention sites, matched from their canonical forms."""

    name = "attention_sites"
    reads = frozenset({OP, ROLE, TOKENS, TENSOR, MODULE_PATH})
    writes = frozenset({ATTENTION, SITES, SITE_MISSES})

    def run(self, gm: torch.fx.GraphModule, ctx) -> None:
        misses: list[SiteMiss] = []
        ctx.put(SITES, find_attention_sites(gm, misses))
        ctx.put(SITE_MISSES, misses)
