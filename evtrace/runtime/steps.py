"""Time steps inside one call as the stream: run a per-step sub-model over them in order.

A factorised video model folds T' time steps of B views into B * T' rows. ``StepLoop`` takes
those folded tensors, runs its eventful ``step`` module on time step 0, 1, ..., T' - 1 (B rows
each, state carried from step to step, so that each step recomputes only the tokens that
changed since the previous one) and folds the outputs back into B * T' rows in the same order.
Each call starts afresh (step 0 is computed densely) unless ``carry`` is set (sliding clips:
step 0 of a call continues from the last step of the previous call). With a scene-cut detector,
a time step whose input is a cut from the previous step restarts that view: the step is
computed densely (eager mode; under torch.compile and export the detector does not run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from evtrace.runtime.attention import ExactDeltaAttention, PaperDeltaAttention
from evtrace.runtime.gates import SparseRegion
from evtrace.runtime.policies import StatefulPolicy
from evtrace.runtime.scene_cut import SceneCutDetector

ORDERS = ("view-major", "step-major")


def stateful_modules(module: nn.Module) -> list[nn.Module]:
    """The gates' regions and delta attention modules inside ``module``."""
    return [
        m for m in module.modules() if isinstance(m, (SparseRegion, ExactDeltaAttention, PaperDeltaAttention))
    ]


class StepLoop(nn.Module):
    """Runs ``step`` over the time steps of folded (B * T', ...) inputs; see the module docstring.

    Args:
        step: the eventful per-step module: one time step of each folded input, (B, ...) each,
            to a tuple with one time step of each output.
        steps: T'.
        views: B, the views (independent streams) per call.
        order: ``"view-major"`` (row ``b * T' + t``) or ``"step-major"`` (row ``t * B + b``).
        row_dims: per output, the dim that holds its B * T' rows.
        carry: keep the state across calls (sliding clips) instead of starting each call afresh.
        scene_cut: a detector run on the first input of every time step (the frames, or the
            tokens of a tubelet embedding); a view whose step is a cut restarts at that step.
            ``last_cuts`` lists the (step, view) pairs of the last call, ``cuts`` counts them all.
    """

    def __init__(
        self,
        step: nn.Module,
        steps: int,
        views: int,
        order: str,
        row_dims: tuple[int, ...],
        carry: bool,
        scene_cut: SceneCutDetector | None = None,
    ):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.step = step
        self.steps = int(steps)
        self.views = int(views)
        self.order = order
        self.row_dims = tuple(int(d) for d in row_dims)
        self.carry = bool(carry)
        self.fresh = True
        self.scene_cut = scene_cut
        self.last_cuts: list[tuple[int, int]] = []
        self.cuts = 0

    def reset(self) -> None:
        """The next call starts afresh (step 0 dense), also when carrying state."""
        self.fresh = True

    def _restart(self, views: list[int] | None = None) -> None:
        """Restart every view (``None``) or only ``views``: their next step is dense."""
        for module in stateful_modules(self.step):
            if views is None:
                module.reset()
            else:
                for view in views:
                    module.reset_stream(view)
            policy = getattr(getattr(module, "gate", None), "policy", None)
            if isinstance(policy, StatefulPolicy):
                policy.reset_state() if views is None else policy.reset_state(views, self.views)

    def _cut_views(self, step_input: torch.Tensor) -> list[int]:
        cut = self.scene_cut.update(step_input)
        return cut.nonzero().flatten().tolist() if bool(cut.any()) else []  # one host sync per step

    def _slice(self, folded: torch.Tensor, t: int) -> torch.Tensor:
        if self.order == "view-major":
            return folded.unflatten(0, (self.views, self.steps))[:, t]
        return folded.unflatten(0, (self.steps, self.views))[t]

    def _fold(self, per_step: list[torch.Tensor], dim: int) -> torch.Tensor:
        if self.order == "view-major":
            return torch.stack(per_step, dim=dim + 1).flatten(dim, dim + 1)
        return torch.stack(per_step, dim=dim).flatten(dim, dim + 1)

    def forward(self, *folded: torch.Tensor, runner: Callable | None = None) -> tuple[torch.Tensor, ...]:
        """Folded inputs -> folded outputs (a tuple); ``runner(step, *inputs)`` replaces the plain
        call of ``step`` (FLOP counting runs it under its interpreter)."""
        rows = self.views * self.steps
        for index, tensor in enumerate(folded):
            if tensor.shape[0] != rows:
                raise ValueError(
                    f"time-step input {index} has {tensor.shape[0]} rows; this eventful model was built for "
                    f"{self.views} view(s) x {self.steps} time steps = {rows}: give clips of the length and "
                    "batch it was transformed with"
                )
        restart = self.fresh or not self.carry
        if restart:
            self._restart()
            if self.scene_cut is not None:
                self.scene_cut.reset()
        self.fresh = False
        detect = (
            self.scene_cut is not None
            and runner is None
            and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())
        )
        self.last_cuts = []
        outputs: list[list[torch.Tensor]] = [[] for _ in self.row_dims]
        for t in range(self.steps):
            inputs = [self._slice(tensor, t) for tensor in folded]
            if detect:
                views = self._cut_views(inputs[0])
                if views and (t > 0 or not restart):  # a restarted step 0 is dense already
                    self._restart(views)
                    self.last_cuts += [(t, v) for v in views]
                    self.cuts += len(views)
            result = runner(self.step, *inputs) if runner is not None else self.step(*inputs)
            for store, value in zip(outputs, result):
                store.append(value)
        return tuple(self._fold(per_step, dim) for per_step, dim in zip(outputs, self.row_dims))

    def extra_repr(self) -> str:
        return f"steps={self.steps}, views={self.views}, order={self.order!r}, carry={self.carry}"
