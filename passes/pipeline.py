"""The pass pipeline: every analysis and rewrite pass, in order, and the runner.

A pass is a small object with a ``name``, the metadata keys it ``reads`` and ``writes``
(``node.meta`` keys and context records, ``evtrace.graph.meta``) and one entry point
``run(graph_module, context)``. Adding a pass is its module plus one line in ``PIPELINE``.
The runner checks, before the passes run, that everything each reads was written by the tracer
or an earlier pass; while a pass runs, which keys it reads and writes (the metadata accessors
and the context note them), and fails on one it does not declare; after it, that the records it
declares are there. It times each pass, keeps what each returns (a ``PassResult``: what it
rewrote, its counts; the report's analysis line), and after each pass that rewrites the graph
puts its nodes in order, lints it and recompiles it.
``evtrace.inspect`` runs the analysis prefix (``ANALYSIS``, up to the plan); ``transform``
runs all of it.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence

import torch
from torch import nn

from evtrace.graph.errors import EvtraceError, RewriteError
from evtrace.graph.meta import (
    FRONTEND,
    MODULE_PATH,
    PLAN,
    REGIONS,
    SELECTIONS,
    SITES,
    SPACES,
    STEPS,
    TENSOR,
    Touched,
    recording,
)
from evtrace.graph.tracer import as_args, trace
from evtrace.runtime.gates import SparseRegion

from .attention_sites import AttentionSites
from .canonicalize import Canonicalize
from .cleanup import Cleanup
from .context import PassContext, PassOptions, PassResult
from .delta_attention import DeltaAttention
from .fold_shapes import FoldShapes
from .pack_linears import PackLinears
from .plan import Planning
from .regions import Regions
from .sparse_regions import SparseRegions
from .time_steps import TimeStepsPass
from .token_flow import TokenFlowPass

PIPELINE = (
    Canonicalize(),  # meta[OP]: one spelling per op
    TokenFlowPass(),  # meta[TOKENS], meta[ROLE]; SPACES
    TimeStepsPass(),  # STEPS: the sub-model that runs once per time step, or why none
    AttentionSites(),  # meta[ATTENTION]; SITES
    Regions(),  # meta[REGION]; REGIONS
    Planning(),  # PLAN: modes, reasons, shapes, counted ops; budget checked
    FoldShapes(),  # shape reads become literals
    SparseRegions(),  # gated regions become SparseRegion calls; SELECTIONS
    DeltaAttention(),  # planned sites become delta attention modules
    PackLinears(),  # the sparse regions' linears read packed weights
    Cleanup(),  # cloned outputs, dead code removed, lint, recompile
)
ANALYSIS = PIPELINE[: [p.name for p in PIPELINE].index("plan") + 1]
STEP_ANALYSIS = PIPELINE[: [p.name for p in PIPELINE].index("time_steps") + 1]

TRACER_WRITES = frozenset({TENSOR, MODULE_PATH, FRONTEND})
RECORDS = frozenset({SPACES, STEPS, SITES, REGIONS, PLAN, SELECTIONS})


class PipelineError(EvtraceError):
    """A pass reads what no earlier pass writes, touches node metadata or records it does not
    declare, did not write a record it declares, or left a graph that is not valid."""


def check_order(passes: Sequence) -> None:
    """Raise PipelineError when a pass reads a key that neither the tracer nor an earlier pass writes."""
    available = set(TRACER_WRITES)
    for p in passes:
        missing = p.reads - available
        if missing:
            raise PipelineError(
                f"pass '{p.name}' reads {sorted(missing)}, which no earlier pass writes; "
                "move it after the pass that writes them"
            )
        available |= p.writes


def check_touched(p, touched: Touched) -> None:
    """Raise PipelineError when pass ``p`` read or wrote a key it does not declare (reading what
    it declares it writes is allowed)."""
    reads = touched.reads - p.reads - p.writes
    writes = touched.writes - p.writes
    if reads or writes:
        found = []
        if reads:
            found.append(f"reads {sorted(reads)}")
        if writes:
            found.append(f"writes {sorted(writes)}")
        raise PipelineError(
            f"pass '{p.name}' {' and '.join(found)} without declaring it (declared: reads "
            f"{sorted(p.reads)}, writes {sorted(p.writes)}); add the keys to its declaration, so "
            "that the order check sees them, or stop touching them"
        )


def _default_result(p, ctx: PassContext) -> PassResult:
    """A result for a pass that returns none: the size of the records it wrote."""
    counts = []
    for key, what in ((SPACES, "token spaces"), (SITES, "sites"), (REGIONS, "regions")):
        if key in p.writes:
            counts.append((what, len(ctx.records.get(key) or ())))
    if SELECTIONS in p.writes:
        counts.append(("regions rewritten", len(ctx.records.get(SELECTIONS) or ())))
    note = ""
    if STEPS in p.writes:
        search = ctx.records.get(STEPS)
        found = search is not None and search.structure is not None
        note = "a per-step sub-model" if found else "no per-step sub-model"
    return PassResult(tuple(counts), note=note)


def _rewritten_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """The region or site name of an inserted region or attention call, else None."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    if isinstance(module, SparseRegion):
        return module.name
    return getattr(module, "site_name", None) or None


def settle(gm: torch.fx.GraphModule) -> None:
    """After a rewriting pass: put the nodes in a topological order (in place: the records keep
    their nodes), lint the graph and recompile it.

    Raises:
        RewriteError: a rewritten region or site reads a node that is no longer in the graph, or
            sits on a cycle (the first such call in the graph), so that it can be kept dense.
        PipelineError: the graph is not valid for another reason.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    for node in nodes:
        gone = [a for a in node.all_input_nodes if a not in position]
        if gone:
            problem = PipelineError(
                f"node '{node.name}' reads '{gone[0].name}', which is no longer in the graph"
            )
            name = _rewritten_name(gm, node)
            if name is not None:
                raise RewriteError(name, problem)
            raise problem
    pending = {n: len(n.all_input_nodes) for n in nodes}
    ready = [(position[n], n.name, n) for n in nodes if not pending[n]]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, node = heapq.heappop(ready)
        order.append(node)
        for user in node.users:
            pending[user] -= 1
            if not pending[user]:
                heapq.heappush(ready, (position[user], user.name, user))
    if len(order) < len(nodes):
        stuck = [n for n in nodes if pending[n]]
        names = [name for name in (_rewritten_name(gm, n) for n in stuck) if name]
        problem = PipelineError(
            f"the rewritten graph has a cycle through {', '.join(n.name for n in stuck[:8])}"
            + (", ..." if len(stuck) > 8 else "")
        )
        if names:
            raise RewriteError(names[0], problem)
        raise problem
    if order != nodes:
        previous = order[0]
        if previous is not nodes[0]:
            nodes[0].prepend(previous)
        for node in order[1:]:
            previous.append(node)
            previous = node
    graph.lint()
    gm.recompile()


def run_passes(ctx: PassContext, passes: Sequence = PIPELINE) -> PassContext:
    """Run ``passes`` in order on ``ctx.gm``, timing each into ``ctx.seconds``.

    Each pass gets its options as fields (``configured(ctx.options)`` where it has that
    method); while it runs, the metadata accessors note what it reads and writes, and an
    undeclared read or write fails the run (``PipelineError``). What it returns (a
    :class:`~passes.context.PassResult`) goes to ``ctx.results``. After a pass that rewrites
    the graph (``rewrites = True``), the graph is put in order, linted and recompiled.
    """
    check_order(passes)
    for p in passes:
        configured = p.configured(ctx.options) if hasattr(p, "configured") else p
        start = time.perf_counter()
        with recording() as touched:
            result = configured.run(ctx.gm, ctx)
        if getattr(p, "rewrites", False):
            settle(ctx.gm)
        ctx.seconds[p.name] = time.perf_counter() - start
        check_touched(p, touched)
        missing = {key for key in p.writes & RECORDS if key not in ctx.records}
        if missing:
            raise PipelineError(
                f"pass '{p.name}' declares the records {sorted(missing)} but did not write them"
            )
        ctx.results[p.name] = result if isinstance(result, PassResult) else _default_result(p, ctx)
    return ctx


def analyze(
    model: nn.Module,
    example_inputs,
    frontend: str = "auto",
    *,
    options: PassOptions | None = None,
    passes: Sequence = ANALYSIS,
    **trace_options,
) -> PassContext:
    """Trace ``model`` and run ``passes`` (the analysis prefix by default) on the graph.

    See :func:`evtrace.trace` for ``frontend`` and the trace options. The context holds the
    graph (``gm``), the records (``spaces``, ``sites``, ``regions``, ``plan``) and the time of
    the trace and of each pass (``seconds``).
    """
    args = as_args(example_inputs)
    # The passes run hundreds of small ops on shapes and token ids: on shared cores every
    # multi-threaded op waits for a descheduled thread (measured 5 to 10x slower), so one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        gm = trace(model, args, frontend=frontend, **trace_options)
        ctx = PassContext(gm, options or PassOptions(), type(model).__name__, seconds={"trace": 0.0})
        ctx.seconds["trace"] = time.perf_counter() - start
        return run_passes(ctx, passes)
    finally:
        torch.set_num_threads(threads)
