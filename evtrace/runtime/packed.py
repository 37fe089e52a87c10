"""Linear layers on gathered rows with the weight kept in oneDNN's packed layout.

On CPU, ``F.linear`` re-reads and re-blocks its fp32 weight on every call; with few rows (the
r gathered tokens of a sparse region) that dominates the GEMM. ``torch.ops.mkldnn`` can pack the
weight once and reuse it (1.1x to 1.4x faster at 32 to 200 rows on this machine, about 1.05x at
400 and more; ``bench/packed_linear.py``). :class:`PackedLinear` keeps one packed copy per
weight and packs it again when the weight changes: another tensor (``.to()``, assignment) or an
in-place write through the parameter (``load_state_dict``, ``copy_`` under ``no_grad``, an
optimizer step), which bumps its version counter. A write through ``weight.data`` bypasses the
counter: call :meth:`PackedLinear.invalidate` (``EventfulModel.reset_packed_weights()``) after one.

Everywhere the packed kernel does not apply it computes ``F.linear`` itself: a weight made under
``torch.inference_mode`` (an inference tensor has no version counter to watch), fewer than
``MIN_PACKED_ROWS`` or more than ``MAX_PACKED_ROWS`` rows (where packing does not pay), not CPU fp32,
gradients wanted, tracing, compiling or exporting (the compiler sees a plain linear), a dispatch
mode active (FLOP counters), or oneDNN unavailable or disabled
(``torch.backends.mkldnn.flags(enabled=False)``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode


def packing_available() -> bool:
    """Whether this build of torch has oneDNN's packed linear kernels and they are enabled."""
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


# Outside these row counts the packed kernel does not win on this machine (bench/packed_linear.py:
# 0.5x to 0.9x at 1 to 10 rows for some shapes, 0.99x to 1.03x at 1604): plain F.linear there.
MIN_PACKED_ROWS = 16
MAX_PACKED_ROWS = 1024


def _plain_cpu_float(t: Tensor) -> bool:
    return type(t) in (Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32


def can_pack(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``F.linear(x, weight, bias)`` may run as a packed oneDNN linear, right now."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return False  # first: the compiler must see nothing else of this function
    if not (_plain_cpu_float(x) and _plain_cpu_float(weight) and x.dim() >= 2 and weight.dim() == 2):
        return False
    if weight.is_inference():  # no version counter: an in-place write could not be seen
        return False
    if bias is not None and not _plain_cpu_float(bias):
        return False
    wants_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if wants_grad and torch.is_grad_enabled():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return packing_available()


class PackedLinear(nn.Module):
    """``F.linear(x, weight, bias)`` with ``weight`` packed once for oneDNN and reused.

    The weight and bias are arguments, not parameters of this module (the rewritten graph reads
    them from the original model), so the module holds no state worth saving: the packed copy
    is dropped when the module is copied or pickled and rebuilt on the next call.
    """

    def __init__(self, name: str = ""):
        super().__init__()
        self.name = name
        # (weight identity, packed copy); a tuple, not a tensor attribute, so that structural
        # copies (count_flops' meta copy) leave the opaque oneDNN tensor alone
        self._cache: tuple[tuple, Tensor] | None = None

    @property
    def packed(self) -> bool:
        return self._cache is not None

    def invalidate(self) -> None:
        """Forget the packed copy: the next call packs the weight again."""
        self._cache = None

    def _packed_weight(self, weight: Tensor, rows: int) -> Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride())
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(rows, 1))
            self._cache = (key, packed)
        return self._cache[1]

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not can_pack(x, weight, bias):
            return F.linear(x, weight, bias)
        rows = x.numel() // max(x.shape[-1], 1)
        if not MIN_PACKED_ROWS <= rows <= MAX_PACKED_ROWS:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(weight, rows), bias, "none", [], "")

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def extra_repr(self) -> str:
        return f"name={self.name!r}, packed={self.packed}"


class PackedLinearLayer(nn.Linear):
    """An ``nn.Linear`` (the same parameters, shared) whose forward runs through :class:`PackedLinear`."""

    def __init__(self, linear: nn.Linear, name: str = ""):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.kernel = PackedLinear(name)

    def forward(self, x: Tensor) -> Tensor:
        return self.kernel(x, self.weight, self.bias)


def with_packed_linears(model: nn.Module) -> nn.Module:
    """A deep copy of a dense ``model`` whose ``nn.Linear`` layers run with packed weights (the
    same ``state_dict`` keys): the dense baseline that the packed sparse regions are compared with."""
    packed = copy.deepcopy(model)
    for parent_name, parent in list(packed.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                path = f"{parent_name}.{child_name}" if parent_name else child_name
                setattr(parent, child_name, PackedLinearLayer(child, path))
    return packed
