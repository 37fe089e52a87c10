"""The analysis pipeline: trace, then the passes that understand the graph, in order."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from passes.attention_sites import AttentionSite, find_attention_sites
from passes.canonicalize import canonicalize
from passes.regions import Region, find_regions
from passes.token_flow import infer_tokens

from evtrace.graph.meta import TokenSpace
from evtrace.graph.tracer import as_args, trace

# Each pass reads what the ones before it wrote (ARCHITECTURE.md lists the metadata).
ANALYSIS_PIPELINE = (
    ("canonicalize", canonicalize),
    ("token_flow", infer_tokens),
    ("attention_sites", find_attention_sites),
    ("regions", find_regions),
)


@dataclass
class Analysis:
    """A traced graph and what the analysis passes found in it."""

    gm: torch.fx.GraphModule
    spaces: list[TokenSpace]
    sites: list[AttentionSite]
    regions: list[Region]
    model_name: str
    frontend: str
    seconds: dict[str, float] = field(default_factory=dict)


def analyze(model: nn.Module, example_inputs, frontend: str = "auto", **trace_options) -> Analysis:
    """Trace ``model`` and run the analysis passes. See :func:`evtrace.trace` for the options."""
    args = as_args(example_inputs)
    seconds: dict[str, float] = {}
    # The passes run hundreds of small ops on shapes and token ids: on shared cores every
    # multi-threaded op waits for a descheduled thread (measured 5 to 10x slower), so one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        gm = trace(model, args, frontend=frontend, **trace_options)
        seconds["trace"] = time.perf_counter() - start
        results = {}
        for name, run in ANALYSIS_PIPELINE:
            start = time.perf_counter()
            results[name] = run(gm)
            seconds[name] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return Analysis(gm=gm, spaces=results["token_flow"], sites=results["attention_sites"],
                    regions=results["regions"], model_name=type(model).__name__,
                    frontend=gm.meta["evtrace.frontend"], seconds=seconds)
