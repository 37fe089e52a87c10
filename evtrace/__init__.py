"""evtrace: eventful (delta-updated) vision Transformers for video, as a torch.fx pass."""
__version__ = "0.1.0"
