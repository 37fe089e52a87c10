"""evtrace: eventful (delta-updated) vision Transformers for video, as a torch.fx pass.

``transform`` rewrites a model; ``inspect`` reports what it finds; ``verify`` checks an
eventful model against its original frame by frame; ``count_flops`` counts FLOPs per frame;
``trace`` is the front end they share.

The public names are loaded on first access, so importing one layer (``passes``,
``evtrace.runtime``) does not import the API above it. The layers, lowest first:
``evtrace.graph`` (metadata, errors, tracer, the plan record), ``evtrace.runtime`` (gates,
attention, policies), ``passes`` (analysis and rewrite), the API (``evtrace.eventful``,
``evtrace.api``, ``evtrace.report``, ``evtrace.cost``, ``evtrace.verification``) and
``evtrace.tools`` (command line, demo, benchmarks; the only users of ``models_zoo``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "transform": "evtrace.eventful",
    "EventfulModel": "evtrace.eventful",
    "export": "evtrace.deploy",
    "benchmark": "evtrace.benchmarking",
    "calibrate": "evtrace.calibration",
    "CostProfile": "evtrace.runtime.cost_profile",
    "BenchmarkResult": "evtrace.benchmarking",
    "StreamPool": "evtrace.serving",
    "inspect": "evtrace.api",
    "verify": "evtrace.verification",
    "VerifyResult": "evtrace.verification",
    "count_flops": "evtrace.cost.count",
    "FlopCount": "evtrace.cost.count",
    "register_flop_rule": "evtrace.cost.count",
    "PaperConventionWarning": "evtrace.cost.count",
    "Report": "evtrace.report",
    "trace": "evtrace.graph.tracer",
    "TopK": "evtrace.runtime.policies",
    "TopFraction": "evtrace.runtime.policies",
    "Threshold": "evtrace.runtime.policies",
    "FixedCapacityThreshold": "evtrace.runtime.policies",
    "All": "evtrace.runtime.policies",
    "EvtraceError": "evtrace.graph.errors",
    "TraceError": "evtrace.graph.errors",
    "NoTokenSequenceError": "evtrace.graph.errors",
    "InputMismatchError": "evtrace.graph.errors",
    "NonFiniteInputError": "evtrace.graph.errors",
    "NonFiniteStateError": "evtrace.graph.errors",
    "BudgetError": "evtrace.graph.errors",
    "ConcurrentCallError": "evtrace.graph.errors",
    "RewriteError": "evtrace.graph.errors",
    "KeptDenseWarning": "evtrace.graph.errors",
    "LowSavingsWarning": "evtrace.graph.errors",
    "FrozenTokensWarning": "evtrace.graph.errors",
    "AttentionMode": "evtrace.graph.plan",
}
_MODULES = {"policies": "evtrace.runtime.policies"}

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'evtrace' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
