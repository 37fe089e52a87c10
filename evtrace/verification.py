"""``evtrace.verify`` (this module): per-frame agreement of an eventful model with its original."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from evtrace.graph.tracer import as_args, trace


@dataclass
class OutputError:
    frame: int
    output: str  # pytree path of the output, or a region exit for per-layer errors
    max_abs: float
    scale: float  # max |original|

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else self.max_abs


@dataclass
class VerifyResult:
    """Errors of every output (and, on request, every region exit) on every frame."""

    outputs: list[OutputError] = field(default_factory=list)
    layers: list[OutputError] = field(default_factory=list)

    @property
    def max_relative(self) -> float:
        return max((e.relative for e in self.outputs), default=0.0)

    def per_frame(self) -> list[float]:
        """Worst relative output error of each frame."""
        worst: dict[int, float] = {}
        for e in self.outputs:
            worst[e.frame] = max(worst.get(e.frame, 0.0), e.relative)
        return [worst[k] for k in sorted(worst)]

    def __str__(self) -> str:
        lines = ["frame  output                          max abs err   output scale   relative"]
        for e in self.outputs + self.layers:
            lines.append(
                f"{e.frame:5d}  {e.output[:30]:30s}  {e.max_abs:11.3e}   {e.scale:12.3e}   {e.relative:9.2e}"
            )
        return "\n".join(lines)


def _flat(out) -> list[tuple[str, torch.Tensor]]:
    leaves, spec = pytree.tree_flatten_with_path(out)
    return [
        (pytree.keystr(path) or "output", leaf) for path, leaf in leaves if isinstance(leaf, torch.Tensor)
    ]


def _error(frame: int, name: str, got: torch.Tensor, want: torch.Tensor) -> OutputError:
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        raise ValueError(
            f"output {name} has shape {tuple(got.shape)} in the eventful model and "
            f"{tuple(want.shape)} in the original"
        )
    return OutputError(
        frame,
        name,
        float((got - want).abs().max()) if got.numel() else 0.0,
        float(want.abs().max()) if want.numel() else 0.0,
    )


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm, names: set[str]):
        super().__init__(gm)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.names and isinstance(value, torch.Tensor):
            self.values[n.name] = value.detach().clone()
        return value


def verify(model: nn.Module, emodel, frames: Iterable, per_layer: bool = False) -> VerifyResult:
    """Run ``emodel`` and ``model`` on the same frames and measure the error of every output.

    The eventful model is reset first, so frame 0 is its dense first frame.

    Args:
        model: the original model.
        emodel: the EventfulModel built from it.
        frames: an iterable of model inputs (tensors or tuples), consecutive frames.
        per_layer: also compare every region exit buffer with the original's value of that
            tensor (by node name), as ``result.layers``.

    Returns:
        A :class:`VerifyResult`; ``str(result)`` is a table.
    """
    result = VerifyResult()
    emodel.reset()
    reference_gm = None
    exits: dict[str, tuple] = {}
    with torch.no_grad():
        for i, frame in enumerate(frames):
            args = as_args(frame)
            want = model(*args)
            got = emodel(*args)
            for (name, w), (_, g) in zip(_flat(want), _flat(got), strict=True):
                result.outputs.append(_error(i, name, g, w))
            if per_layer:
                if reference_gm is None:
                    reference_gm = trace(model, args, frontend=emodel.variant_frontend())
                    exits = emodel.exit_buffers()
                recorder = _Recorder(reference_gm, set(exits))
                recorder.run(*args)
                for name, buffer in exits.items():
                    if name in recorder.values:
                        result.layers.append(_error(i, name, buffer, recorder.values[name]))
    return result
