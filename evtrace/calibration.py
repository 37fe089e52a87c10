"""Measure the runtime's cost constants on this device for one model: ``evtrace.calibrate``.

Two static choices of the per-frame path weigh a thin, sparse kernel against a fused dense one,
and the break-even point is the device's, not the model's (see
:mod:`evtrace.runtime.cost_profile`). ``calibrate`` times, on the model's own largest attention
site and largest linear, fused attention against exact delta updates at a few budgets, and a
oneDNN-packed linear against ``F.linear`` over row counts, then fits the constants. It takes a
few seconds and changes nothing in the model.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from evtrace.runtime.attention import ExactDeltaAttention
from evtrace.runtime.cost_profile import DEFAULT_PROFILE, CostProfile
from evtrace.runtime.packed import PackedLinear, packing_available
from passes.pipeline import analyze

_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, packing, kernel selection
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _largest_site(model: nn.Module, frame) -> tuple[int, int, int, int]:
    plan = analyze(model, frame).plan
    shapes = [s.heads_shape for s in plan.sites if s.heads_shape is not None and not s.grouped]
    if not shapes:
        raise ValueError(
            f"{type(model).__name__} has no attention site evtrace updates in place (none found, or all "
            "grouped in windows): nothing to calibrate the delta-attention constants on"
        )
    return max(shapes, key=lambda s: s[0] * s[1] * s[2] * s[2] * s[3])


def _attention_constants(
    shape: tuple[int, int, int, int], device: torch.device, dtype: torch.dtype, repeats: int
) -> tuple[int, Fraction, str]:
    b, h, n, d = shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rand(b, h, n, d), rand(b, h, n, d), rand(b, h, n, d)
    fused = _median_seconds(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats)
    per_fused_mac = fused / (b * h * n * n * 2 * d)
    site = ExactDeltaAttention(scale=d**-0.5, full_when_cheaper=False, max_relative_error=None)
    repair = min(site.repair_rows, n)
    points, budgets = [], []
    for r in sorted({max(1, n // 16), max(1, n // 8), max(1, n // 4)}):
        idx = torch.stack([torch.randperm(n, generator=gen)[:r] for _ in range(b)]).to(device)
        q2, k2, v2 = q + 0.1 * rand(b, h, n, d), k + 0.1 * rand(b, h, n, d), v + 0.1 * rand(b, h, n, d)
        site.reset()
        site(q, k, v, None, None)

        def step(q2=q2, k2=k2, v2=v2, idx=idx):
            # alternate two frames so that every update really swaps its keys
            site(q2, k2, v2, idx, idx)
            site(q, k, v, idx, idx)

        seconds = _median_seconds(step, device, repeats) / 2
        macs = (n * 2 * r + (r + repair) * n) * b * h * 2 * d
        points.append((macs, seconds))
        budgets.append(r)
    # least squares of seconds = a + c * macs over the budgets
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else ys[0] / xs[0]
    slope = max(slope, 1e-3 * per_fused_mac)
    intercept = max(0.0, my - slope * mx)
    overhead = int(round(intercept / per_fused_mac))
    cost = Fraction(slope / per_fused_mac).limit_denominator(20)
    if cost <= 0:
        cost = Fraction(1, 20)
    note = f"attention (B,H,N,d) = {tuple(shape)}: fused {fused * 1e3:.2f} ms, delta updates at r = {budgets}"
    return overhead, cost, note


def _largest_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return max(linears, key=lambda m: m.weight.numel(), default=None)


def _packed_rows(linear: nn.Linear, device: torch.device, repeats: int) -> tuple[int, int, str]:
    """The smallest and largest row counts (from :data:`_ROWS`) where the packed kernel beats
    ``F.linear``; the shipped limits where packing does not apply or never pays."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if not (packing_available() and device.type == "cpu" and weight.dtype == torch.float32):
        return DEFAULT_PROFILE.min_packed_rows, DEFAULT_PROFILE.max_packed_rows, "packing not used here"
    kernel = PackedLinear("calibration")
    kernel.min_rows, kernel.max_rows = 1, max(_ROWS)
    wins = []
    for rows in _ROWS:
        x = torch.randn(rows, weight.shape[1])
        plain = _median_seconds(lambda x=x: F.linear(x, weight, bias), device, repeats)
        packed = _median_seconds(lambda x=x: kernel(x, weight, bias), device, repeats)
        wins.append(packed < plain)
    if not any(wins):
        return max(_ROWS) + 1, max(_ROWS) + 1, "packing never paid: packed linears stay plain"
    first = wins.index(True)
    last = len(wins) - 1 - wins[::-1].index(True)
    return (
        _ROWS[first],
        _ROWS[last],
        f"linear {tuple(weight.shape)}: packed faster at rows {_ROWS[first]}..{_ROWS[last]}",
    )


def calibrate(model: nn.Module, frame, *, repeats: int = 5) -> CostProfile:
    """Measure the runtime's cost constants on this device, on ``model``'s own shapes.

    Args:
        model: the model to be transformed (eval mode), on the device and dtype it will run in.
        frame: an example input (a tensor, or a tuple of the model's positional inputs).
        repeats: timed calls per measurement (medians).

    Returns:
        A :class:`~evtrace.runtime.cost_profile.CostProfile`; ``transform(model, frame,
        cost_profile=profile)`` uses it, ``profile.save(path)`` keeps it.

    Timings on a loaded machine come out noisy: calibrate when the device is otherwise idle.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode: call model.eval() first")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with torch.no_grad():
        overhead, cost, attention_note = _attention_constants(
            _largest_site(model, frame), device, dtype, repeats
        )
        linear = _largest_linear(model)
        if linear is None:
            low, high, linear_note = (
                DEFAULT_PROFILE.min_packed_rows,
                DEFAULT_PROFILE.max_packed_rows,
                "no linear",
            )
        else:
            low, high, linear_note = _packed_rows(linear, device, repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return CostProfile(
        delta_overhead_macs=overhead,
        delta_mac_cost=cost,
        key_chunk_rows=DEFAULT_PROFILE.key_chunk_rows,
        min_packed_rows=low,
        max_packed_rows=high,
        device=f"{name}, {torch.get_num_threads()} threads, {str(dtype).removeprefix('torch.')}",
        source=(
            f"evtrace.calibrate on {type(model).__name__}, {datetime.date.today().isoformat()}: "
            f"{attention_note}; {linear_note}"
        ),
    )
