"""Runtime modules inserted by the rewrite: token gates and sparse regions.

Math is kept in small functions with shapes in their docstrings; the modules only hold state.
Shapes: ``B`` streams, ``N`` tokens per stream, ``r`` tokens selected per stream, ``R`` rows of
a tensor (the product of its leading token dims, padding rows included), ``C`` channels per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from evtrace.runtime.policies import Policy, Selection


@dataclass(frozen=True)
class RowMap:
    """Where canonical token ``(b, t)`` sits in a tensor whose leading ``token_ndim`` dims are
    token rows and whose remaining dims are channels."""

    shape: tuple[int, ...]
    token_ndim: int
    batch: int
    tokens: int
    canonical: bool  # row b*N + t holds token (b, t): no position table needed

    @property
    def rows(self) -> int:
        n = 1
        for s in self.shape[: self.token_ndim]:
            n *= s
        return n

    @property
    def channel_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[self.token_ndim :])

    def gathered_shape(self, r: int) -> tuple[int, ...]:
        """Shape of r gathered tokens per stream: the rank is kept so that dim arguments of
        the replayed ops still point at the same dims."""
        if self.token_ndim >= 2:
            return (self.batch, r) + (1,) * (self.token_ndim - 2) + self.channel_shape
        return (self.batch * r,) + self.channel_shape


def position_table(row_ids: Tensor, offset: int, count: int) -> Tensor:
    """(R,) global token ids (0 = padding) -> (count,) row of each canonical token."""
    table = torch.full((count,), -1, dtype=torch.long)
    rows = torch.nonzero(row_ids > 0).flatten()
    table[(row_ids[rows] - offset - 1).long()] = rows
    return table


def flat_rows(index: Tensor, tokens: int, positions: Tensor | None) -> Tensor:
    """(B, r) per-stream token indices -> (B*r,) row numbers of a tensor."""
    batch = index.shape[0]
    flat = index + torch.arange(batch, device=index.device).unsqueeze(1) * tokens
    flat = flat.reshape(-1)
    return flat if positions is None else positions.index_select(0, flat)


def gather_rows(x: Tensor, rows: Tensor, row_map: RowMap, r: int) -> Tensor:
    """Rows ``rows`` of ``x`` in gathered form ``row_map.gathered_shape(r)``."""
    table = x.reshape(row_map.rows, -1)
    return table.index_select(0, rows).reshape(row_map.gathered_shape(r))


def scatter_rows(buffer: Tensor, rows: Tensor, values: Tensor, row_map: RowMap) -> None:
    """Write gathered ``values`` into rows ``rows`` of ``buffer`` in place."""
    table = buffer.view(row_map.rows, -1)
    # the channel count is explicit: a policy may select no row, and reshape(0, -1) is ambiguous
    table.index_copy_(0, rows, values.reshape(rows.numel(), table.shape[1]))


def token_norm(x: Tensor, row_map: RowMap, positions: Tensor | None) -> Tensor:
    """Per-token L2 norm over channels in canonical order: (B, N)."""
    k = row_map.token_ndim
    per_row = torch.linalg.vector_norm(x, dim=tuple(range(k, x.dim()))) if x.dim() > k else x.abs()
    per_row = per_row.reshape(row_map.rows)
    if positions is not None:
        per_row = per_row.index_select(0, positions)
    return per_row.reshape(row_map.batch, row_map.tokens)


def stream_rows(row_map: RowMap, positions: Tensor | None, streams: list[int], device) -> Tensor:
    """Row numbers of every token of the given streams: (len(streams) * N,)."""
    n = row_map.tokens
    ids = torch.cat([torch.arange(b * n, (b + 1) * n, device=device) for b in streams])
    return ids if positions is None else positions.index_select(0, ids)


def copy_stream_rows_(dst: Tensor, src: Tensor, rows: Tensor, row_map: RowMap) -> None:
    """In place ``dst[rows] = src[rows]`` on the (R, C) row tables of two full tensors."""
    table = dst.view(row_map.rows, -1)
    table.index_copy_(0, rows, src.reshape(row_map.rows, -1).index_select(0, rows))


def checksum_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def stream_checksum(x: Tensor, batch: int) -> Tensor:
    """(B,) per-stream sum of a batch-major tensor (``(B, ...)`` or gathered ``(B * r, ...)``).

    A sum is NaN or Inf when a value is (and, falsely, when finite values near the dtype's
    limit overflow it): one reduction pass, where ``isfinite`` takes three on CPU."""
    if x.dim() >= 2 and x.shape[0] == batch:
        return x.sum(dim=tuple(range(1, x.dim())), dtype=checksum_dtype(x))
    return x.reshape(batch, -1).sum(dim=1, dtype=checksum_dtype(x))


def stream_checksum_rows(x: Tensor, row_map: RowMap, positions: Tensor | None) -> Tensor:
    """(B,) per-stream sum over the token rows of a full tensor of ``row_map``."""
    per_row = x.reshape(row_map.rows, -1).sum(dim=1, dtype=checksum_dtype(x))
    if positions is not None:
        per_row = per_row.index_select(0, positions)
    return per_row.reshape(row_map.batch, row_map.tokens).sum(dim=1)


def _combined_norm(norms: list[Tensor]) -> Tensor:
    """The L2 norm over all gated inputs from the per-input norms (B, N)."""
    total = norms[0]
    for other in norms[1:]:
        total = torch.hypot(total, other)
    return total


def _fast_tokens(row_map: RowMap, positions: Tensor | None) -> bool:
    """One stream, tokens on dim 1 in order: rows are taken with index_select on dim 1,
    which also reads views (a transposed head merge) without copying them whole."""
    return positions is None and row_map.token_ndim == 2 and row_map.batch == 1


def take_tokens(x: Tensor, index: Tensor, row_map: RowMap, positions: Tensor | None) -> Tensor:
    """The tokens ``index`` (B, r) of ``x`` in gathered form ``row_map.gathered_shape(r)``."""
    if _fast_tokens(row_map, positions):
        return x.index_select(1, index[0])
    return gather_rows(x, flat_rows(index, row_map.tokens, positions), row_map, index.shape[1])


def put_tokens_(
    buffer: Tensor, index: Tensor, values: Tensor, row_map: RowMap, positions: Tensor | None
) -> None:
    """Write gathered ``values`` into the tokens ``index`` (B, r) of ``buffer`` in place."""
    if _fast_tokens(row_map, positions):
        buffer.index_copy_(1, index[0], values.reshape((1, index.shape[1]) + row_map.channel_shape))
    else:
        scatter_rows(buffer, flat_rows(index, row_map.tokens, positions), values, row_map)


def _may_skip(error: Tensor) -> bool:
    """Eager frames on real tensors: the skip reads one bool on the host, and compiled graphs,
    traces and FLOP counts (a dispatch mode, or meta tensors) keep the policy's static shape."""
    return not (
        error.device.type == "meta"
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or _get_current_dispatch_mode() is not None
    )


def _any_changed(error: Tensor, selection: Selection) -> bool:
    """Whether a selected (unmasked) token has a non-zero error (NaN counts as changed: it must
    reach the state checks). One small gather and one host read."""
    picked = error.gather(1, selection.index)
    moved = picked != 0
    if selection.mask is not None:
        moved &= selection.mask
    return bool(moved.any())


class TokenGate(nn.Module):
    """Decides which tokens of a region to recompute and keeps the references.

    State: one reference per gated input, the value last sent downstream for every token.
    A token's error is the L2 norm over all gated inputs of (current - reference); the
    policy picks the indices; the references of the picked tokens take the current values.
    """

    def __init__(
        self,
        name: str,
        maps: list[RowMap],
        positions: list[Tensor | None],
        dtypes: list[torch.dtype],
        policy: Policy,
        forced: Tensor | None,
    ):
        super().__init__()
        self.name = name
        self.maps = maps
        self.policy = policy
        self.batch, self.tokens = maps[0].batch, maps[0].tokens
        for i, (row_map, pos, dtype) in enumerate(zip(maps, positions, dtypes)):
            self.register_buffer(f"reference{i}", torch.zeros(row_map.shape, dtype=dtype), persistent=False)
            self.register_buffer(
                f"positions{i}",
                pos if pos is not None else torch.empty(0, dtype=torch.long),
                persistent=False,
            )
        self.register_buffer(
            "forced",
            forced if forced is not None else torch.zeros(self.tokens, dtype=torch.bool),
            persistent=False,
        )
        self.register_buffer("last_error", torch.zeros(()), persistent=False)
        self.has_forced = forced is not None and bool(forced.any())
        self.n_forced = int(forced.sum()) if forced is not None else 0  # the always-updated prefix

    def references(self) -> list[Tensor]:
        return [getattr(self, f"reference{i}") for i in range(len(self.maps))]

    def _positions(self, i: int) -> Tensor | None:
        return None if self.maps[i].canonical else getattr(self, f"positions{i}")

    def _difference(self, i: int, x: Tensor, ref: Tensor) -> Tensor:
        """``x - ref`` (the only full-size temporary of the gate). Eager, into a scratch tensor
        of the reference's (contiguous) layout, reused every frame: a difference computed from
        a transposed view keeps that view's layout, and the per-token norm over it then reads
        across the grain (3x slower at ViT-B's attention output)."""
        if not _may_skip(ref) or x.shape != ref.shape or x.dtype != ref.dtype:
            return x - ref
        scratch = self.__dict__.setdefault("_scratch", {})
        buf = scratch.get(i)
        if (
            buf is None
            or buf.shape != ref.shape
            or buf.dtype != ref.dtype
            or buf.device != ref.device
            or (buf.is_inference() != torch.is_inference_mode_enabled())
        ):
            buf = scratch[i] = torch.empty_like(ref, memory_format=torch.contiguous_format)
        return torch.sub(x, ref, out=buf)

    def initialise(self, inputs: list[Tensor]) -> None:
        for ref, x in zip(self.references(), inputs):
            ref.copy_(x)

    def initialise_streams(self, inputs: list[Tensor], streams: list[int]) -> None:
        """The references of the given streams take the current values (their first frame)."""
        for i, (ref, x) in enumerate(zip(self.references(), inputs)):
            rows = stream_rows(self.maps[i], self._positions(i), streams, ref.device)
            copy_stream_rows_(ref, x, rows, self.maps[i])

    def forward(self, inputs: list[Tensor], quiet: Tensor | None = None) -> tuple[Selection, list[Tensor]]:
        """Select tokens; returns the selection and every input gathered at it (B, r, ...).

        ``quiet`` (B,) bool or None: streams whose error counts as 0 (streams restarting this
        frame, whose references are stale: they must not raise a Threshold's count for the
        others)."""
        refs = self.references()
        relative = getattr(self.policy, "relative", False)
        norms = [
            token_norm(self._difference(i, x, ref), self.maps[i], self._positions(i))
            for i, (x, ref) in enumerate(zip(inputs, refs))
        ]
        error = _combined_norm(norms)
        if quiet is not None:
            error = error.masked_fill(quiet[:, None], 0.0)
        reference_norm = None
        if relative:
            reference_norm = _combined_norm(
                [token_norm(ref, self.maps[i], self._positions(i)) for i, ref in enumerate(refs)]
            )
        self.last_error.copy_(error.mean())
        selection = self.policy.select(error, reference_norm, self.forced if self.has_forced else None)
        skippable = quiet is None and selection.index.shape[1] and _may_skip(error)
        if skippable and not _any_changed(error, selection):
            # every selected token (the forced prefix included) equals its reference: their exit
            # rows already hold f(current), so the frame leaves this region's state as it is
            selection = Selection(selection.index[:, :0], None)
        index = selection.index
        if index.shape[1] == 0:
            return selection, []
        gathered = []
        for i, (x, ref) in enumerate(zip(inputs, refs)):
            positions = self._positions(i)
            new = take_tokens(x, index, self.maps[i], positions)
            if selection.mask is not None:
                old = take_tokens(ref, index, self.maps[i], positions)
                keep = (
                    selection.mask.reshape(selection.mask.shape + (1,) * (new.dim() - 2))
                    if new.dim() >= 2
                    else selection.mask.reshape(-1, *([1] * (new.dim() - 1)))
                )
                new = torch.where(keep, new, old)
            put_tokens_(ref, index, new, self.maps[i], positions)
            gathered.append(new)
        return selection, gathered


@dataclass(frozen=True)
class ConstantSpec:
    """A constant operand of a region op that varies along the op's token dims (a position
    embedding, a padding mask): gathered at the selected tokens every frame."""

    out_map: RowMap
    aligned_shape: tuple[int, ...]  # the constant's shape padded with leading 1s to the op's rank


def gather_constant(value: Tensor, spec: ConstantSpec, rows: Tensor, r: int) -> Tensor:
    """The rows of a broadcast constant at the gathered tokens, in gathered form."""
    k = spec.out_map.token_ndim
    target = tuple(spec.out_map.shape[:k]) + spec.aligned_shape[k:]
    full = value.reshape(spec.aligned_shape).expand(target)
    table = full.reshape(spec.out_map.rows, -1)
    channels = spec.aligned_shape[k:]
    if spec.out_map.token_ndim >= 2:
        shape = (spec.out_map.batch, r) + (1,) * (k - 2) + channels
    else:
        shape = (spec.out_map.batch * r,) + channels
    return table.index_select(0, rows).reshape(shape)


class SparseRegion(nn.Module):
    """A token-wise region computed only on the tokens its gate selects.

    ``dense`` runs the original ops on full tensors (first frame, refresh); ``sparse`` runs the
    same ops on gathered rows. Exits are written into preallocated buffers (the state), which
    are what the rest of the graph reads; invariant: ``buffer == f(reference)`` row by row.
    Returns ``(*exit buffers, index)`` where ``index`` (B, r) holds the recomputed tokens, or
    None after a dense frame.
    """

    def __init__(
        self,
        name: str,
        gate: TokenGate,
        dense: torch.fx.GraphModule,
        sparse: torch.fx.GraphModule,
        n_entries: int,
        constant_specs: list[ConstantSpec | None],
        constant_positions: list[Tensor | None],
        exit_maps: list[RowMap],
        exit_positions: list[Tensor | None],
        exit_dtypes: list[torch.dtype],
        exit_names: list[str] | None = None,
    ):
        super().__init__()
        self.name = name
        self.gate = gate
        self.dense = dense
        self.sparse = sparse
        self.n_entries = n_entries
        self.constant_specs = constant_specs
        self.exit_maps = exit_maps
        self.exit_names = list(exit_names or [])  # the original nodes each exit buffer holds
        self.fresh = True  # the whole batch restarts: the next frame is dense
        self.fresh_streams: tuple[int, ...] = ()  # only these streams restart (reset_stream)
        self.check_finite = False  # eager frames: a per-stream checksum of what they wrote
        self.checksum: Tensor | None = None  # (B,), non-finite where a stream's state turned so
        for i, pos in enumerate(constant_positions):
            self.register_buffer(
                f"constant_positions{i}",
                pos if pos is not None else torch.empty(0, dtype=torch.long),
                persistent=False,
            )
        for i, (row_map, pos, dtype) in enumerate(zip(exit_maps, exit_positions, exit_dtypes)):
            self.register_buffer(f"buffer{i}", torch.zeros(row_map.shape, dtype=dtype), persistent=False)
            self.register_buffer(
                f"exit_positions{i}",
                pos if pos is not None else torch.empty(0, dtype=torch.long),
                persistent=False,
            )

    def buffers_out(self) -> list[Tensor]:
        return [getattr(self, f"buffer{i}") for i in range(len(self.exit_maps))]

    def reset(self) -> None:
        """Every stream restarts: the next frame runs ``dense`` and fills the whole state."""
        self.fresh = True
        self.fresh_streams = ()

    def reset_stream(self, b: int) -> None:
        """Stream b restarts: on the next frame the other streams run sparsely as usual, ``dense``
        also runs (on the whole batch: its graph has the batch's static shapes) and only stream
        b's rows of the exit buffers and references are taken from it. The returned index still
        holds the r tokens per stream that the gate picked (static shapes); the attention
        modules re-initialise stream b from the full buffers, so its index row is not read."""
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < self.gate.batch:
            raise ValueError(f"stream must be an int in [0, {self.gate.batch - 1}], got {b!r}")
        if not self.fresh and b not in self.fresh_streams:
            self.fresh_streams = tuple(sorted(self.fresh_streams + (b,)))

    def _checking(self) -> bool:
        return self.check_finite and not torch.compiler.is_compiling() and not torch.jit.is_tracing()

    def _record(self, sums: list[Tensor]) -> None:
        # one reduction, no elementwise adds: the check is not the model's arithmetic, and FLOP
        # counts (which run this eager path on meta tensors) must not see it
        self.checksum = sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)

    def _full_sums(self, tensors: list[Tensor], maps: list[RowMap], prefix: str) -> list[Tensor]:
        sums = []
        for i, (t, row_map) in enumerate(zip(tensors, maps)):
            if t.is_floating_point():
                positions = None if row_map.canonical else getattr(self, f"{prefix}{i}")
                sums.append(stream_checksum_rows(t, row_map, positions))
        return sums

    def forward(self, *inputs: Tensor):
        entries = list(inputs[: self.n_entries])
        constants = list(inputs[self.n_entries :])
        buffers = self.buffers_out()
        checking = self._checking()
        if self.fresh:
            outputs = self.dense(*entries, *constants)
            for buffer, value in zip(buffers, outputs):
                buffer.copy_(value)
            self.gate.initialise(entries)
            self.fresh = False
            self.fresh_streams = ()
            if checking:
                self._record(self._full_sums(buffers, self.exit_maps, "exit_positions"))
            return (*buffers, None)
        restarting = self.fresh_streams
        quiet = None
        if restarting:
            quiet = torch.zeros(self.gate.batch, dtype=torch.bool, device=buffers[0].device)
            quiet[list(restarting)] = True
        selection, gathered = self.gate(entries, quiet)
        index = selection.index
        r = index.shape[1]
        outputs = ()
        if r:  # no token selected: nothing to compute, the exit buffers stay as they are
            gathered_constants = []
            for i, (value, spec) in enumerate(zip(constants, self.constant_specs)):
                if spec is None:
                    gathered_constants.append(value)
                else:
                    positions = None if spec.out_map.canonical else getattr(self, f"constant_positions{i}")
                    rows = flat_rows(index, spec.out_map.tokens, positions)
                    gathered_constants.append(gather_constant(value, spec, rows, r))
            outputs = self.sparse(*gathered, *gathered_constants)
            for i, (buffer, value) in enumerate(zip(buffers, outputs)):
                row_map = self.exit_maps[i]
                positions = None if row_map.canonical else getattr(self, f"exit_positions{i}")
                put_tokens_(buffer, index, value, row_map, positions)
        if restarting:
            self._restart_streams(entries, constants, list(restarting))
        if checking:  # the buffer rows this frame wrote (a non-finite reference row shows in them)
            batch = self.gate.batch
            sums = [stream_checksum(t, batch) for t in outputs if t.is_floating_point()]
            if restarting:
                sums += self._full_sums(buffers, self.exit_maps, "exit_positions")
            if sums:
                self._record(sums)
        return (*buffers, index)

    def _restart_streams(self, entries: list[Tensor], constants: list[Tensor], streams: list[int]) -> None:
        """Streams ``streams`` take the dense outputs and the current values as references."""
        dense = self.dense(*entries, *constants)
        for i, (buffer, value) in enumerate(zip(self.buffers_out(), dense)):
            row_map = self.exit_maps[i]
            positions = None if row_map.canonical else getattr(self, f"exit_positions{i}")
            copy_stream_rows_(buffer, value, stream_rows(row_map, positions, streams, buffer.device), row_map)
        self.gate.initialise_streams(entries, streams)
        self.fresh_streams = ()

    def state_bytes(self) -> int:
        tensors = self.buffers_out() + self.gate.references()
        return sum(t.numel() * t.element_size() for t in tensors)
