"""Importing real timm in the tests and in bench/ (never in the library).

timm imports torchvision, and on a CPU-only machine no PyPI torchvision loads its compiled parts
beside the pinned CPU torch: the wheels are CUDA builds. Two consequences:

- the torchvision that pip resolves for torch 2.13 (0.28) stops at import with "operator
  torchvision::nms does not exist" (its meta registrations look the op up), and with it every
  ``transformers`` model class whose module imports torchvision: so the dev set-up installs
  ``torchvision==0.16.2 --no-deps`` instead (``./dev``), whose pure-Python parts import and only
  warn that ``image.so`` does not load. timm uses none of torchvision's compiled ops.
- where a torchvision that needs the op schemas is installed anyway, :func:`declare_torchvision_ops`
  declares the two that its Python code looks up at import (``nms``, ``qnms``), so that it and
  timm import. Where the compiled library does load, it registers the real ops and nothing is
  declared.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import warnings

import torch

_declared: list = []  # keeps the declaring Library alive (dropping it would undo the schemas)


def declare_torchvision_ops() -> bool:
    """Make ``import torchvision`` work beside a CPU torch. Returns True where the op schemas had
    to be declared (the compiled ops library did not load), False otherwise."""
    if _declared or hasattr(torch.ops.torchvision, "nms"):
        return bool(_declared)
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    for library in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(library)
            return False
        except OSError:
            pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    _declared.append(lib)
    return True


def import_timm():
    """``import timm`` after :func:`declare_torchvision_ops`, without torchvision's warning that
    its image extension does not load (unused here)."""
    declare_torchvision_ops()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to load image Python extension")
        import timm

    return timm
