"""The plan: what the rewrite will do to a model, as plain data.

``passes.plan`` builds one :class:`Plan` from the analysed graph; the rewrite passes consume it,
and the report, ``count_flops`` and the sympy cost model read it. It holds names, shapes and
reasons, never fx nodes, so it stays valid after the rewrite has consumed the graph it
describes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from evtrace.graph.meta import TokenSpace


class AttentionMode(str, enum.Enum):
    """What an attention site becomes."""

    EXACT = "exact"  # exact delta attention: equals dense attention on the buffered q, k, v
    PAPER = "paper"  # the paper's delta Q K^T and column-refresh A V (an approximation)
    DENSE = "dense"  # the original ops, recomputed on the buffered q, k, v

    @classmethod
    def parse(cls, value: str | AttentionMode) -> AttentionMode:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"attention must be one of {choices}, got {value!r}") from None

    def __str__(self) -> str:
        return self.value


class LogitTerm(str, enum.Enum):
    """An additive term of the attention logits that delta attention can recompute per entry."""

    CONSTANT = "constant"  # a tensor that does not depend on the tokens (mask, bias table)
    DECOMPOSED_REL_POS = "decomposed_rel_pos"  # ViTDet: q contracted with (qh, kh, d), (qw, kw, d) tables

    def __str__(self) -> str:
        return self.value


class LayerKind(str, enum.Enum):
    """The kinds of layer the cost model and ``count_flops`` report FLOPs under."""

    REGION = "region"
    DENSE_REGION = "region (dense)"
    ATTENTION = "attention"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TensorPlan:
    """One tensor at a region boundary: its node name, shape, element size and token rows."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    rows: int  # product of the leading token dims (padding rows included)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def channels(self) -> int:
        return self.numel // self.rows


@dataclass(frozen=True)
class CountedOp:
    """An op of a token-wise region that the paper convention counts, per token row.

    A linear when ``fan_out`` > 0 (``fan_in x fan_out`` multiply-adds, plus ``fan_out`` bias
    adds), else an elementwise add over ``adds`` channels.
    """

    name: str
    rows: int
    fan_in: int = 0
    fan_out: int = 0
    bias: bool = False
    adds: int = 0

    @property
    def is_linear(self) -> bool:
        return self.fan_out > 0


@dataclass(frozen=True)
class RegionPlan:
    """A token-wise region: gated (``reason`` empty) or dense with the reason."""

    name: str
    space: TokenSpace
    entries: tuple[TensorPlan, ...]  # token tensors made outside it: gated
    exits: tuple[TensorPlan, ...]  # members used outside it: buffered
    linears: tuple[str, ...]  # module paths of the linears that become sparse
    ops: tuple[CountedOp, ...]
    dim: int  # channels D of the token sequence (input width of its first linear)
    reason: str = ""

    @property
    def gated(self) -> bool:
        return not self.reason

    @property
    def state_bytes(self) -> int:
        """Gate references and exit buffers, all streams."""
        return sum(t.nbytes for t in self.entries + self.exits)


@dataclass(frozen=True)
class BiasPlan:
    kind: LogitTerm
    q_grid: tuple[int, int] | None = None
    k_grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class SitePlan:
    """An attention site: its shapes, logit terms, where q, k, v come from, and its mode."""

    name: str
    form: str  # "explicit" (matmul, softmax, matmul) or "fused" (scaled_dot_product_attention)
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dtype: torch.dtype
    scale: float
    bias: BiasPlan | None
    windowed: bool
    heads_shape: tuple[int, int, int, int] | None  # (B, H, N, d) view of q, k, v; (rows, 1, n, d) grouped
    space: TokenSpace
    dim: int  # channels D of the token sequence
    mode: AttentionMode
    reason: str = ""  # why the site stays dense (empty when it is delta-updated)
    q_region: str = ""  # the regions whose exits feed q and k/v through layout ops
    kv_region: str = ""
    q_from: str = ""  # module paths of the linears that make q, k, v and read the output
    k_from: str = ""
    v_from: str = ""
    then: str = ""
    grouped: bool = False  # attention within groups of tokens (windows), each group its own stream

    @property
    def delta(self) -> bool:
        return self.mode in (AttentionMode.EXACT, AttentionMode.PAPER)


@dataclass(frozen=True)
class StepStructure:
    """A sub-model that runs once per time step: the time steps of a view folded into the batch.

    Rows of the folded tensors are ``views * steps``; row ``b * steps + t`` (``order`` "view-major")
    or ``t * views + b`` ("step-major") holds time step ``t`` of view ``b``. ``inputs`` are the
    nodes whose (folded) values enter the sub-model, ``outputs`` the sub-model's nodes read after
    it, ``row_dims`` the dim of each output that holds the rows, ``nodes`` the sub-model.
    """

    steps: int
    views: int
    order: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    row_dims: tuple[int, ...]
    nodes: tuple[str, ...]
    modules: str  # the module paths it covers, summarised ("spatial")
    token_dims: tuple[tuple[int, ...] | None, ...] = ()  # per input: its token dims, or None (frames)


@dataclass(frozen=True)
class StepSearch:
    """What the time-step analysis found: a per-step sub-model, or why there is none."""

    structure: StepStructure | None
    reason: str = ""


@dataclass(frozen=True)
class StepPlan:
    """An eventful model whose stream is the time steps inside each call.

    The per-step sub-model runs ``steps`` times per call, in order, with its state carried from
    step to step; it starts afresh at each call unless ``carry`` (sliding clips). Everything
    outside it runs densely once per call: ``outer_flops`` by module path.
    """

    steps: int
    views: int
    order: str
    modules: str
    carry: bool
    outer_flops: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class LinearPlan:
    node: str
    module: str
    shape: tuple[int, ...]
    region: str
    reason: str = ""  # why it stays dense; empty for a sparse linear

    @property
    def sparse(self) -> bool:
        return not self.reason


@dataclass(frozen=True)
class FallbackPlan:
    """An op on a token path that no rule understands: it stays dense."""

    node: str
    module: str
    op: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """Everything the rewrite, the report and the cost model need to know about one graph."""

    model: str
    frontend: str
    spaces: tuple[TokenSpace, ...]
    regions: tuple[RegionPlan, ...]
    sites: tuple[SitePlan, ...]
    linears: tuple[LinearPlan, ...]
    fallbacks: tuple[FallbackPlan, ...]
    other_flops: tuple[tuple[str, int], ...]  # FLOPs outside regions and sites, by module path
    windows: tuple[int, ...]  # window sides of windowed attention
    repair_rows: int
    attention: AttentionMode = AttentionMode.EXACT  # the mode asked for
    steps: StepPlan | None = None  # set when the stream is the time steps inside a call
    step_search: StepSearch | None = None  # what the time-step analysis found (inspect)

    @property
    def gated_regions(self) -> tuple[RegionPlan, ...]:
        return tuple(r for r in self.regions if r.gated)

    def region(self, name: str) -> RegionPlan:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(f"no region named {name!r}; regions: {', '.join(r.name for r in self.regions)}")


ATTENTION_MODES = tuple(mode.value for mode in AttentionMode)  # the spellings transform() accepts
