"""Typed node metadata shared by the passes.

Every analysis writes one record type under one namespaced key of ``node.meta``; nothing is
stored as an attribute on a Node. The keys and record types are the contract between passes
(see ARCHITECTURE.md for who writes and who reads each).
"""

from __future__ import annotations

import enum
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx

TENSOR = "evtrace.tensor"  # TensorInfo, written by the tracer
OP = "evtrace.op"  # OpKind, written by passes.canonicalize
TOKENS = "evtrace.tokens"  # TokenLayout | None, written by passes.token_flow
ROLE = "evtrace.role"  # RoleRecord, written by passes.token_flow
ATTENTION = "evtrace.attention"  # site name (str) on every node of an attention site
REGION = "evtrace.region"  # region name (str) on every node of a token-wise region
MODULE_PATH = "evtrace.module_path"  # str, written by the tracer

FRONTEND = "evtrace.frontend"  # gm.meta: the front end that traced the graph ("fx" | "export")
PRETRACED = (
    "evtrace.pretraced"  # gm.meta: a graph cut from a traced one (passes.split_steps): not traced again
)

# Records of the pass context (passes.pipeline.PassContext), one per key, by the pass that makes them.
SPACES = "evtrace.spaces"  # list[TokenSpace], passes.token_flow
SITES = "evtrace.sites"  # list[AttentionSite], passes.attention_sites
SITE_MISSES = "evtrace.site_misses"  # list[SiteMiss]: why a matmul is not a site, passes.attention_sites
REGIONS = "evtrace.regions"  # list[Region], passes.regions
PLAN = "evtrace.plan"  # evtrace.graph.plan.Plan, passes.plan
STEPS = "evtrace.steps"  # evtrace.graph.plan.StepSearch, passes.time_steps
SELECTIONS = "evtrace.selections"  # region name -> selection-index node, passes.sparse_regions


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class OpKind(enum.Enum):
    """The canonical vocabulary: one spelling for each op, whichever front end traced it."""

    INPUT = "input"
    OUTPUT = "output"
    PARAM = "param"  # get_attr: parameters, buffers, constants
    SHAPE = "shape"  # sizes and Python arithmetic on them
    LINEAR = "linear"
    CONV = "conv"
    POOL = "pool"  # spatial pooling and resampling: mixes neighbouring positions, no weights
    LAYER_NORM = "layer_norm"
    UNARY = "unary"  # elementwise activations, casts, dropout in eval, identity
    BINARY = "binary"  # elementwise add/sub/mul/div with broadcasting
    SOFTMAX = "softmax"
    REDUCE = "reduce"  # mean/sum/amax over dims
    MATMUL = "matmul"
    EINSUM = "einsum"
    SDPA = "sdpa"
    LAYOUT = "layout"  # view/reshape/permute/transpose/flatten/pad/slice/select/cat/...
    GUARD = "guard"  # export's input guards; no data
    UNKNOWN = "unknown"


class Role(enum.Enum):
    """What a node does to the token sequence."""

    NON_TOKEN = "non-token"  # constants, shapes, the input image before tokens exist
    SOURCE = "source"  # creates a token sequence (patch embedding, class-token concat)
    TOKENWISE = "token-wise"  # acts on each token independently
    LAYOUT = "layout"  # moves token rows, all tokens kept
    MIXING = "token-mixing"  # combines tokens (attention)
    SELECTING = "token-selecting"  # keeps some tokens (class-token readout, pooling)
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RoleRecord:
    role: Role
    reason: str = ""
    pairwise: bool = False  # a product of two token operands, token x token (attention logits)


@dataclass(frozen=True)
class TokenSpace:
    """One token sequence: ``batch`` independent streams of ``tokens`` tokens each.

    Token ``t`` of stream ``b`` has the global id ``offset + b * tokens + t + 1``; id 0 means
    "no token" (padding, constants). ``prefix`` lists tokens that do not come from the input
    (class and register tokens), which policies may always update.
    """

    name: str
    batch: int
    tokens: int
    offset: int
    prefix: tuple[int, ...] = ()
    source: str = ""

    def contains(self, ident: int) -> bool:
        return self.offset < ident <= self.offset + self.batch * self.tokens


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens are in one tensor.

    ``row_ids`` holds the global token id of every position of the tensor's leading
    ``token_ndim`` dims (0 for padding rows); the remaining dims are channels, constant per
    token. ``row_major`` is False when tokens and channels interleave (head layouts) or some
    token is missing or repeated; such tensors cannot be gathered row by row.
    """

    space: TokenSpace
    token_dims: tuple[int, ...]
    token_ndim: int
    row_ids: torch.Tensor | None = field(compare=False, repr=False)
    row_major: bool
    complete: bool
    canonical: bool  # rows are exactly the space's tokens in id order, no padding
    sequence_dim: int | None = None  # dim s with ids[b, .., t@s, ..] = token t of stream b
    heads_canonical: bool = False  # viewable as (B, heads, N, d) with tokens in sequence order
    # the token id of every element, each dim along which the ids do not change narrowed to 1
    ids: torch.Tensor | None = field(default=None, compare=False, repr=False)


def module_path(node: torch.fx.Node) -> str:
    """The dotted module path a node belongs to (``blocks.3.attn.qkv``), or ''."""
    note_read(MODULE_PATH)
    path = node.meta.get(MODULE_PATH)
    if path is not None:
        return path
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        return path
    return ""


# The accessors: the only code that reads or writes evtrace's keys of ``node.meta``. While a
# pass runs, they note which keys it reads and writes (``recording``), for the runner's check.


@dataclass
class Touched:
    """The keys read and written while :func:`recording` was active."""

    reads: set[str] = field(default_factory=set)
    writes: set[str] = field(default_factory=set)


_touched: Touched | None = None


@contextmanager
def recording():
    """Note every key the accessors (and the pass context's ``get``/``put``) read or write
    until the block ends; yields the :class:`Touched` record. Blocks nest: the outer one is
    paused while an inner one runs."""
    global _touched
    outer, _touched = _touched, Touched()
    try:
        yield _touched
    finally:
        _touched = outer


def note_read(key: str) -> None:
    if _touched is not None:
        _touched.reads.add(key)


def note_write(key: str) -> None:
    if _touched is not None:
        _touched.writes.add(key)


def tensor_info(node: torch.fx.Node) -> TensorInfo | None:
    if _touched is not None:
        _touched.reads.add(TENSOR)
    return node.meta.get(TENSOR)


def example_value(node: torch.fx.Node) -> torch.Tensor | None:
    """The (fake) tensor the front end recorded for ``node`` (torch's ``meta["val"]``, with its
    strides), or None."""
    value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def frontend_of(gm: torch.fx.GraphModule) -> str:
    note_read(FRONTEND)
    return gm.meta.get(FRONTEND, "fx")


def set_frontend(gm: torch.fx.GraphModule, name: str) -> None:
    note_write(FRONTEND)
    gm.meta[FRONTEND] = name


def set_tensor_info(node: torch.fx.Node, info: TensorInfo | None) -> None:
    note_write(TENSOR)
    node.meta[TENSOR] = info


def set_module_path(node: torch.fx.Node, path: str) -> None:
    note_write(MODULE_PATH)
    node.meta[MODULE_PATH] = path


def op_kind(node: torch.fx.Node) -> OpKind:
    if _touched is not None:
        _touched.reads.add(OP)
    return node.meta.get(OP, OpKind.UNKNOWN)


def set_op(node: torch.fx.Node, kind: OpKind) -> None:
    note_write(OP)
    node.meta[OP] = kind


def token_layout(node: torch.fx.Node) -> TokenLayout | None:
    if _touched is not None:
        _touched.reads.add(TOKENS)
    return node.meta.get(TOKENS)


def set_tokens(node: torch.fx.Node, layout: TokenLayout | None) -> None:
    note_write(TOKENS)
    node.meta[TOKENS] = layout


def role(node: torch.fx.Node) -> RoleRecord | None:
    """The node's RoleRecord, or None before passes.token_flow ran."""
    if _touched is not None:
        _touched.reads.add(ROLE)
    return node.meta.get(ROLE)


def set_role(node: torch.fx.Node, record: RoleRecord) -> None:
    note_write(ROLE)
    node.meta[ROLE] = record


def site_of(node: torch.fx.Node) -> str | None:
    """The name of the attention site the node belongs to, or None."""
    note_read(ATTENTION)
    return node.meta.get(ATTENTION)


def set_site(node: torch.fx.Node, name: str) -> None:
    note_write(ATTENTION)
    node.meta[ATTENTION] = name


def region_of(node: torch.fx.Node) -> str | None:
    """The name of the token-wise region the node belongs to, or None."""
    note_read(REGION)
    return node.meta.get(REGION)


def set_region(node: torch.fx.Node, name: str) -> None:
    note_write(REGION)
    node.meta[REGION] = name
