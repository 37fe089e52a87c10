"""Readable reference models for evtrace: plain nn.Modules, explicit attention, weight loaders.

Nothing in ``evtrace`` or ``passes`` depends on this package; it exists to exercise them.
"""

from .vit import VisionTransformer, deit_tiny, vit, vit_b16, vit_s14_dinov2
from .vitdet import ViTDet, ViTDetBackbone, pad_to_square, vitdet, vitdet_b
from .vivit import ViViT, vivit, vivit_b

__all__ = [
    "VisionTransformer",
    "vit",
    "vit_b16",
    "vit_s14_dinov2",
    "deit_tiny",
    "ViTDet",
    "ViTDetBackbone",
    "vitdet",
    "vitdet_b",
    "pad_to_square",
    "ViViT",
    "vivit",
    "vivit_b",
]
