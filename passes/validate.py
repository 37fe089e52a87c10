"""The build-time check of a rewritten graph on partial frames.

Every frame after the first runs each gated region on the rows its policy selects and each
delta-attention site on the changed rows only: code that the dense first frame, and hence a
check that updates every token, never runs. A region whose sparse graph bakes the token count
into a reshape, or gathers with indices made for all the tokens, runs the first frame and
crashes on the second. :func:`check_partial_frames` runs the rewritten graph on the example
and on two synthetic steady frames (the example plus noise), with every gate's policy
replaced by a ``TopK`` that selects a part of its tokens (a different count on each frame),
and after each steady frame compares

- every region's exit buffers with the region's dense graph on the gate's references (the
  invariant ``buffer == f(reference)``), and
- every exact delta-attention site's output with the same module computing the site densely
  from the same buffered q, k, v (paper attention is an approximation: only that it runs).

Delta attention is made to take its delta update, also where it would recompute in full at
this size. The graph's state is reset and every policy restored afterwards, and the global
random number generator is not used.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from evtrace.graph.errors import EvtraceError
from evtrace.runtime.attention import ExactDeltaAttention, PaperDeltaAttention
from evtrace.runtime.gates import SparseRegion
from evtrace.runtime.policies import TopK

ATTENTION = (ExactDeltaAttention, PaperDeltaAttention)


class PartialFrameError(EvtraceError):
    """A rewritten region or site disagrees with its dense computation on a partial frame."""


@dataclass(frozen=True)
class Failure:
    """One region or site that failed the check: its name and why."""

    name: str
    cause: BaseException


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def _difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference relative to the largest magnitude of ``expected``;
    non-finite values must sit at the same places with the same value."""
    if actual.shape != expected.shape:
        return float("inf")
    a, e = actual.detach(), expected.detach()
    if not bool(torch.isfinite(a).all() & torch.isfinite(e).all()):
        a, e = a.double(), e.double()
        finite = torch.isfinite(e)
        if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite], e[~finite]):
            return float("inf")
        if not bool(finite.any()):
            return 0.0
        a, e = a[finite], e[finite]
    if not e.numel():
        return 0.0
    scale = e.abs().max().float().clamp_min(1e-6)
    return float((a - e).abs().max().float() / scale)


def _partial_counts(tokens: int, forced: int) -> tuple[int, int]:
    """Two token counts per frame below ``tokens`` (when there is room), distinct from each other
    and unlikely to equal a size the graph holds (a quarter plus one, a half minus one)."""
    if tokens <= 1:
        return tokens, tokens
    low = max(1, forced + 1)

    def clamp(k: int) -> int:
        return min(tokens - 1, max(low, k))

    return clamp(tokens // 4 + 1), clamp(tokens // 2 - 1)


def _steady_frames(args: tuple, count: int) -> list[tuple]:
    """``count`` frames after ``args``: each the one before plus noise on every floating input."""
    generator = torch.Generator().manual_seed(0)
    frames, previous = [], args
    for _ in range(count):
        frame = []
        for value in previous:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                scale = float(value.detach().float().std()) if value.numel() > 1 else 0.0
                scale = scale if scale > 0 else 1.0
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
                value = value + (0.25 * scale * noise).to(value.dtype).to(value.device)
            frame.append(value)
        frames.append(tuple(frame))
        previous = tuple(frame)
    return frames


def _name_of(module: nn.Module) -> str:
    return module.name if isinstance(module, SparseRegion) else module.site_name


def _modules(gm: torch.fx.GraphModule) -> tuple[list[SparseRegion], list[nn.Module]]:
    regions = [m for m in gm.modules() if isinstance(m, SparseRegion)]
    attention = [m for m in gm.modules() if isinstance(m, ATTENTION)]
    return regions, attention


def check_partial_frames(gm: torch.fx.GraphModule, args: tuple) -> list[Failure]:
    """Run ``gm`` (a rewritten graph) on ``args`` and two partial steady frames; see the module
    docstring. Returns the regions and sites that raised or disagreed (empty when all agree).
    One that raises computes that frame densely instead, so that the frame goes on and every
    other region and site is checked too.

    Raises:
        PartialFrameError: a partial frame fails outside every rewritten region and site.
    """
    regions, attention = _modules(gm)
    if not regions:
        return []
    saved = [(region, region.gate.policy) for region in regions]
    cheaper = [(module, getattr(module, "full_when_cheaper", None)) for module in attention]
    pristine = {id(m): copy.deepcopy(m) for m in attention if isinstance(m, ExactDeltaAttention)}
    failures: dict[str, Failure] = {}
    steady = [False]

    def fail(name: str, cause: BaseException) -> None:
        failures.setdefault(name, Failure(name, cause))

    def check_region(module: SparseRegion, inputs, outputs) -> None:
        constants = inputs[module.n_entries :]
        expected = module.dense(*module.gate.references(), *constants)
        buffers = module.buffers_out()
        worst = max((_difference(b, e) for b, e in zip(buffers, expected, strict=True)), default=0.0)
        tolerance = _tolerance(buffers[0].dtype)
        if worst > tolerance:
            fail(
                module.name,
                PartialFrameError(
                    f"on a partial frame ({outputs[-1].shape[1]} of {module.gate.tokens} tokens) its exit "
                    f"buffers differ from its dense graph on the same tokens by {worst:.2e} (relative; "
                    f"tolerance {tolerance:.0e})"
                ),
            )

    def check_attention(module, inputs, output) -> None:
        if id(module) not in pristine:
            return  # paper attention approximates: only that it runs
        q, k, v, _, _, *tables = inputs
        dense = pristine[id(module)]
        dense.reset()  # the next call initialises densely from q, k, v
        expected = dense(q, k, v, None, None, *tables)
        worst = _difference(output, expected)
        tolerance = _tolerance(output.dtype)
        if worst > tolerance:
            fail(
                module.site_name,
                PartialFrameError(
                    f"on a partial frame its delta update differs from the site computed densely on the "
                    f"same q, k, v by {worst:.2e} (relative; tolerance {tolerance:.0e})"
                ),
            )

    def guard(module: nn.Module, name: str, check) -> None:
        original = module.forward

        def forward(*inputs):
            if name in failures:
                module.reset()  # dense on every frame from then on
            if not steady[0] or name in failures:
                return original(*inputs)
            try:
                # fx prints the generated code of a graph that raises; the failure goes to the report
                with contextlib.redirect_stderr(io.StringIO()):
                    output = original(*inputs)
            except Exception as error:
                fail(name, error)
                module.reset()  # this frame dense, so that the frame goes on
                return original(*inputs)
            check(module, inputs, output)
            return output

        module.forward = forward

    for region in regions:
        guard(region, region.name, check_region)
    for module in attention:
        guard(module, module.site_name, check_attention)
        if hasattr(module, "full_when_cheaper"):
            module.full_when_cheaper = False
    counts = {r.name: _partial_counts(r.gate.tokens, r.gate.n_forced) for r in regions}
    names = {id(m): _name_of(m) for m in [*regions, *attention]}
    rewritten = {
        node: names[id(gm.get_submodule(str(node.target)))]
        for node in gm.graph.nodes
        if node.op == "call_module" and id(gm.get_submodule(str(node.target))) in names
    }
    threads = torch.get_num_threads()
    # example-sized frames: on shared cores a multi-threaded small op waits for a descheduled
    # thread (as in the analysis, passes.pipeline.analyze)
    torch.set_num_threads(1)
    try:
        _reset(regions, attention)
        with torch.no_grad():
            for index, frame in enumerate([args, *_steady_frames(args, 2)]):
                steady[0] = index > 0
                if index:
                    for region in regions:
                        region.gate.policy = TopK(counts[region.name][index - 1])
                try:
                    _Runner(gm).run(*frame)
                except _NodeFailure as failure:
                    name = _culprit(failure.node, rewritten)
                    if name is None:
                        raise PartialFrameError(
                            f"a {'partial' if index else 'first'} frame fails at node '{failure.node.name}', "
                            f"outside every rewritten region and site and after none of them: "
                            f"{type(failure.cause).__name__}: {failure.cause}"
                        ) from failure.cause
                    fail(name, failure.cause)
                    break
    finally:
        torch.set_num_threads(threads)
        for module in [*regions, *attention]:
            module.__dict__.pop("forward", None)
        for region, policy in saved:
            region.gate.policy = policy
            region.gate.last_error.zero_()
        for module, value in cheaper:
            if value is not None:
                module.full_when_cheaper = value
        _reset(regions, attention)
    return list(failures.values())


class _NodeFailure(Exception):
    def __init__(self, node: torch.fx.Node, cause: BaseException):
        super().__init__(node.name)
        self.node = node
        self.cause = cause


class _Runner(torch.fx.Interpreter):
    """Runs the graph node by node, to tell which node raised."""

    def run_node(self, n: torch.fx.Node):
        try:
            return super().run_node(n)
        except _NodeFailure:
            raise
        except Exception as error:
            raise _NodeFailure(n, error) from error


def _culprit(node: torch.fx.Node, rewritten: dict[torch.fx.Node, str]) -> str | None:
    """The rewritten region or site to blame for ``node`` raising: the nearest one upstream of it
    (its output is what ``node``, or the dense graph of the region ``node`` calls, could not
    take: the original ops fail only on inputs unlike the original's), else ``node``'s own."""
    frontier, seen = list(node.all_input_nodes), set()
    while frontier:
        following = []
        for current in frontier:
            if current in seen:
                continue
            seen.add(current)
            if current in rewritten:
                return rewritten[current]
            following.extend(current.all_input_nodes)
        frontier = following
    return rewritten.get(node)


def _reset(regions: list[SparseRegion], attention: list[nn.Module]) -> None:
    for module in [*regions, *attention]:
        module.reset()
