"""Streams over Ray actors, each owning a :class:`evtrace.serving.StreamPool` (issue 16).

``pip install 'evtrace[ray]'``. Ray does the processes, the transport and the ordering; this
module only routes:

* :class:`RayStreamClient` starts ``actors`` Ray actors; each builds a ``StreamPool`` of
  ``capacity`` slots from the same model (put once in the object store). ``open(stream_id)``
  places a stream on the least loaded live actor and it stays there (sticky: its state lives
  on that actor). ``submit(stream_id, frame)`` returns a :class:`StreamFuture`;
  ``submit_many({id: frame})`` sends one ``tick`` per actor (one batched forward for all of that
  actor's streams in it). Calls from one client to one actor run in submission order (Ray's
  guarantee for a sequential actor), so each stream's frames are processed in order.
* An actor that dies (``ray.kill``, a crash) loses only its streams. The next ``result()``
  that meets the death re-opens each of its streams on another live actor (a new one when none
  is left) and resubmits, in order, the frames whose results were lost: the first is computed
  densely there, and its :class:`FrameResult` has ``restarted=True``. A result is never taken
  from a half-updated state.
* :func:`process_archive`: a list of video files, each one stream, decoded frame by frame in
  lockstep, submitted with ``submit_many`` (decoding of the next frames overlaps the actors'
  work), per-frame outputs written to ``out_dir/<index>_<stem>.pt``. Files beyond the total
  capacity wait in a queue and open as others finish.

The client is for one thread (a lock serialises its calls).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evtrace.graph.errors import InputMismatchError, NonFiniteInputError, NonFiniteStateError
from evtrace.serving import ClosedStreamError, PoolFullError, StreamPool, UnknownStreamError

__all__ = ["RayStreamClient", "StreamFuture", "FrameResult", "process_archive", "require_ray"]


def require_ray():
    """The ``ray`` module, or an ImportError of one line naming the extra."""
    try:
        import ray
    except ImportError:
        raise ImportError("evtrace.tools.ray_serving needs Ray: pip install 'evtrace[ray]'") from None
    return ray


class PoolActor:
    """The body of a Ray actor: one StreamPool (``ray.remote`` is applied by the client)."""

    def __init__(self, model, example, capacity: int, policy, threads: int, options: dict):
        torch.set_num_threads(threads)
        self.pool = StreamPool(model, example, capacity, policy, **options)

    def open(self, stream_id, policy=None) -> int:
        return self.pool.open(stream_id, policy)

    def close(self, stream_id) -> None:
        self.pool.close(stream_id)

    def tick(self, frames: dict) -> dict:
        """{id: (output, dense, error message or None)}: a stream whose frame overflowed inside
        the model was reset alone (NonFiniteStateError); the others keep their outputs."""
        try:
            with torch.no_grad():
                out = self.pool.tick(frames)
        except NonFiniteStateError as error:
            failed = {sid: (None, True, str(error)) for sid in error.stream_ids}
            return failed | {
                sid: (y, self.pool.info(sid).last_dense, None) for sid, y in error.outputs.items()
            }
        return {sid: (y, self.pool.info(sid).last_dense, None) for sid, y in out.items()}

    def pid(self) -> int:
        import os

        return os.getpid()


@dataclass
class FrameResult:
    """One frame's output. ``restarted``: the stream's actor died and this frame was computed
    densely on another actor (a new start of the stream at this frame). ``dense``: computed
    densely for any reason (first frame, refresh, scene cut, restart)."""

    stream_id: Any
    index: int
    output: Any
    actor: int
    restarted: bool = False
    dense: bool = False


@dataclass
class _Entry:
    stream_id: Any
    index: int
    frame: torch.Tensor
    ref: Any
    actor: int
    restarted: bool = False
    result: FrameResult | None = None


@dataclass
class _Stream:
    actor: int
    policy: Any
    frames: int = 0
    inflight: collections.deque = field(default_factory=collections.deque)
    restarts: int = 0
    restart_next: bool = False  # moved after its actor died with no frame lost: flag the next one


class StreamFuture:
    """The pending output of one submitted frame; ``result()`` returns a :class:`FrameResult`."""

    def __init__(self, client: RayStreamClient, entry: _Entry):
        self._client, self._entry = client, entry

    def result(self, timeout: float | None = None) -> FrameResult:
        return self._client._result(self._entry, timeout)

    def done(self) -> bool:
        ray = require_ray()
        if self._entry.result is not None:
            return True
        ready, _ = ray.wait([self._entry.ref], timeout=0)
        return bool(ready)


class RayStreamClient:
    """Streams over ``actors`` Ray actors, each a ``StreamPool`` of ``capacity`` slots.

    ``ray.init`` must have been called (or Ray starts a local instance on the first actor).
    Args: ``model`` and ``example`` as for ``StreamPool`` (one stream's frame), ``policy``
    the pool default, ``threads`` torch threads per actor, ``num_cpus`` Ray CPUs reserved per
    actor, ``timeout_s`` the bound on the control calls (building the pools, open, close;
    ``ray.exceptions.GetTimeoutError`` past it), ``**options`` StreamPool / transform options.
    """

    def __init__(
        self,
        model,
        example: torch.Tensor,
        actors: int = 2,
        capacity: int = 4,
        policy=None,
        *,
        threads: int = 1,
        num_cpus: float = 1,
        timeout_s: float | None = 300,
        **options,
    ):
        ray = require_ray()
        if isinstance(actors, bool) or not isinstance(actors, int) or actors < 1:
            raise ValueError(f"actors must be an int >= 1, got {actors!r}")
        self._ray = ray
        self._lock = threading.RLock()
        self.frame_shape = tuple((example if example.shape[0] == 1 else example.unsqueeze(0)).shape)
        self.dtype = example.dtype
        self.capacity = capacity
        self.target_actors = actors
        self.timeout_s = timeout_s
        self._args = (ray.put(model), example, capacity, policy, threads, options)
        self._remote = ray.remote(PoolActor).options(num_cpus=num_cpus, max_restarts=0, max_task_retries=0)
        self.actors: list = []
        self._alive: list[bool] = []
        self._load: list[int] = []
        for _ in range(actors):
            self._start_actor()
        ray.get([a.pid.remote() for a in self.actors], timeout=timeout_s)  # every pool built
        self._streams: dict[Any, _Stream] = {}
        self._closed: set = set()

    # -- actors --------------------------------------------------------------------------------
    def _start_actor(self) -> int:
        self.actors.append(self._remote.remote(*self._args))
        self._alive.append(True)
        self._load.append(0)
        return len(self.actors) - 1

    def _pick_actor(self) -> int:
        live = [i for i, ok in enumerate(self._alive) if ok and self._load[i] < self.capacity]
        if not live:
            if sum(self._alive) < self.target_actors:
                return self._start_actor()  # a replacement for an actor that died
            raise PoolFullError(
                f"every live actor holds {self.capacity} streams; close one or start the client with "
                "more actors or a larger capacity"
            )
        return min(live, key=lambda i: (self._load[i], i))

    def actor_of(self, stream_id) -> int:
        return self._stream(stream_id).actor

    @property
    def live_actors(self) -> list[int]:
        return [i for i, ok in enumerate(self._alive) if ok]

    # -- streams -------------------------------------------------------------------------------
    def _stream(self, stream_id) -> _Stream:
        if stream_id in self._streams:
            return self._streams[stream_id]
        if stream_id in self._closed:
            raise ClosedStreamError(f"stream {stream_id!r} was closed; open({stream_id!r}) starts it anew")
        raise UnknownStreamError(f"unknown stream {stream_id!r}: open it first")

    def open(self, stream_id, policy=None) -> int:
        """Place a new stream on the least loaded live actor (returns the actor's index)."""
        with self._lock:
            if stream_id in self._streams:
                raise ValueError(f"stream {stream_id!r} is already open")
            actor = self._pick_actor()
            self._ray.get(self.actors[actor].open.remote(stream_id, policy), timeout=self.timeout_s)
            self._load[actor] += 1
            self._streams[stream_id] = _Stream(actor, policy)
            self._closed.discard(stream_id)
            return actor

    def close(self, stream_id) -> None:
        """Wait for the stream's pending frames, then free its slot."""
        with self._lock:
            stream = self._stream(stream_id)
            for entry in list(stream.inflight):
                self._result(entry, None)
            if self._alive[stream.actor]:
                try:
                    self._ray.get(self.actors[stream.actor].close.remote(stream_id), timeout=self.timeout_s)
                except self._ray.exceptions.RayActorError:
                    self._dead(stream.actor)
            self._load[stream.actor] -= 1
            del self._streams[stream_id]
            self._closed.add(stream_id)

    def _check(self, stream_id, frame) -> torch.Tensor:
        if not isinstance(frame, torch.Tensor):
            raise TypeError(f"stream {stream_id!r}: a frame must be a tensor, got {type(frame).__name__}")
        x = frame if frame.dim() == len(self.frame_shape) else frame.unsqueeze(0)
        if tuple(x.shape) != self.frame_shape or x.dtype != self.dtype:
            raise InputMismatchError(
                f"stream {stream_id!r}: frame {tuple(frame.shape)} {frame.dtype}, the pools serve "
                f"{self.frame_shape} {self.dtype}; nothing was sent"
            )
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise NonFiniteInputError(
                f"stream {stream_id!r}: the frame holds NaN or Inf values; nothing was sent"
            )
        return x

    def submit(self, stream_id, frame) -> StreamFuture:
        """One frame of one stream -> a future (its own tick on the stream's actor)."""
        return self.submit_many({stream_id: frame})[stream_id]

    def submit_many(self, frames: dict) -> dict:
        """Frames of several streams -> {id: future}; one batched tick per actor."""
        with self._lock:
            checked = {sid: (self._stream(sid), self._check(sid, f)) for sid, f in frames.items()}
            by_actor: dict[int, list] = collections.defaultdict(list)
            for sid, (stream, _) in checked.items():
                by_actor[stream.actor].append(sid)
            futures = {}
            for actor, sids in by_actor.items():
                ref = self.actors[actor].tick.remote({sid: checked[sid][1] for sid in sids})
                for sid in sids:
                    stream = checked[sid][0]
                    entry = _Entry(sid, stream.frames, checked[sid][1], ref, actor, stream.restart_next)
                    stream.restart_next = False
                    stream.frames += 1
                    stream.inflight.append(entry)
                    futures[sid] = StreamFuture(self, entry)
            return futures

    # -- results and failover ------------------------------------------------------------------------
    def _result(self, entry: _Entry, timeout: float | None) -> FrameResult:
        ray = self._ray
        with self._lock:
            while entry.result is None:
                try:
                    out, dense, failure = ray.get(entry.ref, timeout=timeout)[entry.stream_id]
                except ray.exceptions.RayActorError:
                    self._dead(entry.actor)
                    continue
                except BaseException:
                    self._forget(entry)  # e.g. a timeout: the frame stays submitted, its future raised
                    raise
                self._forget(entry)
                if failure is not None:
                    raise NonFiniteStateError(failure, streams=[entry.stream_id])
                entry.result = FrameResult(
                    entry.stream_id, entry.index, out, entry.actor, entry.restarted, dense or entry.restarted
                )
            return entry.result

    def _forget(self, entry: _Entry) -> None:
        stream = self._streams.get(entry.stream_id)
        if stream is not None and entry in stream.inflight:
            stream.inflight.remove(entry)

    def _dead(self, actor: int) -> None:
        """Actor ``actor`` died: each of its streams reopens on another actor, and the frames whose
        results were lost are resubmitted there in order (the first one dense, flagged)."""
        ray = self._ray
        if not self._alive[actor]:
            return
        self._alive[actor] = False
        self._load[actor] = 0
        try:  # dead, or unreachable: never let it serve these streams again
            ray.kill(self.actors[actor])
        except Exception:
            pass
        moved = [(sid, s) for sid, s in self._streams.items() if s.actor == actor]
        for sid, stream in moved:
            lost = []
            for entry in stream.inflight:
                if entry.result is not None or entry.actor != actor:
                    continue
                if not lost:
                    try:  # finished before the death: its result is safe in the object store
                        ray.get(entry.ref, timeout=0)
                        continue
                    except Exception:
                        pass
                lost.append(entry)
            target = self._pick_actor()
            ray.get(self.actors[target].open.remote(sid, stream.policy), timeout=self.timeout_s)
            self._load[target] += 1
            stream.actor = target
            stream.restarts += 1
            for i, entry in enumerate(lost):
                entry.ref = self.actors[target].tick.remote({sid: entry.frame})
                entry.actor = target
                entry.restarted = entry.restarted or i == 0
            stream.restart_next = not lost

    def restarts(self, stream_id) -> int:
        """How many times the stream moved to another actor after its actor died."""
        return self._stream(stream_id).restarts

    def shutdown(self) -> None:
        """Kill the client's actors (the Ray cluster stays up)."""
        for actor, alive in zip(self.actors, self._alive):
            if alive:
                self._ray.kill(actor)
        self._alive = [False] * len(self.actors)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


@dataclass
class ArchiveResult:
    path: str
    out: str
    frames: int
    restarted: list[int]


def process_archive(
    model,
    paths: list,
    out_dir,
    *,
    size: int = 224,
    patch_size: int = 16,
    max_frames: int | None = None,
    actors: int = 2,
    capacity: int = 4,
    policy=None,
    client: RayStreamClient | None = None,
    **options,
) -> list[ArchiveResult]:
    """Each file one stream, processed in parallel over Ray actors, frames in order.

    Writes ``out_dir/<i>_<stem>.pt``: ``{"path", "outputs" (a list of per-frame outputs),
    "restarted" (frame indices recomputed densely after an actor died)}``. Returns one
    :class:`ArchiveResult` per file, in the order of ``paths``.
    """
    from evtrace.tools.video import frames as decode

    require_ray()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in paths]
    readers = [decode(p, size=size, patch_size=patch_size, max_frames=max_frames) for p in paths]
    own = client is None
    if own:
        first = next(decode(paths[0], size=size, patch_size=patch_size, max_frames=1))
        client = RayStreamClient(model, first, actors=actors, capacity=capacity, policy=policy, **options)
    queue = collections.deque(range(len(paths)))
    live: dict[int, Any] = {}
    outputs: dict[int, list] = {i: [] for i in range(len(paths))}
    restarted: dict[int, list] = {i: [] for i in range(len(paths))}
    pending: list[tuple[int, StreamFuture]] = []
    slots = capacity * len(client.live_actors)

    def collect(batch):
        for i, future in batch:
            result = future.result()
            outputs[i].append(result.output)
            if result.restarted:
                restarted[i].append(result.index)

    try:
        while queue or live:
            while queue and len(live) < slots:
                i = queue.popleft()
                client.open(("archive", i))
                live[i] = readers[i]
            step = {}
            for i in list(live):
                frame = next(live[i], None)
                if frame is None:
                    del live[i]
                    collect([p for p in pending if p[0] == i])
                    pending = [p for p in pending if p[0] != i]
                    client.close(("archive", i))
                else:
                    step[i] = frame
            if not step:
                continue
            futures = client.submit_many({("archive", i): f for i, f in step.items()})
            collect(pending)  # the previous step's results, while this one runs
            pending = [(i, futures[("archive", i)]) for i in step]
        collect(pending)
    finally:
        if own:
            client.shutdown()
    results = []
    for i, path in enumerate(paths):
        out = out_dir / f"{i}_{Path(path).stem}.pt"
        torch.save({"path": path, "outputs": outputs[i], "restarted": restarted[i]}, out)
        results.append(ArchiveResult(path, str(out), len(outputs[i]), restarted[i]))
    return results
