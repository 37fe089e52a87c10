"""evtrace: eventful (delta-updated) vision Transformers for video, as a torch.fx pass.

Public API: :func:`trace`, :func:`inspect`.
"""
from .api import inspect
from .errors import EvtraceError, NoTokenSequenceError, TraceError
from .report import Report
from .tracer import trace

__version__ = "0.1.0"
__all__ = ["trace", "inspect", "Report", "EvtraceError", "TraceError", "NoTokenSequenceError"]
