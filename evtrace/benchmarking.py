"""Time a user's own model: dense against eventful, frame by frame, in one process.

``benchmark(model, frames)`` answers the question a user has before adopting evtrace: on MY model,
MY frames and THIS machine, how much faster is the eventful model than the fastest dense one I
already have? Both run in the same loop, alternating which goes first on each frame, so a burst
of load on a shared machine slows both alike; medians, never means.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from evtrace.cost.count import count_flops
from evtrace.eventful import EventfulModel, transform
from evtrace.runtime.packed import packing_available, with_packed_linears


@dataclass(frozen=True)
class BenchmarkResult:
    """Per-frame wall times (seconds) of the dense variants and the eventful model.

    ``dense`` maps a variant name (``"as given"``, ``"packed"``) to its per-frame times; the
    baseline is the variant with the smallest median. Times cover the steady frames only (the
    first ``warmup`` frames, which include the eventful model's dense first frame, are left out).
    """

    dense: dict[str, list[float]]
    eventful: list[float]
    dense_gflops: float | None
    eventful_gflops: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def fastest_dense(self) -> str:
        return min(self.dense, key=lambda name: statistics.median(self.dense[name]))

    @property
    def dense_ms(self) -> float:
        return 1e3 * statistics.median(self.dense[self.fastest_dense])

    @property
    def eventful_ms(self) -> float:
        return 1e3 * statistics.median(self.eventful)

    @property
    def speedup(self) -> float:
        """Fastest dense median over eventful median."""
        return self.dense_ms / self.eventful_ms

    @property
    def flop_ratio(self) -> float | None:
        """Dense over steady eventful GFLOPs (paper convention); None where not counted."""
        if not self.dense_gflops or not self.eventful_gflops:
            return None
        return self.dense_gflops / self.eventful_gflops

    def __str__(self) -> str:
        lines = [f"{'runner':<22}{'median ms':>12}{'frames':>8}"]
        for name, times in self.dense.items():
            mark = "  <- fastest dense" if name == self.fastest_dense else ""
            lines.append(f"{'dense ' + name:<22}{1e3 * statistics.median(times):>12.2f}{len(times):>8}{mark}")
        lines.append(f"{'eventful':<22}{self.eventful_ms:>12.2f}{len(self.eventful):>8}")
        ratio = self.flop_ratio
        tail = f"speedup {self.speedup:.2f}x"
        if ratio is not None:
            tail += f" at a FLOP ratio of {ratio:.2f}x (speedup / FLOP ratio {self.speedup / ratio:.2f})"
        lines.append(tail)
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _timed(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def benchmark(
    model: nn.Module,
    frames: Sequence[torch.Tensor],
    emodel: EventfulModel | None = None,
    *,
    warmup: int = 2,
    count: bool = True,
    **transform_options,
) -> BenchmarkResult:
    """Time ``model`` dense against its eventful form on ``frames``, interleaved frame by frame.

    Args:
        model: the original model, in eval mode.
        frames: the stream, in order (each a tensor the model takes as its one input). At least
            ``warmup + 1`` frames.
        emodel: an eventful model of ``model`` to time; by default ``transform(model, frames[0],
            **transform_options)`` (the shipped defaults unless options are given).
        warmup: leading frames run but not timed (the eventful model's first frame is dense).
        count: also count GFLOPs per frame (dense and steady eventful, paper convention).

    The dense side is raced in every variant evtrace can make without changing the numerics:
    the model as given and, on a CPU with oneDNN, a copy whose linears use packed weights (what
    the eventful model's gated linears do); the fastest is the baseline. Attention variants the
    model itself offers (explicit or fused) are the user's to race: pass each as its own model.

    Returns:
        A :class:`BenchmarkResult`; ``print`` it for a table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode: call model.eval() first")
    frames = list(frames)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if len(frames) < warmup + 1:
        raise ValueError(
            f"benchmark needs at least warmup + 1 = {warmup + 1} frames, got {len(frames)}: "
            "pass more frames or a smaller warmup"
        )
    if emodel is None:
        emodel = transform(model, frames[0], **transform_options)
    elif transform_options:
        raise ValueError(
            f"transform options {sorted(transform_options)} given with an emodel: pass one or the other"
        )
    dense: dict[str, nn.Module] = {"as given": model}
    notes = []
    if packing_available() and all(p.device.type == "cpu" for p in model.parameters()):
        dense["packed"] = with_packed_linears(model)
    runners = [*dense.values(), emodel]
    times: list[list[float]] = [[] for _ in runners]
    emodel.reset()
    with torch.no_grad():
        for i, x in enumerate(frames):
            for j in range(len(runners)):
                which = (i + j) % len(runners)
                elapsed = _timed(runners[which], x)
                if i >= warmup:
                    times[which].append(elapsed)
    dense_gflops = eventful_gflops = None
    if count:
        dense_gflops = count_flops(model, frames[0]).gflops
        eventful_gflops = count_flops(emodel, frames[0]).gflops
    if len(frames) - warmup < 5:
        notes.append(f"only {len(frames) - warmup} timed frames: medians of so few are noisy")
    return BenchmarkResult(
        dense={name: times[k] for k, name in enumerate(dense)},
        eventful=times[-1],
        dense_gflops=dense_gflops,
        eventful_gflops=eventful_gflops,
        notes=notes,
    )
