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
``AdaptiveBudget``          per frame, mean target no: one host sync; a few
                            (peak at most)         bucket shapes with ``buckets``
``SteeredThreshold``        above tau per gate;    as ``AdaptiveBudget``
                            tau steered to target
``Staleness(p, k)``         p's, plus due tokens   as p, one extra host sync
==========================  =====================  ===========================

FLOP counts, reports and the savings warning price each policy at its steady-state average
(:meth:`Policy.mean_tokens_per_frame`: ``AdaptiveBudget`` at its target) and give the peak
(:meth:`Policy.peak_tokens_per_frame`) as the latency figure beside it; see
:func:`counted_tokens`.

Stateful policies (``AdaptiveBudget``, ``SteeredThreshold``, ``Staleness``) keep state per gate
and per batch row. One policy object serves every gate it is set on, so the state is kept per
*call slot*: the i-th ``select`` call of a frame belongs to the i-th gate the graph runs (the
order is fixed by the graph). ``EventfulModel`` calls :meth:`StatefulPolicy.start_frame` before each frame and
:meth:`StatefulPolicy.reset_state` when streams restart (a dense frame: no gate calls
``select``). Used outside an eventful model (no ``start_frame`` ever called), every call shares
one slot: the policy then behaves as the state of a single gate.

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
    "StatefulPolicy",
    "AdaptiveBudget",
    "SteeredThreshold",
    "Staleness",
    "GateAllocation",
    "as_policy",
    "check_budget",
    "counted_tokens",
    "has_peak",
    "PricedAs",
    "static_for_counting",
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


def _plain_setting(value):
    if isinstance(value, Policy):
        return value.settings()
    if isinstance(value, tuple):
        return list(value)
    return value


class Policy:
    """Base class.  Subclasses implement ``select`` and ``tokens_per_frame``."""

    #: True when the number of selected tokens depends on the data (host sync).
    data_dependent: bool = False
    #: the attributes that define the policy (see :meth:`settings`)
    _SETTINGS: tuple[str, ...] = ()

    def settings(self) -> dict:
        """The policy's parameters as plain data, its type name included: what a stream file
        records and compares with the receiving model's policies (never applies to them)."""
        return {"type": type(self).__qualname__} | {
            name: _plain_setting(getattr(self, name)) for name in self._SETTINGS
        }

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

    def mean_tokens_per_frame(self, n: int) -> int | None:
        """Tokens per batch row and frame on average in the steady state, rounded up: what FLOP
        counts, reports and the savings warning price. None when the policy sets no bound
        (``Threshold``: priced at N). Static policies: :meth:`tokens_per_frame`."""
        return self.tokens_per_frame(n)

    def peak_tokens_per_frame(self, n: int) -> int | None:
        """The most tokens per batch row in one steady frame: the latency (worst-case) figure.
        None when the policy sets no bound (up to N). Static policies: :meth:`tokens_per_frame`."""
        return self.tokens_per_frame(n)


class TopK(Policy):
    """The r tokens with the largest error, per batch row.  Static shapes.

    Forced tokens count towards r (if more than r tokens are forced, r of them are
    picked).
    """

    _SETTINGS = ("r",)

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

    _SETTINGS = ("f",)

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
    _SETTINGS = ("tau", "relative")

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

    _SETTINGS = ("tau", "capacity", "relative")

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


# ----------------------------------------------------------------------------- stateful policies

#: More select calls than this in one frame means start_frame is not being called (a bug).
MAX_SLOTS = 4096


def _check_fraction(name: str, value, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be a fraction of the tokens in (0, 1], got {value}")
    return value


class StatefulPolicy(Policy):
    """A policy with state per gate (call slot) and per batch row (see the module docstring).

    Subclasses implement ``_new_state(b, n, device) -> dict`` and ``_restart(state, rows)``.
    """

    def __init__(self) -> None:
        self._slots: list[dict | None] = []
        self._cursor = 0
        self._hooked = False

    def start_frame(self) -> None:
        """A new frame begins: the next ``select`` call is the first gate's."""
        self._hooked = True
        self._cursor = 0

    def reset_state(
        self, streams: list[int] | None = None, batch: int | None = None, cut: bool = False
    ) -> None:
        """Streams restart (their next frame is dense). ``streams=None``: all of them; otherwise
        the given streams of a batch of ``batch`` (a slot of B rows gives each stream B // batch
        consecutive rows, batch-major). ``cut``: the restart is a scene cut, the stream goes on
        (a policy may keep what it learnt of the stream: SteeredThreshold keeps its tau)."""
        if streams is None:
            self._slots = []
            return
        for state in self._slots:
            if state is None:
                continue
            rows_total = state["shape"][0]
            per = max(1, rows_total // max(1, batch or rows_total))
            rows = [r for b in streams for r in range(b * per, (b + 1) * per) if r < rows_total]
            if rows:
                self._restart(state, rows)

    def _slot(self, b: int, n: int, device) -> dict:
        i = self._cursor if self._hooked else 0
        if self._hooked:
            self._cursor += 1
        if i >= MAX_SLOTS:
            raise RuntimeError(
                f"{self!r}: {i} select calls in one frame; a stateful policy needs start_frame() before "
                "each frame (EventfulModel does this in eager mode; under torch.compile use TopK, "
                "TopFraction or FixedCapacityThreshold)"
            )
        while len(self._slots) <= i:
            self._slots.append(None)
        state = self._slots[i]
        if state is None or state["shape"] != (b, n) or state["device"] != device:
            state = self._new_state(b, n, device)
            state["shape"], state["device"] = (b, n), device
            self._slots[i] = state
        return state

    def _new_state(self, b: int, n: int, device) -> dict:
        raise NotImplementedError

    def _restart(self, state: dict, rows: list[int]) -> None:
        raise NotImplementedError

    # -- the stream state as data ---------------------------------------------------------------
    # ``deepcopy`` and pickle copy everything (a copy continues the stream); ``state_dict`` is the
    # state alone as plain data (tensors, ints, lists, dicts) for stream files.

    #: per-slot state tensors: name -> (dims, dtype or None for any floating dtype, required);
    #: dims name the slot's rows ("b") and tokens ("n")
    _SLOT_TENSORS: dict[str, tuple[tuple[str, ...], torch.dtype | None, bool]] = {}

    def fresh_copy(self) -> StatefulPolicy:
        """A copy with the same settings and no stream state (a new stream)."""
        import copy

        new = copy.deepcopy(self)
        new.reset_state()
        new._cursor, new._hooked = 0, False
        return new

    def state_dict(self) -> dict:
        """The per-stream state as plain data (tensors cloned; no settings, see
        :meth:`settings`): what a stream file holds and :meth:`load_state_dict` takes back."""
        slots = [
            None
            if s is None
            else {
                "shape": list(s["shape"]),
                "tensors": {k: v.detach().clone() for k, v in s.items() if k not in ("shape", "device")},
            }
            for s in self._slots
        ]
        return {"cursor": self._cursor, "hooked": self._hooked, "slots": slots} | self._extra_state()

    def check_state_dict(self, state) -> list[str]:
        """What keeps ``state`` from loading into this policy (empty when it fits): its layout,
        every tensor's shape, dtype and finiteness."""
        problems: list[str] = []
        if not isinstance(state, dict):
            return [f"the policy state is a {type(state).__name__}, not a dict"]
        for key, kind in (("cursor", int), ("hooked", bool), ("slots", list)):
            if not isinstance(state.get(key), kind) or (kind is int and isinstance(state[key], bool)):
                problems.append(f"'{key}' must be a {kind.__name__}, got {type(state.get(key)).__name__}")
        if problems:
            return problems
        if not 0 <= state["cursor"] <= MAX_SLOTS or len(state["slots"]) > MAX_SLOTS:
            problems.append(f"more than {MAX_SLOTS} slots")
        for i, slot in enumerate(state["slots"]):
            if slot is None:
                continue
            shape = slot.get("shape") if isinstance(slot, dict) else None
            if (
                not isinstance(shape, list)
                or len(shape) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
            ):
                problems.append(f"slot {i}: 'shape' must be [rows, tokens], got {shape!r}")
                continue
            tensors = slot.get("tensors")
            if not isinstance(tensors, dict):
                problems.append(f"slot {i}: 'tensors' must be a dict")
                continue
            sizes = {"b": shape[0], "n": shape[1]}
            problems += _check_tensors(f"slot {i}", tensors, self._SLOT_TENSORS, sizes)
        return problems + self._check_extra(state)

    def load_state_dict(self, state: dict, device=None) -> None:
        """Take the stream state of :meth:`state_dict` (onto ``device``; default: where its tensors
        are). Checked as a whole first: a state that does not fit raises ValueError and nothing
        changes. Settings are never loaded: they stay this policy's."""
        problems = self.check_state_dict(state)
        if problems:
            raise ValueError(
                f"{self!r}: the saved policy state does not fit: {'; '.join(problems[:6])}. "
                "Nothing was loaded"
            )
        slots = []
        for slot in state["slots"]:
            if slot is None:
                slots.append(None)
                continue
            tensors = {k: _placed(v, device) for k, v in slot["tensors"].items()}
            where = next(iter(tensors.values())).device if tensors else torch.device(device or "cpu")
            slots.append(tensors | {"shape": tuple(slot["shape"]), "device": where})
        self._slots, self._cursor, self._hooked = slots, state["cursor"], state["hooked"]
        self._load_extra(state, device)

    def _extra_state(self) -> dict:
        return {}

    def _check_extra(self, state: dict) -> list[str]:
        return []

    def _load_extra(self, state: dict, device) -> None:
        pass


def _placed(t: Tensor, device) -> Tensor:
    return t.detach().clone() if device is None else t.detach().to(device, copy=True)


def _check_tensors(where: str, tensors: dict, schema: dict, sizes: dict) -> list[str]:
    """Problems of a dict of state tensors against ``schema`` (see ``StatefulPolicy._SLOT_TENSORS``)."""
    problems = []
    for name in tensors:
        if name not in schema:
            problems.append(f"{where}: unexpected tensor '{name}'")
    for name, (dims, dtype, required) in schema.items():
        value = tensors.get(name)
        if value is None:
            if required:
                problems.append(f"{where}: tensor '{name}' is missing")
            continue
        if not isinstance(value, Tensor):
            problems.append(f"{where}: '{name}' is a {type(value).__name__}, not a tensor")
            continue
        want = tuple(sizes[d] for d in dims)
        if tuple(value.shape) != want:
            problems.append(f"{where}: '{name}' has shape {tuple(value.shape)}, expected {want}")
        if dtype is None and not value.is_floating_point():
            problems.append(f"{where}: '{name}' has dtype {value.dtype}, expected a floating dtype")
        elif dtype is not None and value.dtype != dtype:
            problems.append(f"{where}: '{name}' has dtype {value.dtype}, expected {dtype}")
        elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
            problems.append(f"{where}: '{name}' holds NaN or Inf")
    return problems


def _rows_mask(b: int, rows: list[int], device) -> Tensor:
    """(B,) bool, True at ``rows``. State is replaced, never written in place: tensors made under
    ``torch.inference_mode`` cannot be updated in place outside it."""
    hit = torch.zeros(b, dtype=torch.bool)
    hit[list(rows)] = True
    return hit.to(device)


def bucket_levels(low: int, peak: int, buckets) -> Tensor | None:
    """The capacity levels of a bucketed selection: ``buckets`` evenly spaced counts from
    ``low`` up to ``peak`` (an int) or the given fractions of ``peak`` (a sequence); None for
    exact counts."""
    if buckets is None:
        return None
    if isinstance(buckets, numbers.Integral):
        k = int(buckets)
        levels = {peak} | {max(1, round(low + (peak - low) * (i + 1) / k)) for i in range(k)}
    else:
        levels = {peak} | {max(1, min(peak, math.ceil(float(f) * peak))) for f in buckets}
    return torch.tensor(sorted(levels), dtype=torch.long)


def _check_buckets(buckets):
    """None, an int >= 1, or a non-empty sequence of fractions in (0, 1] (as a tuple)."""
    if buckets is None:
        return None
    if isinstance(buckets, numbers.Integral) and not isinstance(buckets, bool):
        if buckets < 1:
            raise ValueError(f"buckets must be an int >= 1, a sequence of fractions or None, got {buckets}")
        return int(buckets)
    try:
        fractions = [_check_fraction("bucket", f) for f in buckets]
    except TypeError:
        raise TypeError(
            f"buckets must be an int >= 1, a sequence of fractions or None, got {buckets!r}"
        ) from None
    if not fractions:
        raise ValueError("buckets must not be empty")
    return tuple(fractions)


def _bucketed(r: Tensor, low: int, peak: int, buckets) -> Tensor:
    """Counts r rounded up to the capacity levels of ``buckets`` (r itself when None); a count
    of 0 stays 0."""
    levels = bucket_levels(low, peak, buckets)
    if levels is None:
        return r
    levels = levels.to(r.device)
    return torch.where(r > 0, levels[torch.searchsorted(levels, r).clamp_max(levels.numel() - 1)], r)


def _average_budget(target, peak, low) -> tuple[float, float, float]:
    """Checked (target, peak, low) fractions of a policy that averages ``target``: peak defaults
    to min(1, 2 target), low to target / 4 (1 when target is 1)."""
    target = _check_fraction("target", target)
    peak = min(1.0, 2.0 * target) if peak is None else _check_fraction("peak", peak)
    if peak < target:
        raise ValueError(
            f"peak must be >= target (the average cannot exceed the peak), got {peak} < {target}"
        )
    low = (1.0 if target == 1.0 else target / 4.0) if low is None else _check_fraction("low", low)
    if low > target:
        raise ValueError(f"low must be <= target, got {low} > {target}")
    return target, peak, low


class _AverageCounts:
    """The counts of a policy that averages ``target`` of the tokens per frame, at least
    ``low`` and at most ``peak`` (fractions of N) in one frame."""

    target: float
    peak: float
    low: float

    def _low_peak(self, n: int) -> tuple[int, int]:
        """(fewest, most) tokens of a gate of N = n in one frame."""
        peak = min(n, max(1, math.ceil(round(self.peak * n, 9))))
        return min(peak, max(1, math.floor(round(self.low * n, 9)))), peak

    def tokens_per_frame(self, n: int) -> int:
        """The peak (the count is data-dependent)."""
        return self._low_peak(int(n))[1]

    def mean_tokens_per_frame(self, n: int) -> int:
        """``ceil(target N)``, within [low, peak]: the average the policy tracks."""
        low, peak = self._low_peak(int(n))
        return min(peak, max(low, math.ceil(round(self.target * int(n), 9))))

    def peak_tokens_per_frame(self, n: int) -> int:
        """``ceil(peak N)``: no gate selects more in one frame."""
        return self._low_peak(int(n))[1]


class AdaptiveBudget(StatefulPolicy):
    """A per-frame token budget that averages ``target`` (a fraction of N) per gate and stream.

    Frames that change more get more tokens, quiet frames fewer: each frame, per batch row,

    * demand ``d`` = the mean (relative, by default) error norm of the row's tokens, against its
      running mean ``m`` (exponential, ``smoothing``);
    * ``r = clamp(round(target N d / m + gain * deficit), low N, peak N)`` (the floor ``low N``
      counts only the tokens that changed at all, and the forced ones), where ``deficit`` is
      what the row has spent under its target so far (tokens; clamped to ``bank`` frames of the
      target): the average tracks the target, and a spike is paid back over the next frames;
    * the top-r tokens (by relative error, or by error when ``relative=False``) are updated.

    ``buckets``: None selects exactly r tokens (a data-dependent shape, like ``Threshold``); an
    int k (or a sequence of fractions of the peak) rounds r *up* to one of a few capacity levels
    between ``low`` and ``peak``, so that ``torch.compile`` sees at most that many shapes; the
    row then updates the whole level (the padding would be computed anyway) and counts it as
    spent. In a batch the index has the largest row's count and the other rows' extra slots are
    masked (rows stay independent). One host sync per call (the count).

    Args:
        target: mean fraction of the tokens per frame, in (0, 1]. ``target=1`` updates every
            token every frame.
        peak: the most per frame, in [target, 1] (default min(1, 2 target)): the latency
            figure (:meth:`peak_tokens_per_frame`). FLOP counts price the target
            (:meth:`mean_tokens_per_frame`: the steady-state average).
        low: the fewest per frame, in (0, target] (default target / 4).
        buckets: None, an int >= 1, or a sequence of fractions of the peak in (0, 1].
        gain: fraction of the deficit spent per frame, in (0, 1].
        smoothing: weight of a new frame in the running mean demand, in (0, 1].
        bank: the deficit is clamped to +-``bank`` frames of the target (>= 0).
        relative: rank and measure demand by error / reference norm (scale-free per gate).
    """

    data_dependent = True
    _SETTINGS = ("target", "peak", "low", "buckets", "gain", "smoothing", "bank", "relative")
    _SLOT_TENSORS = {
        "mean": (("b",), torch.float64, True),
        "deficit": (("b",), torch.float64, True),
        "fresh": (("b",), torch.bool, True),
        "last": (("b",), torch.long, False),
        "restarting": (("b",), torch.bool, False),
    }

    def __init__(
        self,
        target: float,
        peak: float | None = None,
        low: float | None = None,
        buckets=None,
        gain: float = 0.3,
        smoothing: float = 0.1,
        bank: float = 8.0,
        relative: bool = True,
    ):
        super().__init__()
        target, peak, low = _average_budget(target, peak, low)
        buckets = _check_buckets(buckets)
        for name, value in (("gain", gain), ("smoothing", smoothing)):
            _check_fraction(name, value)
        if isinstance(bank, bool) or not isinstance(bank, numbers.Real) or not 0 <= float(bank) < math.inf:
            raise ValueError(f"bank must be a finite real number >= 0, got {bank!r}")
        if not isinstance(relative, bool):
            raise TypeError(f"relative must be a bool, got {type(relative).__name__} {relative!r}")
        self.target, self.peak, self.low, self.buckets = target, peak, low, buckets
        self.gain, self.smoothing, self.bank, self.relative = (
            float(gain),
            float(smoothing),
            float(bank),
            relative,
        )

    def _counts(self, n: int) -> tuple[float, int, int]:
        """(target tokens, low tokens, peak tokens) at N = n."""
        peak = min(n, max(1, math.ceil(round(self.peak * n, 9))))
        low = min(peak, max(1, math.floor(round(self.low * n, 9))))
        return self.target * n, low, peak

    def tokens_per_frame(self, n: int) -> int:
        """The peak (the most one frame selects; the count is data-dependent)."""
        return self._counts(int(n))[2]

    def mean_tokens_per_frame(self, n: int) -> int:
        """``ceil(target N)`` (as ``TopFraction(target)`` rounds it), within [low, peak]: the
        average the budget tracks (the deficit pays back every frame above or below it)."""
        target, low, peak = self._counts(int(n))
        return min(peak, max(low, math.ceil(round(target, 9))))

    def peak_tokens_per_frame(self, n: int) -> int:
        """``ceil(peak N)``: no frame selects more (bucket levels included)."""
        return self._counts(int(n))[2]

    def _new_state(self, b, n, device) -> dict:
        return {
            "mean": torch.zeros(b, device=device, dtype=torch.float64),
            "deficit": torch.zeros(b, device=device, dtype=torch.float64),
            "fresh": torch.ones(b, device=device, dtype=torch.bool),
        }

    def _restart(self, state, rows) -> None:
        hit = _rows_mask(state["shape"][0], rows, state["fresh"].device)
        state["restarting"] = state.get("restarting", torch.zeros_like(hit)) | hit

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=self.relative)
        b, n = error.shape
        state = self._slot(b, n, error.device)
        score = relative_error(error, reference_norm) if self.relative else error
        finite = torch.where(torch.isinf(score), torch.zeros_like(score), score)  # Staleness marks
        demand = finite.double().mean(dim=1)
        fresh = state["fresh"]
        mean = torch.where(fresh, demand, state["mean"])
        target, low, peak = self._counts(n)
        ratio = torch.where(mean > _REL_EPS, demand / mean.clamp_min(_REL_EPS), torch.ones_like(mean))
        desired = target * ratio + self.gain * state["deficit"]
        moved = error != 0  # NaN counts as changed
        floor = (moved if forced is None else moved | forced).sum(dim=1).clamp(max=low)
        r = _bucketed(torch.maximum(desired.round().clamp(0, peak).long(), floor), low, peak, self.buckets)
        width = int(r.max()) if b else 0  # host sync
        values, index = torch.topk(forced_scores(score, forced), width, dim=1, largest=True, sorted=True)
        mask = None
        if b > 1 and bool((r < width).any()):
            mask = torch.arange(width, device=r.device)[None, :] < r[:, None]
        cap = self.bank * target
        deficit = (state["deficit"] + target - r.double()).clamp(-cap, cap)
        mean = (1.0 - self.smoothing) * mean + self.smoothing * demand
        fresh = torch.zeros_like(fresh)
        restarting = state.pop("restarting", None)
        if restarting is not None:  # their frame is dense: they start afresh after it
            deficit = deficit.masked_fill(restarting, 0.0)
            fresh = restarting.clone()
        state["deficit"], state["mean"], state["fresh"] = deficit, mean, fresh
        state["last"] = r
        return Selection(index, mask)

    def __repr__(self) -> str:
        extra = f", buckets={self.buckets}" if self.buckets is not None else ""
        rel = "" if self.relative else ", relative=False"
        return f"AdaptiveBudget(target={self.target:g}, peak={self.peak:g}, low={self.low:g}{extra}{rel})"


class SteeredThreshold(_AverageCounts, StatefulPolicy):
    """A relative threshold whose tau is steered so that the tokens spent average ``target``.

    Every gate updates the tokens whose relative error (error / reference norm) exceeds the
    stream's tau this frame, so a frame that changes more spends more and each gate spends what
    its own error asks for (shallow gates may need few tokens, deep ones many). One tau per
    stream, shared by every gate of the model; after each frame it moves by
    ``log tau += rate (spent / offered - target) / target``, where spent and offered are that
    frame's selected and total tokens over all its gates: over a long stream the average tracks
    ``target`` (the error is bounded by the clamp on tau, so the average's deviation shrinks as
    1 / frames) while single frames follow the picture. Per gate and frame the count is at most
    ``peak N`` and at least ``low N`` of the tokens that changed at all (error not 0) or are
    forced: where nothing changed the floor takes nothing, and a gate where nothing of the
    stream changed neither spends nor offers (a paused stream leaves tau where it was). A
    stream that restarts (``reset``) starts again from ``tau``; after a
    scene cut it keeps its tau (the same camera, the same error scale).

    Args:
        target: mean fraction of the tokens per frame, in (0, 1].
        tau: the starting relative threshold (> 0).
        peak: the most per gate and frame, in [target, 1] (default min(1, 2 target)).
        low: the fewest per gate and frame, in (0, target] (default target / 4), among the
            tokens that changed at all (and the forced ones).
        rate: how fast tau moves, in (0, 1] (fraction of the relative overspend per frame).
            Slower follows single frames more faithfully, faster keeps short streams nearer the
            target (docs/fidelity_hard.md: 0.02 to 0.2 on the hard-video harness).
        buckets: None selects exactly the tokens above tau (a data-dependent shape); an int k
            (or a sequence of fractions of the peak) rounds each count *up* to one of a few
            capacity levels between ``low`` and ``peak``, so that ``torch.compile`` sees at most
            that many shapes; the extra tokens are the next by error, and count as spent.
    """

    data_dependent = True
    relative = True
    _SETTINGS = ("target", "tau", "peak", "low", "rate", "buckets")
    _CONTROLLER = {
        "log_tau": (("b",), torch.float64, True),
        "spent": (("b",), torch.float64, True),
        "offered": (("b",), torch.float64, True),
    }
    _LOG_TAU_RANGE = (math.log(1e-4), math.log(1e2))

    def __init__(
        self,
        target: float,
        tau: float = 0.12,
        peak: float | None = None,
        low: float | None = None,
        rate: float = 0.05,
        buckets=None,
    ):
        super().__init__()
        target, peak, low = _average_budget(target, peak, low)
        self.buckets = _check_buckets(buckets)
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < float(tau) < math.inf:
            raise ValueError(f"tau must be a finite real number > 0, got {tau!r}")
        self.target, self.tau, self.peak, self.low = target, float(tau), peak, low
        self.rate = _check_fraction("rate", rate)
        self._streams: dict[int, dict] = {}  # batch rows -> the per-stream controller

    def _controller(self, b: int, device) -> dict:
        state = self._streams.get(b)
        if state is None or state["log_tau"].device != device:
            zeros = torch.zeros(b, dtype=torch.float64, device=device)
            state = {"log_tau": zeros + math.log(self.tau), "spent": zeros, "offered": zeros.clone()}
            self._streams[b] = state
        return state

    def start_frame(self) -> None:
        super().start_frame()
        for state in self._streams.values():
            offered = state["offered"]
            ran = offered > 0
            overspend = (state["spent"] / offered.clamp_min(1.0) - self.target) / self.target
            step = torch.where(ran, self.rate * overspend, torch.zeros_like(overspend))
            state["log_tau"] = (state["log_tau"] + step).clamp(*self._LOG_TAU_RANGE)
            state["spent"], state["offered"] = torch.zeros_like(offered), torch.zeros_like(offered)

    def reset_state(self, streams=None, batch=None, cut: bool = False) -> None:
        super().reset_state(streams, batch, cut)
        if cut:  # the same stream after a scene cut: its error scale, and so tau, carry over
            return
        if streams is None:
            self._streams = {}
            return
        for b, state in self._streams.items():
            per = max(1, b // max(1, batch or b))
            rows = [r for s in streams for r in range(s * per, (s + 1) * per) if r < b]
            if rows:
                hit = _rows_mask(b, rows, state["log_tau"].device)
                state["log_tau"] = state["log_tau"].masked_fill(hit, math.log(self.tau))
                state["spent"] = state["spent"].masked_fill(hit, 0.0)
                state["offered"] = state["offered"].masked_fill(hit, 0.0)

    def _new_state(self, b, n, device) -> dict:
        return {}

    def _restart(self, state, rows) -> None:
        pass  # the per-gate slots hold nothing; the controller is reset in reset_state

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=True)
        b, n = error.shape
        self._slot(b, n, error.device)  # keeps the call order of the gates (MAX_SLOTS guard)
        controller = self._controller(b, error.device)
        score = forced_scores(relative_error(error, reference_norm), forced)
        tau = controller["log_tau"].exp().to(score.dtype)
        low, peak = self._low_peak(n)
        above = (score > tau[:, None]).sum(dim=1)
        moved = error != 0  # NaN counts as changed
        candidates = (moved if forced is None else moved | forced).sum(dim=1)  # what the floor may take
        r = torch.maximum(above, candidates.clamp(max=low)).clamp(max=peak)
        r = _bucketed(r, low, peak, self.buckets)
        width = int(r.max()) if b else 0  # host sync
        _values, index = torch.topk(score, width, dim=1, largest=True, sorted=True)
        mask = None
        if b > 1 and bool((r < width).any()):
            mask = torch.arange(width, device=r.device)[None, :] < r[:, None]
        # a gate where nothing of the stream changed neither spends nor offers: a paused stream
        # leaves tau where it was
        moved = moved.any(dim=1)
        controller["spent"] = controller["spent"] + torch.where(moved, r.double(), 0.0)
        controller["offered"] = controller["offered"] + torch.where(moved, float(n), 0.0)
        return Selection(index, mask)

    def _extra_state(self) -> dict:
        streams = {b: {k: v.detach().clone() for k, v in c.items()} for b, c in self._streams.items()}
        return {"streams": streams}

    def _check_extra(self, state: dict) -> list[str]:
        streams = state.get("streams")
        if not isinstance(streams, dict):
            return ["'streams' must be a dict of controllers by batch rows"]
        problems = []
        for b, controller in streams.items():
            if isinstance(b, bool) or not isinstance(b, int) or b < 1 or not isinstance(controller, dict):
                problems.append(f"controller {b!r}: not rows -> a dict of tensors")
                continue
            problems += _check_tensors(f"controller of {b} rows", controller, self._CONTROLLER, {"b": b})
        return problems

    def _load_extra(self, state: dict, device) -> None:
        self._streams = {
            b: {k: _placed(v, device) for k, v in c.items()} for b, c in state["streams"].items()
        }

    def __repr__(self) -> str:
        return (
            f"SteeredThreshold(target={self.target:g}, tau={self.tau:g}, peak={self.peak:g}, "
            f"low={self.low:g}, rate={self.rate:g}"
            + (f", buckets={self.buckets}" if self.buckets is not None else "")
            + ")"
        )


def selected_mask(selection: Selection, n: int) -> Tensor:
    """(B, N) bool: the tokens a selection really updates (masked slots left out)."""
    index, mask = selection
    out = torch.zeros(index.shape[0], n, dtype=torch.bool, device=index.device)
    src = torch.ones_like(index, dtype=torch.bool) if mask is None else mask
    return out.scatter_(1, index, src) if index.numel() else out


class Staleness(StatefulPolicy):
    """Wraps a policy so that every token is recomputed at least every ``k`` frames.

    Per gate and batch row the wrapper keeps each token's age (frames since it was last
    updated). A token that would reach age k is *due*: its error is raised to +inf for the
    wrapped policy (which then picks it first), and any due token the wrapped policy still left
    out (more due tokens than its budget) is appended to the selection (masked per row in a
    batch). After a dense frame the ages start staggered (token j as if updated j mod k frames
    ago; conservative) so that the due tokens spread over the frames instead of all coming due
    at once. ``k=1`` updates every token every frame.

    Counts: :meth:`mean_tokens_per_frame` is the wrapped policy's average plus ceil(N / k), an
    upper bound on the average (a token comes due at most once in k frames, so at most N / k due
    tokens per frame on average, and the due tokens the wrapped policy picks within its own
    budget cost nothing extra); :meth:`tokens_per_frame` and :meth:`peak_tokens_per_frame` add
    ceil(N / k) to the wrapped policy's count and peak (the staggered steady state; a burst of
    due tokens can exceed it for a frame). None when the wrapped policy sets no bound. One extra
    host sync per call.
    """

    data_dependent = True
    _SETTINGS = ("policy", "k")
    _SLOT_TENSORS = {
        "age": (("b", "n"), torch.long, True),
        "restarting": (("b",), torch.bool, False),
    }

    def __init__(self, policy, k: int):
        super().__init__()
        self.policy = as_policy(policy)
        self.k = _check_int("k", k, 1)

    @property
    def relative(self) -> bool:
        return getattr(self.policy, "relative", False)

    def start_frame(self) -> None:
        super().start_frame()
        if isinstance(self.policy, StatefulPolicy):
            self.policy.start_frame()

    def reset_state(self, streams=None, batch=None, cut: bool = False) -> None:
        super().reset_state(streams, batch, cut)
        if isinstance(self.policy, StatefulPolicy):
            self.policy.reset_state(streams, batch, cut)

    def _extra_state(self) -> dict:
        return {"inner": self.policy.state_dict() if isinstance(self.policy, StatefulPolicy) else None}

    def _check_extra(self, state: dict) -> list[str]:
        inner = state.get("inner")
        if not isinstance(self.policy, StatefulPolicy):
            return (
                []
                if inner is None
                else [f"state for a stateful inner policy, this one wraps {self.policy!r}"]
            )
        return [f"inner {self.policy!r}: {p}" for p in self.policy.check_state_dict(inner)]

    def _load_extra(self, state: dict, device) -> None:
        if isinstance(self.policy, StatefulPolicy):
            self.policy.load_state_dict(state["inner"], device)

    def _stagger(self, b, n, device) -> Tensor:
        return (torch.arange(n, device=device) % self.k).expand(b, n).clone()

    def _new_state(self, b, n, device) -> dict:
        return {"age": self._stagger(b, n, device)}

    def _restart(self, state, rows) -> None:
        hit = _rows_mask(state["shape"][0], rows, state["age"].device)
        state["restarting"] = state.get("restarting", torch.zeros_like(hit)) | hit

    def _plus_due(self, inner: int | None, n: int) -> int | None:
        return None if inner is None else min(int(n), inner + math.ceil(int(n) / self.k))

    def tokens_per_frame(self, n: int) -> int | None:
        return self._plus_due(self.policy.tokens_per_frame(n), n)

    def mean_tokens_per_frame(self, n: int) -> int | None:
        return self._plus_due(self.policy.mean_tokens_per_frame(n), n)

    def peak_tokens_per_frame(self, n: int) -> int | None:
        return self._plus_due(self.policy.peak_tokens_per_frame(n), n)

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=self.relative)
        b, n = error.shape
        state = self._slot(b, n, error.device)
        age = state["age"] + 1
        due = age >= self.k
        selection = self.policy.select(error.masked_fill(due, float("inf")), reference_norm, forced)
        updated = selected_mask(selection, n)
        if forced is not None:  # forced tokens tie with the due ones at +inf: neither may lose
            due = due | forced[None, :]
        missing = due & ~updated
        extra = int(missing.sum(dim=1).max()) if b else 0  # host sync
        if extra:  # rebuild the selection as the union, distinct per row, padded and masked
            updated = updated | missing
            counts = updated.sum(dim=1)
            values, index = torch.topk(updated.to(error.dtype), int(counts.max()), dim=1, sorted=True)
            keep = values > 0
            selection = Selection(index, None if bool(keep.all()) else keep)
        age = torch.where(updated, torch.zeros_like(age), age)
        restarting = state.pop("restarting", None)
        if restarting is not None:  # their frame is dense: ages start staggered after it
            age = torch.where(restarting[:, None], self._stagger(b, n, age.device), age)
        state["age"] = age
        return selection

    def __repr__(self) -> str:
        return f"Staleness({self.policy!r}, k={self.k})"


class GateAllocation(_AverageCounts, StatefulPolicy):
    """One token budget for the whole model, spent at the gates whose error has accumulated.

    Instead of the same r at every gate, each frame spends ``budget`` x (the tokens of all the
    gates) in total, per batch row, and splits it by error: the split is the global top of the
    (relative, by default) per-token errors every gate saw on the previous frame, i.e. what
    changed there plus what it left stale (a token not updated keeps its error, so a gate that
    fell behind ranks higher each frame until it is served). Every gate keeps at least ``low``
    and at most ``peak`` of its tokens; within a gate the tokens with the largest error now are
    updated, as ``TopK`` does. On the first sparse frame of a stream (no history yet) every gate
    gets ``budget`` of its tokens.

    One policy object serves every gate of a model (``transform(policy=GateAllocation(...))``
    or ``set_policy``); it keeps the previous frame's errors per gate (call slot, see the module
    docstring) and row. Gates are pooled by their row count: in a model whose token sequences
    have different batch layouts (ViViT's spatial and temporal encoders) each layout is
    allocated on its own. Rows are independent streams: each row splits its own budget.

    Args:
        budget: a fraction in (0, 1]: every frame spends ``budget`` of all the gates' tokens
            (``budget=1`` updates every token every frame); or an :class:`AdaptiveBudget`: the
            frame's total then adapts to how much the frame changed, as that policy does per
            gate (its target, peak, low, gain, smoothing and bank apply to the total; the change
            is measured at the first gate, before the others run), and its ``relative`` sets
            how errors are ranked.
        low: the fewest tokens per gate and frame as a fraction of its N, in (0, the budget's
            target] (default a quarter of the target; at least one token).
        peak: the most per gate and frame, in [target, 1] (default 1).
        relative: rank by error / reference norm (scale-free across gates; the default) or by
            the error norm; ignored when ``budget`` is an AdaptiveBudget (its own setting).

    Counts: priced at ``ceil(target N)`` per gate (:meth:`mean_tokens_per_frame`; the total
    over gates is exact, while FLOPs per token differ between regions, so the real FLOPs follow
    where the split goes), peak ``ceil(peak N)`` per gate. One host sync per gate and frame.
    """

    data_dependent = True
    _SETTINGS = ("adaptive", "target", "low", "peak", "relative")
    _SLOT_TENSORS = {
        "scores": (("b", "n"), None, True),
        "seen": (("b",), torch.bool, True),
        "last": (("b",), torch.long, False),
        "restarting": (("b",), torch.bool, False),
    }
    _FRAME = {
        "mean": (("b",), torch.float64, True),
        "deficit": (("b",), torch.float64, True),
        "fresh": (("b",), torch.bool, True),
    }

    def __init__(
        self, budget=0.5, low: float | None = None, peak: float | None = None, relative: bool = True
    ):
        super().__init__()
        if isinstance(budget, AdaptiveBudget):
            self.adaptive: AdaptiveBudget | None = budget
            target = budget.target
            relative = budget.relative
        elif isinstance(budget, numbers.Real) and not isinstance(budget, bool):
            self.adaptive = None
            target = _check_fraction("budget", budget)
        else:
            raise TypeError(
                "budget must be a fraction of the tokens in (0, 1] or an AdaptiveBudget, "
                f"got {type(budget).__name__} {budget!r}"
            )
        peak = 1.0 if peak is None else _check_fraction("peak", peak)
        if peak < target:
            raise ValueError(
                f"peak must be >= the budget's target (a gate's share cannot average above it), "
                f"got {peak} < {target}"
            )
        low = target / 4.0 if low is None else _check_fraction("low", low)
        if low > target:
            raise ValueError(f"low must be <= the budget's target, got {low} > {target}")
        if not isinstance(relative, bool):
            raise TypeError(f"relative must be a bool, got {type(relative).__name__} {relative!r}")
        self.target, self.low, self.peak, self.relative = target, low, peak, relative
        self._plans: dict = {}  # this frame's split, per row layout
        self._frames: dict = {}  # the adaptive total's state, per row layout

    # -- state ---------------------------------------------------------------------------------
    def start_frame(self) -> None:
        super().start_frame()
        self._plans = {}

    def reset_state(self, streams=None, batch=None, cut: bool = False) -> None:
        super().reset_state(streams, batch, cut)
        self._plans = {}
        if streams is None:
            self._frames = {}

    def _new_state(self, b, n, device) -> dict:
        return {
            "scores": torch.zeros(b, n, device=device),
            "seen": torch.zeros(b, dtype=torch.bool, device=device),
        }

    def _restart(self, state, rows) -> None:
        hit = _rows_mask(state["shape"][0], rows, state["seen"].device)
        state["restarting"] = state.get("restarting", torch.zeros_like(hit)) | hit

    def _frame_state(self, b: int, device) -> dict:
        frames = self._frames
        key = (b, str(device))
        if key not in frames:
            frames[key] = {
                "mean": torch.zeros(b, device=device, dtype=torch.float64),
                "deficit": torch.zeros(b, device=device, dtype=torch.float64),
                "fresh": torch.ones(b, device=device, dtype=torch.bool),
            }
        return frames[key]

    # -- the split -----------------------------------------------------------------------------
    def _fraction(self, b: int, device, demand: Tensor, restarting: Tensor | None) -> Tensor:
        """(B,) float64: the fraction of all the gates' tokens this frame spends, per row."""
        if self.adaptive is None:
            return torch.full((b,), self.target, device=device, dtype=torch.float64)
        a, state = self.adaptive, self._frame_state(b, device)
        mean = torch.where(state["fresh"], demand, state["mean"])
        ratio = torch.where(mean > _REL_EPS, demand / mean.clamp_min(_REL_EPS), torch.ones_like(mean))
        fraction = (a.target * ratio + a.gain * state["deficit"]).clamp(a.low, a.peak)
        cap = a.bank * a.target
        state["deficit"] = (state["deficit"] + a.target - fraction).clamp(-cap, cap)
        state["mean"] = (1.0 - a.smoothing) * mean + a.smoothing * demand
        state["fresh"] = torch.zeros_like(state["fresh"])
        if restarting is not None:  # their next frame is dense: they start afresh after it
            state["deficit"] = state["deficit"].masked_fill(restarting, 0.0)
            state["fresh"] = restarting.clone()
        return fraction

    def _plan(self, key, b: int, device, demand: Tensor, restarting: Tensor | None) -> dict[int, Tensor]:
        """Slot -> (B,) long tokens for this frame, for the slots of rows ``b`` on ``device``."""
        fraction = self._fraction(b, device, demand, restarting)
        slots = [
            (i, s)
            for i, s in enumerate(self._slots)
            if s is not None and s["shape"][0] == b and s["device"] == device
        ]
        plan: dict[int, Tensor] = {}
        if not slots:
            return {"fraction": fraction}
        sizes = [s["shape"][1] for _, s in slots]
        bounds = [self._low_peak(n) for n in sizes]
        uniform = [(fraction * n).round().long().clamp(lo, hi) for n, (lo, hi) in zip(sizes, bounds)]
        # candidates beyond each gate's floor and up to its cap, pooled and ranked per row
        pieces = [s["scores"][:, lo:hi] for (_, s), (lo, hi) in zip(slots, bounds)]
        owner = torch.cat(
            [torch.full((hi - lo,), g, dtype=torch.long, device=device) for g, (lo, hi) in enumerate(bounds)]
        )
        pooled = torch.cat(pieces, dim=1)
        floors = sum(lo for lo, _ in bounds)
        total = (fraction * sum(sizes)).round().long()
        extra = (total - floors).clamp(0, pooled.shape[1])
        order = torch.sort(pooled, dim=1, descending=True, stable=True).indices
        taken = torch.arange(pooled.shape[1], device=device)[None, :] < extra[:, None]
        won = torch.zeros(b, len(slots), dtype=torch.long, device=device)
        won.scatter_add_(1, owner[order], taken.long())
        seen = torch.stack([s["seen"] for _, s in slots]).all(dim=0)
        for g, ((i, _), (lo, _)) in enumerate(zip(slots, bounds)):
            plan[i] = torch.where(seen, lo + won[:, g], uniform[g])
        plan["fraction"] = fraction
        return plan

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=self.relative)
        b, n = error.shape
        slot = self._cursor if self._hooked else 0
        known = slot < len(self._slots) and self._slots[slot] is not None
        state = self._slot(b, n, error.device)
        restarting = state.pop("restarting", None)
        score = relative_error(error, reference_norm) if self.relative else error
        finite = torch.where(torch.isinf(score), torch.zeros_like(score), score)  # Staleness marks
        key = (b, str(error.device))
        if not self._hooked or key not in self._plans:
            demand = finite.double().mean(dim=1)
            self._plans[key] = self._plan(key, b, error.device, demand, restarting)
        plan = self._plans[key]
        lo, hi = self._low_peak(n)
        if known and slot in plan:
            r = plan[slot]
        else:  # a gate seen for the first time: its share of the frame's fraction
            r = (plan["fraction"] * n).round().long().clamp(lo, hi)
        width = int(r.max()) if b else 0  # host sync
        index = torch.sort(forced_scores(score, forced), dim=1, descending=True, stable=True).indices
        index = index[:, :width]
        mask = None
        if b > 1 and bool((r < width).any()):
            mask = torch.arange(width, device=r.device)[None, :] < r[:, None]
        state["scores"] = torch.sort(finite, dim=1, descending=True).values
        seen = torch.ones_like(state["seen"])
        state["seen"] = seen if restarting is None else seen & ~restarting
        state["last"] = r
        return Selection(index, mask)

    def _extra_state(self) -> dict:
        # this frame's split (_plans) is made afresh at every frame's first gate
        frames = [[b, {k: v.detach().clone() for k, v in f.items()}] for (b, _), f in self._frames.items()]
        return {"frames": frames}

    def _check_extra(self, state: dict) -> list[str]:
        frames = state.get("frames")
        if not isinstance(frames, list):
            return ["'frames' must be a list of [rows, tensors]"]
        problems = []
        for entry in frames:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict)):
                problems.append(f"frame state {entry!r}: not [rows, tensors]")
                continue
            b = entry[0]
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                problems.append(f"frame state rows {b!r}: not an int >= 1")
                continue
            problems += _check_tensors(f"frame state of {b} rows", entry[1], self._FRAME, {"b": b})
        return problems

    def _load_extra(self, state: dict, device) -> None:
        frames = {}
        for b, tensors in state["frames"]:
            placed = {k: _placed(v, device) for k, v in tensors.items()}
            frames[(b, str(placed["mean"].device))] = placed
        self._frames, self._plans = frames, {}

    def __repr__(self) -> str:
        budget = repr(self.adaptive) if self.adaptive is not None else f"{self.target:g}"
        rel = "" if self.relative or self.adaptive is not None else ", relative=False"
        return f"GateAllocation({budget}, low={self.low:g}, peak={self.peak:g}{rel})"


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


def counted_tokens(policy: Policy, tokens: int, peak: bool = False) -> int:
    """r of ``policy`` at a gate of N = ``tokens`` as FLOP counts take it: the steady-state
    average (:meth:`Policy.mean_tokens_per_frame`; a static policy's own count), or with
    ``peak=True`` the most in one frame (:meth:`Policy.peak_tokens_per_frame`); N (the worst
    case) where the policy sets no bound (``Threshold``)."""
    r = policy.peak_tokens_per_frame(tokens) if peak else policy.mean_tokens_per_frame(tokens)
    return tokens if r is None else min(r, tokens)


def has_peak(policy: Policy, tokens: int) -> bool:
    """True when ``policy``'s peak count at N = ``tokens`` exceeds the average it is priced at."""
    return counted_tokens(policy, tokens, peak=True) != counted_tokens(policy, tokens)


class PricedAs(Policy):
    """The static stand-in FLOP counting runs for ``policy``: every row selects exactly
    :func:`counted_tokens` of it (its average; N for ``Threshold``), so the count of the
    rewritten graph equals the cost model at the same budgets. Counting only: it selects the
    top-r errors with no state."""

    def __init__(self, policy: Policy, peak: bool = False):
        self.policy, self.peak = policy, peak

    def tokens_per_frame(self, n: int) -> int:
        return counted_tokens(self.policy, int(n), self.peak)

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        _check_inputs(error, reference_norm, forced, need_reference=False)
        b, n = error.shape
        r = self.tokens_per_frame(n)
        if r == n:
            return All().select(error, None, None)
        return Selection(topk_indices(forced_scores(error, forced), r)[1], None)

    def __repr__(self) -> str:
        return f"PricedAs({self.policy!r}{', peak=True' if self.peak else ''})"


def static_for_counting(policy: Policy, peak: bool = False) -> Policy:
    """``policy`` itself when its count is static and it keeps no state, otherwise its
    :class:`PricedAs` stand-in (data-dependent and stateful policies cannot run on the meta
    tensors FLOP counting uses: their counts would read as 0)."""
    if not peak and not policy.data_dependent and not isinstance(policy, StatefulPolicy):
        return policy
    return PricedAs(policy, peak)
