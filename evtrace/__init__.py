"""evtrace: eventful (delta-updated) vision Transformers for video, as a torch.fx pass.

``transform`` rewrites a model; ``inspect`` reports what it finds; ``verify`` checks an
eventful model against its original frame by frame; ``trace`` is the front end they share.
"""
from . import policies
from .api import inspect
from .errors import EvtraceError, InputMismatchError, NonFiniteInputError, NoTokenSequenceError, TraceError
from .eventful import EventfulModel, transform
from .policies import All, FixedCapacityThreshold, Threshold, TopFraction, TopK
from .report import Report
from .tracer import trace
from .verify import VerifyResult, verify
from .cost import FlopCount, count_flops

__version__ = "0.1.0"
__all__ = ["transform", "inspect", "verify", "trace", "policies", "EventfulModel", "Report", "VerifyResult",
           "TopK", "TopFraction", "Threshold", "FixedCapacityThreshold", "All",
           "EvtraceError", "TraceError", "NoTokenSequenceError", "InputMismatchError", "NonFiniteInputError"]
