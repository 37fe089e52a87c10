"""Token selection policies: which tokens a gate recomputes this frame.

A policy maps per-token error norms to a per-batch-row index set.  Batch rows are
independent streams, so every row gets its own indices; there is never a union
across the batch.

Shapes used throughout: ``B`` batch rows (streams), ``N`` tokens, ``R`` tokens
selected per row.

==========================  =====================  ===========================
policy                      R (tokens per row)     static shapes / compile
==========================  =====================  ===========================
``TopK(r)``                 ``r``                  yes
``TopFraction(f)``          ``ceil(f * N)``        yes
``FixedCapacityThreshold``  ``capacity`` + mask    yes
``Threshold(tau)``          max count over rows    no: one host sync per call
``All()``                   ``N``                  yes
==========================  =====================  ===========================

Parameters (``r``, ``f``, ``tau``, ``capacity``) are plain attributes validated on
assignment, so they may change between frames without any reset.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

from evtrace.graph.errors import BudgetError

__all__ = [
    "Selection",
    "Policy",
    "TopK",
    "TopFraction",
    "Threshold",
    "FixedCapacityThreshold",
    "All",
    "as_policy",
    "check_budget",
    "counted_tokens",
]

# Smallest reference norm used as a divisor for relative thresholds.
_REL_EPS = 1e-12


class Selection(NamedTuple):
    """The tokens a gate updates this frame.

    index: LongTensor (B, R), per batch row the selected token indices, distinct
        within a row, in no particular order.
    mask: BoolTensor (B, R) or None.  None means every selected token is a real
        update.  Otherwise False marks padding slots (fixed-capacity policies): the
        caller feeds those rows from the reference so that they change nothing.
    """

    index: Tensor
    mask: Tensor | None


# ----------------------------------------------------------------------------- math


def forced_scores(score: Tensor, forced: Tensor | None) -> Tensor:
    """Scores with the forced tokens raised to +inf so that top-k always picks them.

    score: (B, N) float; forced: (N,) bool or None.  Returns (B, N).
    """
    if forced is None:
        return score
    return score.masked_fill(forced, float("inf"))


def relative_error(error: Tensor, reference_norm: Tensor) -> Tensor:
    """error / reference_norm, with the divisor clamped away from 0.  (B, N) -> (B, N)."""
    return error / reference_norm.clamp_min(_REL_EPS)


def topk_indices(score: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Per-row top-r.  score (B, N) -> (values (B, r), index (B, r) long)."""
    return torch.topk(score, r, dim=1, largest=True, sorted=False)


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def _check_tau(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"tau must be a real number >= 0, got {type(value).__name__} {value!r}")
    value = float(value)
    if not value >= 0.0 or math.isinf(value):  # rejects NaN too
        raise ValueError(f"tau must be a finite real number >= 0, got {value}")
    return value


def _check_inputs(
    error: Tensor, reference_norm: Tensor | None, forced: Tensor | None, need_reference: bool
) -> None:
    if not isinstance(error, Tensor) or error.dim() != 2:
        got = tuple(error.shape) if isinstance(error, Tensor) else type(error).__name__
        raise ValueError(f"error must be a (B, N) tensor of per-token error norms, got {got}")
    if not error.is_floating_point():
        raise TypeError(f"error must be a floating point tensor, got dtype {error.dtype}")
    if reference_norm is not None and (
        not isinstance(reference_norm, Tensor) or reference_norm.shape != error.shape
    ):
        got = tuple(reference_norm.shape) if isinstance(reference_norm, Tensor) else reference_norm
        raise ValueError(f"reference_norm must have the shape of error {tuple(error.shape)}, got {got}")
    if need_reference and reference_norm is None:
        raise ValueError("reference_norm is required by a relative threshold (relative=True), got None")
    if forced is not None:
        if not isinstance(forced, Tensor) or forced.dtype != torch.bool or forced.shape != (error.shape[1],):
            got = (
                f"{tuple(forced.shape)} {forced.dtype}"
                if isinstance(forced, Tensor)
                else type(forced).__name__
            )
            raise ValueError(
                f"forced must be a bool tensor of shape (N,) = ({error.shape[1]},) or None, got {got}"
            )


# ----------------------------------------------------------------------------- policies


class Policy:
    """Base class.  Subclasses implement ``select`` and ``tokens_per_frame``."""

    #: True when the number of selected tokens depends on the data (host sync).
    data_dependent: bool = False

    def select(
        self, error: Tensor, reference_norm: Tensor | None = None, forced: Tensor | None = None
    ) -> Selection:
        """Pick the tokens to update.

        error: (B, N) per-token error norms ``||c - p||``.
        reference_norm: (B, N) norms of the reference tokens ``||p||`` (relative
            thresholds only; others ignore it).
        forced: (N,) bool or None, tokens always selected (e.g. the class token).
        Returns a ``Selection`` with index (B, R) and mask (B, R) or None.
        """
        raise NotImplementedError

    def tokens_per_frame(self, n: int) -> int | None:
        """Tokens selected per batch row for N = n tokens, None when data-dependent."""
        raise NotImplementedError


class TopK(Policy):
    """The r tokens with the largest error, per batch row.  Static shapes.

    Forced tokens count towards r (if more than r tokens are forced, r of them are
    picked).
    """

    def __init__(self, r: int):
        self.r = r

    @property
    def r(self) -> int:
        return self._r

    @r.setter
    def r(self, value: int) -> None:
        self._r = _check_int("r", value, 1)

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=False)
        n = error.shape[1]
        if self._r > n:
            raise ValueError(f"TopK: r must be in [1, N] = [1, {n}], got r={self._r} for N={n} tokens")
        _, index = topk_indices(forced_scores(error, forced), self._r)
        return Selection(index, None)

    def tokens_per_frame(self, n: int) -> int:
        return self._r

    def __repr__(self) -> str:
        return f"TopK(r={self._r})"


class TopFraction(Policy):
    """The ceil(f * N) tokens with the largest error, per batch row.  Static shapes."""

    def __init__(self, f: float):
        self.f = f

    @property
    def f(self) -> float:
        return self._f

    @f.setter
    def f(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"f must be a real number in (0, 1], got {type(value).__name__} {value!r}")
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"f must be a real number in (0, 1], got {value}")
        self._f = float(value)

    def tokens_per_frame(self, n: int) -> int:
        n = int(n)  # a traced size under torch.jit.trace (fvcore) is a tensor
        # round() first so that e.g. 0.1 * 30 = 3.0000000000000004 gives 3, not 4
        return min(n, max(1, math.ceil(round(self._f * n, 9))))

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=False)
        _, index = topk_indices(forced_scores(error, forced), self.tokens_per_frame(error.shape[1]))
        return Selection(index, None)

    def __repr__(self) -> str:
        return f"TopFraction(f={self._f:g})"


class _ThresholdBase(Policy):
    def __init__(self, tau: float, relative: bool):
        self.tau = tau
        if not isinstance(relative, bool):
            raise TypeError(f"relative must be a bool, got {type(relative).__name__} {relative!r}")
        self.relative = relative

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        self._tau = _check_tau(value)

    def _scores(self, error, reference_norm, forced) -> Tensor:
        _check_inputs(error, reference_norm, forced, need_reference=self.relative)
        score = relative_error(error, reference_norm) if self.relative else error
        return forced_scores(score, forced)


class Threshold(_ThresholdBase):
    """Every token whose error (or error / reference norm when ``relative``) exceeds tau.

    Data-dependent: R = the largest count over the batch rows, and every row takes
    its top-R tokens, so rows with fewer tokens above tau also update their next
    largest ones (harmless extra work).  Reading R synchronises with the host once
    per call (``.item()``) and breaks a ``torch.compile`` graph there; use
    ``FixedCapacityThreshold`` for static shapes.  R may be 0 (index of shape (B, 0)).
    """

    data_dependent = True

    def __init__(self, tau: float, relative: bool = False):
        super().__init__(tau, relative)

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        score = self._scores(error, reference_norm, forced)
        r = int((score > self._tau).sum(dim=1).max().item()) if score.shape[0] else 0  # host sync
        values, index = topk_indices(score, r)
        # r is the largest count of the batch: the other streams mask their extra slots out
        return Selection(index, values > self._tau if score.shape[0] > 1 else None)

    def tokens_per_frame(self, n: int) -> None:
        return None

    def __repr__(self) -> str:
        return f"Threshold(tau={self._tau:g}, relative={self.relative})"


class FixedCapacityThreshold(_ThresholdBase):
    """Threshold with a static budget: the top ``capacity`` tokens per row, masked.

    ``mask`` is True for the selected tokens that exceed tau (or are forced); the
    others are padding.  Tokens above tau beyond the capacity wait for a later frame
    (their error keeps growing).  Static shapes, compiles without graph breaks.
    """

    def __init__(self, tau: float, capacity: int, relative: bool = False):
        super().__init__(tau, relative)
        self.capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._capacity = _check_int("capacity", value, 1)

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        score = self._scores(error, reference_norm, forced)
        n = error.shape[1]
        if self._capacity > n:
            raise ValueError(
                f"FixedCapacityThreshold: capacity must be in [1, N] = [1, {n}], "
                f"got capacity={self._capacity} for N={n} tokens"
            )
        values, index = topk_indices(score, self._capacity)
        return Selection(index, values > self._tau)

    def tokens_per_frame(self, n: int) -> int:
        return self._capacity

    def __repr__(self) -> str:
        return (
            f"FixedCapacityThreshold(tau={self._tau:g}, capacity={self._capacity}, relative={self.relative})"
        )


class All(Policy):
    """Every token (first frame, refresh, or the exactness check)."""

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=False)
        b, n = error.shape
        index = torch.arange(n, device=error.device).expand(b, n).contiguous()
        return Selection(index, None)

    def tokens_per_frame(self, n: int) -> int:
        return n

    def __repr__(self) -> str:
        return "All()"


def as_policy(obj) -> Policy:
    """A Policy from a Policy (returned as is) or an int budget r (``TopK(r)``)."""
    if isinstance(obj, Policy):
        return obj
    if isinstance(obj, numbers.Integral) and not isinstance(obj, bool):
        return TopK(int(obj))
    raise TypeError(
        "expected a Policy (TopK, TopFraction, Threshold, FixedCapacityThreshold) "
        f"or an int budget, got {type(obj).__name__} {obj!r}"
    )


def check_budget(policy: Policy, tokens: int, gate: str) -> None:
    """Raise BudgetError when ``policy`` selects a count outside [1, ``tokens``] at ``gate``."""
    r = policy.tokens_per_frame(tokens)
    if r is not None and not 1 <= r <= tokens:
        raise BudgetError(
            f"{policy!r} selects {r} tokens per frame at gate '{gate}', which has N={tokens} "
            f"tokens: choose a budget in [1, {tokens}]"
        )


def counted_tokens(policy: Policy, tokens: int) -> int:
    """r of ``policy`` at a gate of N = ``tokens`` as FLOP counts take it: its own count, or N
    (the worst case) for a data-dependent Threshold."""
    r = policy.tokens_per_frame(tokens)
    return tokens if r is None else min(r, tokens)
