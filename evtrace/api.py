"""The public entry points."""
from __future__ import annotations

from torch import nn

from .analysis import analyze
from .report import Report, build_report


def inspect(model: nn.Module, example_inputs, frontend: str = "auto", **trace_options) -> Report:
    """Trace ``model`` and report what evtrace would rewrite.

    Per token-wise region: which tensors would be gated and which linears become sparse; per
    attention site: its form, head layout, logit terms, q/k/v producers and whether it can be
    delta-updated exactly or stays dense (and why); every op on a token path that evtrace does
    not understand, with the reason it stays dense.

    Args:
        model: the vision Transformer, in eval mode.
        example_inputs: a tensor or tuple of tensors as the model is called.
        frontend: ``"auto"``, ``"fx"`` or ``"export"`` (see :func:`evtrace.trace`).
        **trace_options: ``leaf_modules``, ``concrete_args`` (see :func:`evtrace.trace`).

    Returns:
        A :class:`Report`; ``print(report)`` shows the tables, ``report.to_dict()`` the data.
    """
    return build_report(analyze(model, example_inputs, frontend=frontend, **trace_options))
