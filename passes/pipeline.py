"""The pass pipeline: every analysis and rewrite pass, in order, and the runner.

A pass is a small object with a ``name``, the metadata keys it ``reads`` and ``writes``
(``node.meta`` keys and context records, ``evtrace.graph.meta``) and one entry point
``run(graph_module, context)``. Adding a pass is its module plus one line in ``PIPELINE``.
The runner checks, before a pass runs, that everything it reads was written by the tracer or
an earlier pass, checks after it that the records it declares are there, and times it.
``evtrace.inspect`` runs the analysis prefix (``ANALYSIS``, up to the plan); ``transform``
runs all of it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from evtrace.graph.errors import EvtraceError
from evtrace.graph.meta import MODULE_PATH, PLAN, REGIONS, SELECTIONS, SITES, SPACES, STEPS, TENSOR
from evtrace.graph.tracer import as_args, trace

from .attention_sites import AttentionSites
from .canonicalize import Canonicalize
from .cleanup import Cleanup
from .context import PassContext, PassOptions
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

TRACER_WRITES = frozenset({TENSOR, MODULE_PATH})
RECORDS = frozenset({SPACES, STEPS, SITES, REGIONS, PLAN, SELECTIONS})


class PipelineError(EvtraceError):
    """A pass reads what no earlier pass writes, or did not write a record it declares."""


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


def run_passes(ctx: PassContext, passes: Sequence = PIPELINE) -> PassContext:
    """Run ``passes`` in order on ``ctx.gm``, timing each into ``ctx.seconds``."""
    check_order(passes)
    for p in passes:
        start = time.perf_counter()
        p.run(ctx.gm, ctx)
        ctx.seconds[p.name] = time.perf_counter() - start
        missing = {key for key in p.writes & RECORDS if key not in ctx.records}
        if missing:
            raise PipelineError(
                f"pass '{p.name}' declares the records {sorted(missing)} but did not write them"
            )
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
