"""Readable reference models for evtrace: plain nn.Modules, explicit attention, weight loaders.

Nothing in ``evtrace`` or ``passes`` depends on this package; it exists to exercise them.
"""
from .vit import VisionTransformer, deit_tiny, vit, vit_b16, vit_s14_dinov2

__all__ = ["VisionTransformer", "vit", "vit_b16", "vit_s14_dinov2", "deit_tiny"]
