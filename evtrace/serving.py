"""Many streams on one eventful model: :class:`StreamPool`.

A pool transforms the model once for a batch of ``capacity`` streams and keeps each stream in
a *slot* (one batch row of every state tensor). ``tick({stream_id: frame})`` runs one batched
forward for any subset of the open streams and returns each one's output, equal (to float
rounding) to that stream run alone through its own ``evtrace.transform``.

How the rows stay independent:

* a new stream (``open``) restarts its slot with ``reset(stream=slot)`` at its first frame, so
  that frame is dense for it and the others continue bit for bit;
* an *idle* slot (open, no frame this tick; or free) is fed its last frame; the batch has
  static shapes, so its rows are computed anyway. ``idle="mask"`` (default): its gates select
  nothing (every slot of its index row masked, as a batched ``Threshold`` pads): references
  stay as they are and the exit-buffer rows are recomputed from them, equal to float
  rounding. ``idle="restore"``: its state rows are copied aside before the forward and
  written back after it, bit-exact, at the cost of copying its state (``bench/streams.py``
  measures both). Without either a repeated frame would update the tokens its gate still
  found stale and the stream would drift from its single run;
* refresh (``refresh_every``) and scene-cut detection run per stream in the pool (the model's
  own, batch-wide ones are off): a stream refreshes on its own frame count and its detector
  sees only its own frames;
* per-stream policies: when open streams hold different policies the gates get one
  :class:`StreamPolicies` policy that lets each batch row select with its stream's policy
  (rows that select fewer tokens than the largest pad with masked slots, which change
  nothing, as a batched ``Threshold`` does). Stateful policies (``AdaptiveBudget``,
  ``Staleness``) keep per-row state that an idle tick would advance: the pool refuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from evtrace.eventful import EventfulModel, all_finite, transform
from evtrace.graph.errors import EvtraceError, InputMismatchError, NonFiniteInputError, NonFiniteStateError
from evtrace.runtime.policies import (
    Policy,
    Selection,
    StatefulPolicy,
    TopFraction,
    as_policy,
    check_budget,
)
from evtrace.runtime.scene_cut import SceneCutDetector, detector_from_option

__all__ = [
    "StreamPool",
    "StreamPolicies",
    "StreamInfo",
    "StreamError",
    "UnknownStreamError",
    "ClosedStreamError",
    "PoolFullError",
]


class StreamError(EvtraceError, KeyError):
    """A stream id the pool cannot serve (base class)."""

    def __str__(self) -> str:  # KeyError's str() quotes the message
        return str(self.args[0]) if self.args else ""


class UnknownStreamError(StreamError):
    """The stream id was never opened in this pool."""


class ClosedStreamError(StreamError):
    """The stream was closed; open it again to start a new stream under that id."""


class PoolFullError(EvtraceError, RuntimeError):
    """Every slot holds an open stream."""


class StreamPolicies(Policy):
    """One policy per batch row: row b selects with ``rows[b]`` on its own errors; rows in
    ``idle`` select nothing.

    Rows sharing a policy object select together (one call). R (the index width) is the
    largest count over the rows; a row that selects fewer tokens takes its next-largest ones
    as padding, masked out, as a batched ``Threshold`` does: the gate feeds a masked slot from
    its reference, so the reference does not change and the exit buffer row is recomputed from
    the same values (equal to float rounding).
    """

    def __init__(self, rows: list[Policy], idle: Tensor | None = None):
        if not rows:
            raise ValueError("StreamPolicies needs at least one row policy")
        self.rows = [as_policy(p) for p in rows]
        self.idle = idle  # (B,) bool or None

    @property
    def data_dependent(self) -> bool:  # type: ignore[override]
        return any(p.data_dependent for p in self.rows)

    @property
    def relative(self) -> bool:
        """True when a row's policy compares error / reference norm: the gate then computes the
        reference norms (every row gets them; the absolute rows ignore them)."""
        return any(getattr(p, "relative", False) for p in self.rows)

    def tokens_per_frame(self, n: int) -> int | None:
        counts = [p.tokens_per_frame(n) for p in self.rows]
        return None if any(c is None for c in counts) else max(counts)

    def select(self, error, reference_norm=None, forced=None) -> Selection:
        b, n = error.shape
        if b != len(self.rows):
            raise ValueError(f"StreamPolicies has {len(self.rows)} row policies, the batch has {b} rows")
        groups: dict[int, list[int]] = {}
        for i, policy in enumerate(self.rows):
            groups.setdefault(id(policy), []).append(i)
        idle = self.idle
        if len(groups) == 1:  # one policy for every row: one call, the idle rows masked out
            s = self.rows[0].select(error, reference_norm, forced)
            if idle is None:
                return s
            keep = (~idle)[:, None].expand(b, s.index.shape[1])
            return Selection(s.index, keep if s.mask is None else s.mask & keep)
        chosen = torch.zeros(b, n, dtype=torch.bool, device=error.device)
        width = 0
        for rows in groups.values():
            index = torch.tensor(rows, dtype=torch.long, device=error.device)
            ref = None if reference_norm is None else reference_norm.index_select(0, index)
            s = self.rows[rows[0]].select(error.index_select(0, index), ref, forced)
            width = max(width, s.index.shape[1])
            hit = torch.zeros(len(rows), n, dtype=torch.bool, device=error.device)
            hit.scatter_(1, s.index, True if s.mask is None else s.mask)
            chosen[index] = hit
        if idle is not None:
            chosen &= ~idle[:, None]
        score = torch.where(chosen, torch.full_like(error, math.inf), error)
        _, index = torch.topk(score, width, dim=1, largest=True, sorted=False)
        return Selection(index, chosen.gather(1, index))

    def __repr__(self) -> str:
        return f"StreamPolicies({self.rows!r})"


@dataclass
class StreamInfo:
    """Per-stream counters: frames served, refreshes (``refresh_every``), scene cuts, and
    whether the last frame was computed densely (first frame, refresh or cut)."""

    stream_id: Any
    slot: int
    policy: Policy | None
    frames: int = 0
    refreshes: int = 0
    scene_cuts: int = 0
    last_dense: bool = False
    _since_refresh: int = 0
    _pending_reset: bool = True
    _detector: SceneCutDetector | None = field(default=None, repr=False)


class StreamPool:
    """One eventful model serving up to ``capacity`` streams, one batched forward per tick.

    Args:
        model: the original model (eval mode).
        example: one stream's frame, ``(1, C, H, W)`` (or ``(C, H, W)``): the frame size of
            every stream of the pool.
        capacity: the number of slots (the batch the model is transformed with).
        policy: the default policy of the streams (a Policy or an int r); ``open`` may give a
            stream its own.
        refresh_every: per stream, a dense frame every K frames of that stream.
        scene_cut: per stream, as ``transform(scene_cut=...)``: True, a factor, a
            ``SceneCutDetector`` (copied per stream) or None/False.
        idle: what the slots without a frame do (the batch has static shapes: their rows are
            computed anyway; they are fed their last frame). ``"mask"`` (default): their gates
            select nothing (masked slots: references unchanged, buffer rows recomputed from the
            same values, equal to float rounding). ``"restore"``: they run as usual and their
            state rows are copied aside before the forward and written back after it
            (bit-exact; costs a copy of their state). ``"none"``: neither (a repeated frame
            updates the tokens its gate finds stale: not equal to the stream run alone;
            for measurements only).
        **options: the other ``evtrace.transform`` options (``attention``, ``repair_rows``,
            ``always_update_prefix``, ``check_inputs`` ...).

    ``tick({id: frame})`` -> ``{id: output}``, each output that stream's (batch 1). A bad tick
    (unknown or closed id, wrong size or dtype, NaN) raises before anything runs: no stream
    changes. A finite frame that overflows inside the model resets that stream alone and
    raises :class:`NonFiniteStateError` with ``.outputs`` holding the other streams' results.
    """

    def __init__(
        self,
        model: nn.Module,
        example,
        capacity: int,
        policy=None,
        *,
        refresh_every: int | None = None,
        scene_cut: float | bool | SceneCutDetector | None = True,
        idle: str = "mask",
        **options,
    ):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if refresh_every is not None and (
            isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1
        ):
            raise ValueError(f"refresh_every must be an int >= 1 or None, got {refresh_every!r}")
        for name in ("on_input_change",):
            if name in options:
                raise TypeError(f"StreamPool fixes {name}: a pool has one frame size")
        if not isinstance(example, Tensor):
            raise TypeError(f"example must be one stream's frame as a tensor, got {type(example).__name__}")
        frame = example if example.dim() >= 2 and example.shape[0] == 1 else example.unsqueeze(0)
        self.capacity = capacity
        self.frame_shape = tuple(frame.shape[1:])
        self.dtype = frame.dtype
        self.device = frame.device
        default = as_policy(policy) if policy is not None else TopFraction(0.5)
        self.default_policy = self._check_policy(default)
        self.refresh_every = refresh_every
        self._scene_cut = scene_cut
        if idle not in ("mask", "restore", "none"):
            raise ValueError(f"idle must be 'mask', 'restore' or 'none', got {idle!r}")
        self.idle = idle
        batch = frame.expand(capacity, *self.frame_shape).contiguous()
        self.model: EventfulModel = transform(
            model,
            batch,
            policy=self.default_policy,
            scene_cut=None,
            refresh_every=None,
            on_input_change="raise",
            **options,
        )
        self._streams: dict[Any, StreamInfo] = {}
        self._closed: set = set()
        self._free = list(range(capacity))
        self._last: list[Tensor] = [frame[0].clone() for _ in range(capacity)]
        self._row_policies: list[Policy | None] = [None] * capacity
        self._policy_in_force: Policy = self.default_policy
        self._wrapper = StreamPolicies([self.default_policy] * capacity)
        self.ticks = 0

    # -- streams ---------------------------------------------------------------------------------
    def _check_policy(self, policy: Policy) -> Policy:
        if isinstance(policy, StatefulPolicy):
            raise TypeError(
                f"{policy!r}: stateful policies (AdaptiveBudget, SteeredThreshold, GateAllocation, "
                "Staleness) are not supported in a StreamPool (their per-row state would advance on idle "
                "ticks); use TopK, TopFraction, Threshold or FixedCapacityThreshold"
            )
        if hasattr(self, "model"):
            for name, region in self.model.regions().items():
                check_budget(policy, region.gate.tokens, name)
        return policy

    def open(self, stream_id, policy=None) -> int:
        """Start a stream in a free slot (returns the slot). Its first frame is dense; the other
        streams are not touched. ``policy``: this stream's own (default: the pool's).

        Raises PoolFullError when every slot is taken, ValueError for an id already open."""
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id!r} is already open (slot {self._streams[stream_id].slot})")
        if policy is not None:
            policy = self._check_policy(as_policy(policy))
        if not self._free:
            raise PoolFullError(
                f"all {self.capacity} slots hold open streams ({len(self._streams)}); close one first or "
                f"build a pool with a larger capacity (stream {stream_id!r} was not opened)"
            )
        slot = self._free.pop(0)
        detector = detector_from_option(self._scene_cut)
        self._streams[stream_id] = StreamInfo(stream_id, slot, policy, _detector=detector)
        self._closed.discard(stream_id)
        self._row_policies[slot] = policy
        self._apply_policies()
        return slot

    def close(self, stream_id) -> None:
        """End a stream: its slot is free for the next ``open``. The others are not touched."""
        info = self._info(stream_id)
        del self._streams[stream_id]
        self._closed.add(stream_id)
        self._row_policies[info.slot] = None
        self._free.append(info.slot)
        self._free.sort()
        self._apply_policies()

    def set_policy(self, stream_id, policy) -> None:
        """Change one stream's policy between ticks (no reset); None: back to the pool's."""
        info = self._info(stream_id)
        policy = None if policy is None else self._check_policy(as_policy(policy))
        info.policy = policy
        self._row_policies[info.slot] = policy
        self._apply_policies()

    def _apply_policies(self, idle: list[int] | None = None) -> None:
        """The gates' policy: the pool's own when every row uses it and no row is masked;
        otherwise the one StreamPolicies instance, updated in place."""
        rows = [p if p is not None else self.default_policy for p in self._row_policies]
        mask = None
        if idle:
            mask = torch.zeros(self.capacity, dtype=torch.bool, device=self.device)
            mask[idle] = True
        wanted: Policy
        if mask is None and all(p is self.default_policy for p in rows):
            wanted = self.default_policy
        else:
            wanted = self._wrapper
            wanted.rows, wanted.idle = rows, mask
        if wanted is not self._policy_in_force:
            self.model.set_policy(wanted)
            self._policy_in_force = wanted

    def _info(self, stream_id) -> StreamInfo:
        try:
            return self._streams[stream_id]
        except (KeyError, TypeError):
            pass
        if stream_id in self._closed:
            raise ClosedStreamError(
                f"stream {stream_id!r} was closed; open({stream_id!r}) starts a new stream under that id"
            )
        raise UnknownStreamError(
            f"unknown stream {stream_id!r}: open it first (open streams: {list(self._streams)[:8]})"
        )

    @property
    def streams(self) -> list:
        """The open stream ids."""
        return list(self._streams)

    def info(self, stream_id) -> StreamInfo:
        return self._info(stream_id)

    def __len__(self) -> int:
        return len(self._streams)

    def state_bytes_per_stream(self) -> int:
        return self.model.state_bytes() // self.capacity

    # -- the tick --------------------------------------------------------------------------------
    def _check_frame(self, stream_id, frame) -> Tensor:
        if not isinstance(frame, Tensor):
            raise TypeError(f"stream {stream_id!r}: a frame must be a tensor, got {type(frame).__name__}")
        x = frame[0] if frame.dim() == len(self.frame_shape) + 1 and frame.shape[0] == 1 else frame
        if tuple(x.shape) != self.frame_shape:
            raise InputMismatchError(
                f"stream {stream_id!r}: frame of shape {tuple(frame.shape)}, the pool serves frames of "
                f"(1, {', '.join(map(str, self.frame_shape))}); nothing ran, no stream changed"
            )
        if x.dtype != self.dtype:
            raise InputMismatchError(
                f"stream {stream_id!r}: frame dtype {x.dtype}, the pool serves {self.dtype}; nothing ran, "
                "no stream changed"
            )
        if x.is_floating_point() and not all_finite(x):
            raise NonFiniteInputError(
                f"stream {stream_id!r}: the frame holds NaN or Inf values; nothing ran, no stream changed"
            )
        return x.to(self.device)

    def tick(self, frames: dict) -> dict:
        """One batched forward for the streams in ``frames`` ({id: frame}); {id: output}."""
        if not isinstance(frames, dict):
            raise TypeError(f"tick takes a dict {{stream_id: frame}}, got {type(frames).__name__}")
        checked = {sid: (self._info(sid), self._check_frame(sid, f)) for sid, f in frames.items()}
        if not checked:
            return {}
        active = {info.slot for info, _ in checked.values()}
        model = self.model
        for info, x in checked.values():  # per-stream refresh and scene cut, before the forward
            dense = info._pending_reset
            if not dense and self.refresh_every is not None and info._since_refresh >= self.refresh_every:
                dense = True
                info.refreshes += 1
            if info._detector is not None:
                cut = bool(info._detector.update(x.unsqueeze(0))[0])
                if cut and not dense:
                    dense = True
                    info.scene_cuts += 1
            if dense:
                model.reset(stream=info.slot)
                info._pending_reset = False
                info._since_refresh = 0
            info.last_dense = dense
        previous = {info.slot: self._last[info.slot] for info, _ in checked.values()}
        for info, x in checked.values():
            self._last[info.slot] = x
        idle = [i.slot for i in self._streams.values() if i.slot not in active and not i._pending_reset]
        saved = self._save(idle) if self.idle == "restore" and idle else None
        if self.idle == "mask":
            self._apply_policies([slot for slot in range(self.capacity) if slot not in active])
        batch = torch.stack(self._last)
        try:
            out = model(batch)
        except NonFiniteStateError as error:
            self._restore(saved, idle)
            bad = set(error.streams or [])
            outputs, failed = {}, []
            for sid, (info, _) in checked.items():
                if info.slot in bad:  # restarts as a new stream: dense, a fresh detector
                    failed.append(sid)
                    info._pending_reset = True
                    info._detector = detector_from_option(self._scene_cut)
                    self._last[info.slot] = previous[info.slot]  # never fed again as an idle frame
                else:
                    outputs[sid] = self._take(error.output, info.slot)
                    self._count(info)
            error.outputs = outputs
            error.stream_ids = failed
            error.args = (f"streams {failed} were reset (their next frame is dense): {error.args[0]}",)
            self.ticks += 1
            raise
        except BaseException:
            for info in self._streams.values():  # the model reset every stream
                info._pending_reset = True
                info._detector = detector_from_option(self._scene_cut)
            raise
        self._restore(saved, idle)
        self.ticks += 1
        result = {}
        for sid, (info, _) in checked.items():
            result[sid] = self._take(out, info.slot)
            self._count(info)
        return result

    @staticmethod
    def _count(info: StreamInfo) -> None:
        info.frames += 1
        info._since_refresh += 1

    def _take(self, out, slot: int):
        def pick(leaf):
            if isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == self.capacity:
                return leaf[slot : slot + 1].clone()
            return leaf

        return pytree.tree_map(pick, out)

    # -- idle slots: their state rows, aside and back ------------------------------------------------
    def _state_tensors(self):
        model = self.model
        for module in model._variant.stateful():
            rows_total = EventfulModel._module_batch(module)
            if rows_total is None:
                continue
            for owner in module.modules():
                for name, buffer in owner._buffers.items():
                    if buffer is not None and buffer.dim() >= 1 and buffer.shape[0] == rows_total:
                        yield module, owner, name, buffer

    def _save(self, slots: list[int]) -> list:
        saved = []
        for module, owner, name, buffer in self._state_tensors():
            rows = [r for s in slots for r in (self.model._rows_of(module, s) or [])]
            if rows:
                index = torch.tensor(rows, dtype=torch.long, device=buffer.device)
                saved.append((owner, name, index, buffer.shape, buffer.index_select(0, index)))
        return saved

    def _restore(self, saved, slots: list[int]) -> None:
        if not saved:
            return
        lost = False
        for owner, name, index, shape, rows in saved:
            buffer = owner._buffers.get(name)
            if buffer is None or buffer.shape != shape:
                lost = True  # reallocated by the frame: the idle streams restart (never a wrong output)
                continue
            if buffer.is_inference() and not torch.is_inference_mode_enabled():
                with torch.inference_mode():
                    buffer.index_copy_(0, index, rows)
            else:
                buffer.index_copy_(0, index, rows)
        if lost:
            for info in self._streams.values():
                if info.slot in slots:
                    info._pending_reset = True

    def __repr__(self) -> str:
        return (
            f"StreamPool(capacity={self.capacity}, open={len(self._streams)}, frame={self.frame_shape}, "
            f"policy={self.default_policy!r})"
        )
