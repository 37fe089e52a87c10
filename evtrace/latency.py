"""A per-frame time budget: choose the token budget from a measured cost model.

:func:`measure_latency` times an eventful model's steady frames at a few budgets on an example
frame (warm-up frames first, then the median of the timed ones) and fits the time per frame as
a line in the budget, ``seconds(f) = fixed + per_fraction * f`` (f: tokens per gate as a
fraction of N; FLOPs are affine in every gate's r, and so, to a good approximation, is the time
of the gathered rows). :func:`budget_for_latency` then picks the largest budget whose predicted
time, at its *peak* count (an ``AdaptiveBudget`` spends up to its peak on a busy frame), meets a
target in milliseconds, and sets it on the model.

Timings are taken on a copy of the model (``copy.deepcopy``: the weights are copied too, for
the time of the measurement), so the model's streams, policy and overrides are never touched
by the measurement; they are the machine's at that moment (measure where the model runs, on a
quiet machine). A dense frame (first frame, refresh, scene cut) costs ``dense_seconds``; the
target is about steady frames.
"""

from __future__ import annotations

import copy
import math
import numbers
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from evtrace.eventful import EventfulModel
from evtrace.graph.errors import EvtraceError
from evtrace.graph.tracer import as_args
from evtrace.runtime.policies import Policy, TopFraction, counted_tokens

__all__ = ["LatencyModel", "LatencyChoice", "LatencyTargetError", "measure_latency", "budget_for_latency"]

#: Budgets (fractions of N per gate) timed by default.
DEFAULT_FRACTIONS = (0.05, 0.15, 0.3, 0.5, 0.75, 1.0)


class LatencyTargetError(EvtraceError, ValueError):
    """No budget meets the time target on this machine; the model was not changed."""


@dataclass(frozen=True)
class LatencyModel:
    """Measured steady-frame time against the budget, and the line fitted to it.

    fractions: the budgets timed, as the fraction of the tokens per gate they select
    (``ceil(f N) / N``); seconds: the median steady-frame time at each; dense_seconds: the median time of a
    dense frame; fixed, per_fraction: the least-squares line ``seconds = fixed + per_fraction f``
    (per_fraction clamped at 0: noise never makes a larger budget predict faster).
    """

    fractions: tuple[float, ...]
    seconds: tuple[float, ...]
    dense_seconds: float
    fixed: float
    per_fraction: float

    @classmethod
    def fit(cls, fractions: Sequence[float], seconds: Sequence[float], dense_seconds: float) -> LatencyModel:
        """The least-squares line through (fraction, seconds) points."""
        xs, ys = [float(f) for f in fractions], [float(s) for s in seconds]
        if len(xs) != len(ys) or not xs:
            raise ValueError(
                f"fractions and seconds must be equally long and not empty, got {len(xs)} and {len(ys)}"
            )
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else 0.0
        slope = max(0.0, slope)
        return cls(tuple(xs), tuple(ys), float(dense_seconds), my - slope * mx, slope)

    def predict(self, fraction: float) -> float:
        """Predicted seconds of a steady frame at ``fraction`` of the tokens per gate."""
        return self.fixed + self.per_fraction * float(fraction)

    def largest_fraction(self, seconds: float) -> float | None:
        """The largest fraction in (0, the largest one timed] predicted within ``seconds``; None
        when even the smallest timed budget is predicted over it (no extrapolation below it)."""
        top, bottom = max(self.fractions), min(self.fractions)
        if self.predict(bottom) > seconds:
            return None
        if self.per_fraction <= 0 or self.predict(top) <= seconds:
            return top
        return min(top, (seconds - self.fixed) / self.per_fraction)

    def __str__(self) -> str:
        rows = ", ".join(f"{f:g}: {1e3 * s:.2f} ms" for f, s in zip(self.fractions, self.seconds))
        return (
            f"steady frame {1e3 * self.fixed:.2f} ms + {1e3 * self.per_fraction:.2f} ms x f "
            f"(measured {rows}; dense frame {1e3 * self.dense_seconds:.2f} ms)"
        )


@dataclass(frozen=True)
class LatencyChoice:
    """What :func:`budget_for_latency` chose: the policy, its budget, its predicted times."""

    policy: Policy
    fraction: float  # the budget handed to ``make``
    peak_fraction: float  # its peak count per gate as a fraction of N (priced for the target)
    predicted_ms: float  # a steady frame at the peak count
    average_ms: float  # a steady frame at the average count
    model: LatencyModel


def _check_positive(name: str, value, integer: bool = False):
    kind = "an int >= 1" if integer else "a finite number > 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value) if integer else float(value)


def _check_fractions(fractions) -> tuple[float, ...]:
    try:
        values = tuple(float(f) for f in fractions)
    except TypeError:
        raise TypeError(f"fractions must be a sequence of numbers in (0, 1], got {fractions!r}") from None
    if not values or any(not 0.0 < f <= 1.0 for f in values):
        raise ValueError(f"fractions must be a non-empty sequence of numbers in (0, 1], got {fractions!r}")
    return tuple(sorted(set(values)))


class _Progress:
    """tqdm when installed, else one line per budget on stderr; or a callable given a line."""

    def __init__(self, progress, total: int):
        self.say, self.bar = None, None
        if callable(progress):
            self.say = progress
        elif progress:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="frame", desc="timing budgets", file=sys.stderr)
            except ImportError:
                self.say = lambda line: print(line, file=sys.stderr, flush=True)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def line(self, text: str) -> None:
        if self.say is not None:
            self.say(text)
        elif self.bar is not None:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sync(args) -> None:
    devices = {a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"}
    for device in devices:
        torch.cuda.synchronize(device)


def measure_latency(
    emodel: EventfulModel,
    example_inputs,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    warmup: int = 3,
    repeats: int = 7,
    progress: bool | Callable[[str], None] = False,
) -> LatencyModel:
    """Time steady frames of ``emodel`` at each budget in ``fractions`` and fit the line.

    Per budget: ``TopFraction(f)`` at every gate (a static count: the time depends on how many
    tokens, not which), one dense frame, ``warmup`` steady frames, then the median of ``repeats``
    timed ones (the example frame with a small change each time). Runs on a copy: ``emodel`` is
    unchanged.

    Args:
        emodel: an :class:`~evtrace.EventfulModel`.
        example_inputs: a frame (tensor or tuple) of the size the model serves, on its device.
        fractions: budgets to time, tokens per gate as fractions of N in (0, 1].
        warmup, repeats: frames per budget before and in the timing (ints >= 1).
        progress: True for a progress bar (tqdm if installed, else lines on stderr), or a
            callable given one line per budget.

    Raises:
        TypeError / ValueError: a bad argument (named in the message).
    """
    if not isinstance(emodel, EventfulModel):
        raise TypeError(f"emodel must be an EventfulModel (evtrace.transform), got {type(emodel).__name__}")
    fractions = _check_fractions(fractions)
    warmup = _check_positive("warmup", warmup, integer=True)
    repeats = _check_positive("repeats", repeats, integer=True)
    args = as_args(example_inputs)
    work = copy.deepcopy(emodel)
    bar = _Progress(progress, len(fractions) * (1 + warmup + repeats))
    steady, dense = [], []
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            for f in fractions:
                work.set_policy(TopFraction(f))
                work.reset()
                times = []
                for _ in range(1 + warmup + repeats):
                    frame = tuple(
                        a + 1e-3 * torch.randn(a.shape, generator=gen).to(a) if a.is_floating_point() else a
                        for a in args
                    )
                    _sync(frame)
                    t0 = time.perf_counter()
                    work(*frame)
                    _sync(frame)
                    times.append(time.perf_counter() - t0)
                    bar.step()
                dense.append(times[0])
                steady.append(statistics.median(times[1 + warmup :]))
                bar.line(f"f={f:g}: {1e3 * steady[-1]:.2f} ms per steady frame")
    finally:
        bar.close()
    tokens = [region.gate.tokens for region in emodel.regions().values()] or [1]
    counted = [_mean_fraction(TopFraction(f), tokens) for f in fractions]  # ceil(f N) / N
    return LatencyModel.fit(counted, steady, statistics.median(dense))


def _peak_fraction(policy: Policy, tokens: list[int]) -> float:
    """The largest peak count over the gates as a fraction of their N."""
    return max(counted_tokens(policy, n, peak=True) / n for n in tokens)


def _mean_fraction(policy: Policy, tokens: list[int]) -> float:
    return max(counted_tokens(policy, n) / n for n in tokens)


def budget_for_latency(
    emodel: EventfulModel,
    example_inputs,
    ms: float,
    *,
    make: Callable[[float], Policy] = TopFraction,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    warmup: int = 3,
    repeats: int = 7,
    apply: bool = True,
    progress: bool | Callable[[str], None] = False,
    latency: LatencyModel | None = None,
) -> LatencyChoice:
    """The largest budget whose steady frames are predicted to take at most ``ms`` milliseconds.

    Measures ``emodel`` (:func:`measure_latency`, unless ``latency`` is given), then searches the
    budget ``f`` handed to ``make`` (``TopFraction`` by default; ``AdaptiveBudget`` works too: it
    is held to the target at its *peak*, so a busy frame meets it as well) for the largest one
    whose peak count per gate is predicted within the target, and sets ``make(f)`` on every gate
    (``apply=True``).

    Args:
        ms: the time budget of one steady frame, in milliseconds (> 0).
        make: budget fraction -> policy (``TopFraction``, ``AdaptiveBudget``,
            ``lambda f: GateAllocation(f)`` ...).
        apply: set the chosen policy on ``emodel`` (``emodel.set_policy``).
        latency: a :class:`LatencyModel` measured before (skips the timing).
        fractions, warmup, repeats, progress: see :func:`measure_latency`.

    Returns:
        A :class:`LatencyChoice` (policy, budget, predicted peak and average frame times, the
        measured model).

    Raises:
        LatencyTargetError: even the smallest budget timed is predicted over ``ms``; the message
            gives the smallest time reachable. ``emodel`` is unchanged.
        TypeError / ValueError: a bad argument (named in the message); ``emodel`` is unchanged.
    """
    ms = _check_positive("ms", ms)
    if not callable(make):
        raise TypeError(f"make must be a callable fraction -> Policy, got {type(make).__name__} {make!r}")
    if not isinstance(emodel, EventfulModel):
        raise TypeError(f"emodel must be an EventfulModel (evtrace.transform), got {type(emodel).__name__}")
    tokens = [region.gate.tokens for region in emodel.regions().values()]
    if not tokens:
        raise ValueError("emodel has no gated region: its time does not depend on a budget")
    if latency is None:
        latency = measure_latency(
            emodel, example_inputs, fractions, warmup=warmup, repeats=repeats, progress=progress
        )
    seconds = ms / 1e3
    bottom, top = min(latency.fractions), max(latency.fractions)
    reachable = latency.largest_fraction(seconds)
    if reachable is None:
        raise LatencyTargetError(
            f"no budget meets ms={ms:g} per steady frame on this machine: the smallest budget timed "
            f"(f={bottom:g}) takes {1e3 * latency.predict(bottom):.2f} ms ({latency}). Ask for at least "
            f"{1e3 * latency.predict(bottom):.2f} ms, time smaller budgets (fractions=...), or serve fewer "
            "streams per call; the model was not changed"
        )

    def fits(f: float) -> bool:
        try:
            policy = make(f)
        except (TypeError, ValueError):
            return False
        return _peak_fraction(policy, tokens) <= reachable + 1e-12

    if not fits(bottom):
        raise LatencyTargetError(
            f"no budget meets ms={ms:g} per steady frame: at the smallest budget timed (f={bottom:g}) "
            f"{make(bottom)!r} peaks at {_peak_fraction(make(bottom), tokens):.3f} of the tokens, over the "
            f"{reachable:.3f} the target allows ({latency}); the model was not changed"
        )
    lo, hi = bottom, top
    if fits(hi):
        lo = hi
    else:
        for _ in range(40):  # bisection on the budget: the peak count grows with it
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    rounded = math.floor(lo * 1000) / 1000  # a readable budget, when it still fits
    if rounded >= bottom and fits(rounded):
        lo = rounded
    policy = make(lo)
    choice = LatencyChoice(
        policy=policy,
        fraction=lo,
        peak_fraction=_peak_fraction(policy, tokens),
        predicted_ms=1e3 * latency.predict(_peak_fraction(policy, tokens)),
        average_ms=1e3 * latency.predict(_mean_fraction(policy, tokens)),
        model=latency,
    )
    if apply:
        emodel.set_policy(policy)
    return choice
