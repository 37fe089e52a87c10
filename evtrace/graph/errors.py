"""Exceptions raised by evtrace. Every message says what failed, where, and what to do next."""

from __future__ import annotations

import torch.fx


class EvtraceError(Exception):
    """Base class of evtrace's own errors."""


class TraceError(EvtraceError):
    """No front end could capture the model as a graph."""


class NoTokenSequenceError(EvtraceError):
    """The traced graph has no token sequence (for example a CNN)."""


class InputMismatchError(EvtraceError, ValueError):
    """A frame does not match what the eventful model's state was built for."""


class BudgetError(EvtraceError, ValueError):
    """A policy selects a number of tokens per frame outside [1, N] at some gate."""


class NonFiniteInputError(EvtraceError, ValueError):
    """A frame holds NaN or Inf values; it is rejected before any state changes."""


class NonFiniteStateError(NonFiniteInputError):
    """A finite frame produced NaN or Inf values inside the model (a value too large for the
    dtype's arithmetic, e.g. 3e38 in fp32). The streams it poisoned were reset; ``streams``
    lists them and ``output`` holds the frame's output (valid for the other streams)."""

    def __init__(self, message: str, streams: list[int] | None = None, output=None):
        super().__init__(message)
        self.streams = list(streams or [])
        self.output = output


class ConcurrentCallError(EvtraceError, RuntimeError):
    """An eventful model was called (or reset, or given a policy) from a second thread while
    another thread was running a frame on it."""


class FrozenTokensWarning(UserWarning):
    """A budget no larger than the always-updated prefix (class and register tokens): every
    patch token is frozen after the first frame."""


class RewriteError(EvtraceError):
    """Rewriting one region or attention site failed, or the rewritten one failed or disagreed
    with its dense computation on a partial frame; ``transform`` then builds the model again
    with that one kept dense (the report says why, :class:`KeptDenseWarning` says so) instead
    of failing, unless ``strict=True``."""

    def __init__(self, name: str, cause: BaseException, note: str = ""):
        super().__init__(f"rewriting '{name}' failed: {type(cause).__name__}: {cause}{note}")
        self.name = name
        self.cause = cause


class KeptDenseWarning(UserWarning):
    """Regions or attention sites that the analysis planned to rewrite were kept dense (exact)
    because their rewrite failed or disagreed with the dense computation on a partial frame;
    the message and the report give each reason. ``transform(..., strict=True)`` raises
    :class:`RewriteError` instead."""


class LowSavingsWarning(UserWarning):
    """A transform that saves little: under 1.2x fewer steady-state FLOPs at its policy, or
    attention sites of which none is delta-updated. The message names the top reasons."""


def where(node: torch.fx.Node) -> str:
    """A short description of a node for error messages: name, module path and source line."""
    from evtrace.graph.meta import module_path  # local import: meta imports nothing from here

    text = f"node '{node.name}'"
    path = module_path(node)
    if path:
        text += f" (module '{path}')"
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
        if lines:
            text += f", from: {lines[-1]}"
    return text
