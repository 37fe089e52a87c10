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
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from evtrace.runtime.cost_profile import DEFAULT_PROFILE


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
MIN_PACKED_ROWS = DEFAULT_PROFILE.min_packed_rows
MAX_PACKED_ROWS = DEFAULT_PROFILE.max_packed_rows


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


class PackedWeights:
    """Packed copies of weights, one per weight tensor, shared by every kernel that reads it (an
    eventful model's kernels of all its input signatures share one store).

    An entry is keyed by the weight's identity (a weak reference, so a freed weight's entry is
    never taken for a new tensor at the same address) and its storage, version counter, shape and
    strides: any tracked change packs it again. Copies and pickles of a store are empty.
    """

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}
        # sibling weights packed as one (rows of the concatenation): keyed by their ids in order
        self._groups: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], tuple, Tensor]] = {}

    def __len__(self) -> int:
        single = sum(1 for ref, _key, _packed in self._entries.values() if ref() is not None)
        return single + sum(1 for refs, _k, _p in self._groups.values() if all(r() is not None for r in refs))

    def clear(self) -> None:
        self._entries = {}
        self._groups = {}

    def holds(self, weight: Tensor) -> bool:
        entry = self._entries.get(id(weight))
        return entry is not None and entry[0]() is weight

    def holds_group(self, weights: tuple[Tensor, ...]) -> bool:
        entry = self._groups.get(tuple(id(w) for w in weights))
        return entry is not None and all(r() is w for r, w in zip(entry[0], weights))

    def get_group(self, weights: tuple[Tensor, ...], rows: int) -> Tensor:
        """One packed copy of the weights stacked by rows (``torch.cat(weights)``), packed again when
        any of them changes."""
        ids = tuple(id(w) for w in weights)
        key = tuple((w.data_ptr(), w._version, tuple(w.shape), w.stride()) for w in weights)
        entry = self._groups.get(ids)
        if entry is None or entry[1] != key or any(r() is not w for r, w in zip(entry[0], weights)):
            with torch.no_grad():
                stacked = torch.cat([w.detach() for w in weights])
                packed = torch.ops.mkldnn._reorder_linear_weight(stacked, max(rows, 1))
            self._groups = {i: e for i, e in self._groups.items() if all(r() is not None for r in e[0])}
            entry = (tuple(weakref.ref(w) for w in weights), key, packed)
            self._groups[ids] = entry
        return entry[2]

    def get(self, weight: Tensor, rows: int) -> Tensor:
        """The packed copy of ``weight`` (packed now if missing or out of date)."""
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride())
        entry = self._entries.get(id(weight))
        if entry is None or entry[0]() is not weight or entry[1] != key:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), max(rows, 1))
            self._entries = {i: e for i, e in self._entries.items() if e[0]() is not None}
            entry = (weakref.ref(weight), key, packed)
            self._entries[id(weight)] = entry
        return entry[2]

    def __getstate__(self):
        return {"_entries": {}, "_groups": {}}

    def __deepcopy__(self, memo):
        return PackedWeights()


class _PackedKernel(nn.Module):
    """What the packed kernels share: a name, the store of packed copies (its own, or one shared
    through :meth:`share`) and weak references to the weights of the last packed call."""

    #: rows between which packing pays (``CostProfile.min_packed_rows`` / ``max_packed_rows``)
    min_rows: int = MIN_PACKED_ROWS
    max_rows: int = MAX_PACKED_ROWS

    def __init__(self, name: str = ""):
        super().__init__()
        self.name = name
        self.store = PackedWeights()
        self._last: tuple[weakref.ref, ...] = ()

    def _last_weights(self) -> tuple[Tensor, ...] | None:
        weights = tuple(r() for r in self._last)
        return weights if weights and all(w is not None for w in weights) else None

    def take_cost_profile(self, profile) -> None:
        """Pack only between a device's row limits (a ``CostProfile``)."""
        self.min_rows = profile.min_packed_rows
        self.max_rows = profile.max_packed_rows

    def share(self, store: PackedWeights) -> None:
        """Keep the packed copies in ``store`` (shared with other kernels reading the same weights)."""
        self.store = store

    def invalidate(self) -> None:
        """Forget the packed copies: the next call packs the weights again."""
        self.store.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_last"] = ()
        return state

    def extra_repr(self) -> str:
        return f"name={self.name!r}, packed={self.packed}"


class PackedLinear(_PackedKernel):
    """``F.linear(x, weight, bias)`` with ``weight`` packed once for oneDNN and reused.

    The weight and bias are arguments, not parameters of this module (the rewritten graph reads
    them from the original model), so the module holds no state worth saving: the packed copies
    live in a :class:`PackedWeights` store (its own, or one shared through :meth:`share`), which
    copies and pickles leave empty; the next call packs again.
    """

    @property
    def packed(self) -> bool:
        """Whether the weight of the last call has a packed copy now."""
        weights = self._last_weights()
        return weights is not None and self.store.holds(weights[0])

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if not can_pack(x, weight, bias):
            return F.linear(x, weight, bias)
        rows = x.numel() // max(x.shape[-1], 1)
        if not self.min_rows <= rows <= self.max_rows:
            return F.linear(x, weight, bias)
        self._last = (weakref.ref(weight),)
        return torch.ops.mkldnn._linear_pointwise(x, self.store.get(weight, rows), bias, "none", [], "")


class PackedSiblingLinears(_PackedKernel):
    """Linears that read the same input, ``F.linear(x, w_i, b_i)`` for every i, as one packed product
    with the weights stacked, split back into one output per linear (views of one tensor).

    HF attention layers project q, k and v with three linears of one input: one kernel call instead
    of three, and one pass over the rows. Where the packed kernel does not apply (see
    :class:`PackedLinear`) it runs the separate ``F.linear`` calls, as the original graph did.
    Biases: all or none.
    """

    @property
    def packed(self) -> bool:
        """Whether the weights of the last call have a packed copy now."""
        weights = self._last_weights()
        return weights is not None and self.store.holds_group(weights)

    def forward(self, x: Tensor, weights: tuple, biases: tuple | None = None) -> tuple[Tensor, ...]:
        biases = (None,) * len(weights) if biases is None else tuple(biases)
        rows = x.numel() // max(x.shape[-1], 1)
        if (
            not all(can_pack(x, w, b) for w, b in zip(weights, biases))
            or not self.min_rows <= rows <= self.max_rows
        ):
            return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))
        self._last = tuple(weakref.ref(w) for w in weights)
        bias = None if biases[0] is None else torch.cat(biases)
        out = torch.ops.mkldnn._linear_pointwise(
            x, self.store.get_group(tuple(weights), rows), bias, "none", [], ""
        )
        return out.split([w.shape[0] for w in weights], dim=-1)


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
