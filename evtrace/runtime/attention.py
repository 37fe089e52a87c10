"""Attention over buffered q, k, v where only some token rows changed since the last call.

Logit model: ``logits = scale * q @ k^T + bias``, where ``bias`` is an additive term
whose entry (i, j) is a function of (q_i, i, j) only (constant attention bias,
ViTDet's decomposed relative position).  Shapes: B batch rows (independent
streams), H heads, Nq query tokens, Nk key tokens, d head width of q and k, dv of v.

Contents
--------
Bias objects (``ConstantBias``, ``DecomposedRelPos``)
    ``full(q, tables)``, ``rows(q_rows, row_idx, tables)``, ``cols(q, col_idx, tables)``.
    ``tables`` carries tensors derived from model parameters on every call (relative
    position tables); it is ``()`` when the bias owns its tensor.
Pure tensor functions
    ``dense_attention`` (the reference), ``row_softmax_state`` (m, n, z of given
    query rows), ``key_update`` (swap changed keys in and out of (m, n, z)).
Stateful modules
    ``ExactDeltaAttention``: exact, O(N d) state, no N x N tensor.
    ``PaperDeltaAttention``: the paper's scheme (N x N state, approximate), for
    comparison.

Index sets ``idx_q`` (B, Rq) and ``idx_k`` (B, Rk) hold, per batch row, the query
rows and key/value rows that may have changed since the last call.  Each row of an
index set must be free of duplicates (a duplicated key would be swapped twice); the
values are not range-checked (that would need a host sync).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from evtrace.runtime.cost_profile import DEFAULT_PROFILE

__all__ = [
    "AttentionBias",
    "ConstantBias",
    "DecomposedRelPos",
    "dense_attention",
    "row_softmax_state",
    "key_update",
    "ExactDeltaAttention",
    "PaperDeltaAttention",
]


# ============================================================================= biases


def _expand_heads(row_idx: Tensor, h: int) -> Tensor:
    """Row indices (B, R) or (B, H, R) -> (B, H, R)."""
    if row_idx.dim() == 2:
        return row_idx[:, None, :].expand(-1, h, -1)
    return row_idx


def _static_shapes(q: Tensor) -> bool:
    """Shapes must not depend on the data here: compiling, tracing, or counting on meta."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or q.device.type == "meta"


class AttentionBias:
    """An additive logit term with entries that depend on (q_i, i, j) only.

    full(q (B,H,Nq,d), tables) -> (B,H,Nq,Nk) (possibly a broadcast view)
    rows(q_rows (B,H,R,d), row_idx (B,R) or (B,H,R), tables) -> (B,H,R,Nk)
    cols(q (B,H,Nq,d), col_idx (B,C), tables) -> (B,H,Nq,C)
    prepare(q, tables) -> an object ``rows``/``cols`` may take as ``prepared`` to share work
    between the calls of one frame (None when there is nothing to share)
    """

    def prepare(self, q: Tensor, tables: Sequence[Tensor] = ()):
        return None

    def full(self, q: Tensor, tables: Sequence[Tensor] = ()) -> Tensor:
        raise NotImplementedError

    def rows(self, q_rows: Tensor, row_idx: Tensor, tables: Sequence[Tensor] = (), prepared=None) -> Tensor:
        raise NotImplementedError

    def cols(self, q: Tensor, col_idx: Tensor, tables: Sequence[Tensor] = (), prepared=None) -> Tensor:
        raise NotImplementedError


class ConstantBias(AttentionBias):
    """A logit bias tensor broadcastable to (B, H, Nq, Nk) (ALiBi, masks, Swin tables).

    bias: the tensor, or None to take it from ``tables[0]`` on every call (when it is
    derived from parameters).  Size-1 dims broadcast; a size-1 query or key dim stays
    size 1 in ``rows``/``cols`` (still broadcastable).
    """

    def __init__(self, bias: Tensor | None = None):
        if bias is not None and (not isinstance(bias, Tensor) or not 1 <= bias.dim() <= 4):
            raise TypeError(
                "bias must be a tensor with 1 to 4 dims broadcastable to "
                f"(B, H, Nq, Nk) or None, got {_describe(bias)}"
            )
        self.bias = bias

    def _tensor(self, tables: Sequence[Tensor]) -> Tensor:
        t = self.bias
        if t is None:
            if len(tables) != 1 or not isinstance(tables[0], Tensor):
                raise ValueError(
                    "ConstantBias(None) takes its bias from tables: expected "
                    f"tables=(bias,), got {len(tables)} entries"
                )
            t = tables[0]
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))

    def full(self, q, tables=()):
        t = self._tensor(tables)
        return t.expand(q.shape[0], q.shape[1], t.shape[2], t.shape[3])

    def rows(self, q_rows, row_idx, tables=(), prepared=None):
        b, h, r, _ = q_rows.shape
        t = self._tensor(tables)
        t = t.expand(b, h, t.shape[2], t.shape[3])
        if t.shape[2] == 1:
            return t.expand(b, h, r, t.shape[3])
        idx = _expand_heads(row_idx, h)[..., None].expand(b, h, r, t.shape[3])
        return t.gather(2, idx)

    def cols(self, q, col_idx, tables=(), prepared=None):
        b, h, nq, _ = q.shape
        c = col_idx.shape[1]
        t = self._tensor(tables)
        t = t.expand(b, h, t.shape[2], t.shape[3])
        if t.shape[3] == 1:
            return t.expand(b, h, t.shape[2], c)
        idx = col_idx[:, None, None, :].expand(b, h, t.shape[2], c)
        return t.gather(3, idx)

    def __repr__(self) -> str:
        shape = "from tables" if self.bias is None else tuple(self.bias.shape)
        return f"ConstantBias({shape})"


class DecomposedRelPos(AttentionBias):
    """ViTDet's decomposed relative position bias.

    bias[b,h,i,j] = <q_i, Rh[qy(i), ky(j)]> + <q_i, Rw[qx(i), kx(j)]>
    with q unscaled, tokens row-major on the grids (i = qy * qw + qx,
    j = ky * kw + kx), and ``tables = (Rh (qh, kh, d), Rw (qw, kw, d))`` as
    ViTDet's ``get_rel_pos`` returns them (they are interpolated from parameters on
    every call, so they are passed in rather than stored).

    ``cols`` costs O(Nq (kh + kw) d) for the factor tables plus a gather, never
    O(Nq Nk d).
    """

    def __init__(self, q_grid: tuple[int, int], k_grid: tuple[int, int]):
        self.q_grid = _check_grid("q_grid", q_grid)
        self.k_grid = _check_grid("k_grid", k_grid)

    def _tables(self, tables: Sequence[Tensor], d: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        (qh, qw), (kh, kw) = self.q_grid, self.k_grid
        if len(tables) != 2:
            raise ValueError(f"DecomposedRelPos expects tables=(Rh, Rw), got {len(tables)} entries")
        rh, rw = tables
        if tuple(rh.shape) != (qh, kh, d) or tuple(rw.shape) != (qw, kw, d):
            raise ValueError(
                f"DecomposedRelPos: expected Rh of shape (qh, kh, d) = {(qh, kh, d)} and Rw of "
                f"shape (qw, kw, d) = {(qw, kw, d)}, got {tuple(rh.shape)} and {tuple(rw.shape)}"
            )
        return rh.to(dtype), rw.to(dtype)

    def factors(self, q: Tensor, tables: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Per query row factor tables: q (B,H,Nq,d) -> (B,H,Nq,kh), (B,H,Nq,kw)."""
        b, h, nq, d = q.shape
        (qh, qw), (kh, kw) = self.q_grid, self.k_grid
        if nq != qh * qw:
            raise ValueError(f"DecomposedRelPos: q has {nq} tokens, q_grid {self.q_grid} holds {qh * qw}")
        rh, rw = self._tables(tables, d, q.dtype)
        grid = q.reshape(b, h, qh, qw, d)
        rel_h = torch.einsum("bhyxc,ykc->bhyxk", grid, rh).reshape(b, h, nq, kh)
        rel_w = torch.einsum("bhyxc,xkc->bhyxk", grid, rw).reshape(b, h, nq, kw)
        return rel_h, rel_w

    def full(self, q, tables=()):
        b, h, nq, _ = q.shape
        (kh, kw) = self.k_grid
        rel_h, rel_w = self.factors(q, tables)
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, h, nq, kh * kw)

    def prepare(self, q, tables=()):
        """The factor tables of every query row, shared by ``rows`` and ``cols``."""
        return self.factors(q, tables)

    def rows(self, q_rows, row_idx, tables=(), prepared=None):
        b, h, r, d = q_rows.shape
        (_, qw), (kh, kw) = self.q_grid, self.k_grid
        if prepared is not None:  # gather the rows of the factor tables: O(R (kh + kw))
            rel_h, rel_w = (_rows_gather(t, row_idx) for t in prepared)
            return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, h, r, kh * kw)
        rh, rw = self._tables(tables, d, q_rows.dtype)
        if row_idx.dim() == 2:  # shared across heads: tables (B, R, k, d), not (B, H, R, k, d)
            per_token = q_rows.transpose(1, 2)  # (B, R, H, d): one (H, d) x (d, k) product per row
            rh_rows = rh.index_select(0, (row_idx // qw).reshape(-1)).view(b, r, kh, d)
            rw_rows = rw.index_select(0, (row_idx % qw).reshape(-1)).view(b, r, kw, d)
            rel_h = (per_token @ rh_rows.transpose(-1, -2)).transpose(1, 2)
            rel_w = (per_token @ rw_rows.transpose(-1, -2)).transpose(1, 2)
        else:
            rel_h = torch.einsum("bhrc,bhrkc->bhrk", q_rows, rh[row_idx // qw])
            rel_w = torch.einsum("bhrc,bhrkc->bhrk", q_rows, rw[row_idx % qw])
        return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, h, r, kh * kw)

    def cols(self, q, col_idx, tables=(), prepared=None):
        b, h, nq, _ = q.shape
        c = col_idx.shape[1]
        kh, kw = self.k_grid
        rel_h, rel_w = self.factors(q, tables) if prepared is None else prepared
        if not _static_shapes(q) and _get_current_dispatch_mode() is None:
            # The same two entries per column picked by a product with their one-hot rows: one
            # pass that writes (B,H,Nq,C) once, where two gathers and an add write it three
            # times (2.5x faster at ViTDet-B's 1764 tokens). Exact: each output sums its two
            # picked entries and zeros. Counting and compiling see the gathers (the algorithm).
            picks = torch.zeros(b, kh + kw, c, dtype=rel_h.dtype, device=rel_h.device)
            picks.scatter_(1, (col_idx // kw).unsqueeze(1), 1.0)
            picks.scatter_(1, (kh + col_idx % kw).unsqueeze(1), 1.0)
            rel = torch.cat([rel_h, rel_w], dim=-1).reshape(b, h * nq, kh + kw)
            return torch.bmm(rel, picks).view(b, h, nq, c)
        ky = (col_idx // kw)[:, None, None, :].expand(b, h, nq, c)
        kx = (col_idx % kw)[:, None, None, :].expand(b, h, nq, c)
        return rel_h.gather(3, ky) + rel_w.gather(3, kx)

    def __repr__(self) -> str:
        return f"DecomposedRelPos(q_grid={self.q_grid}, k_grid={self.k_grid})"


# ============================================================================= math


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: AttentionBias | None = None,
    tables: Sequence[Tensor] = (),
) -> Tensor:
    """softmax(scale q k^T + bias) v.  q (B,H,Nq,d), k (B,H,Nk,d), v (B,H,Nk,dv) -> (B,H,Nq,dv)."""
    logits = (q * scale) @ k.transpose(-1, -2)
    if bias is not None:
        logits = logits + bias.full(q, tables)
    return torch.softmax(logits, dim=-1) @ v


def row_softmax_state(
    q_rows: Tensor,
    row_idx: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: AttentionBias | None = None,
    tables: Sequence[Tensor] = (),
    prepared=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax state of the given query rows against all keys, computed from scratch.

    q_rows (B,H,R,d), row_idx (B,R) or (B,H,R), k (B,H,Nk,d), v (B,H,Nk,dv) ->
    m (B,H,R) = max_j l_ij, n (B,H,R,dv) = sum_j exp(l_ij - m_i) v_j,
    z (B,H,R) = sum_j exp(l_ij - m_i).  Temporaries are (B,H,R,Nk).
    """
    logits = (q_rows * scale) @ k.transpose(-1, -2)
    if bias is not None:
        logits.add_(bias.rows(q_rows, row_idx, tables, prepared))
    m = logits.amax(dim=-1)
    p = logits.sub_(m[..., None]).exp_()
    return m, p @ v, p.sum(dim=-1)


def key_update(
    q: Tensor,
    k_old: Tensor,
    k_new: Tensor,
    v_old: Tensor,
    v_new: Tensor,
    m: Tensor,
    n: Tensor,
    z: Tensor,
    mag: Tensor,
    scale: float,
    bias_cols: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Swap R changed keys in the softmax state of every query row (online softmax).

    q (B,H,Nq,d); k_old, k_new (B,H,R,d); v_old, v_new (B,H,R,dv) the rows before and
    after the change; m, z, mag (B,H,Nq); n (B,H,Nq,dv); bias_cols (B,H,Nq,R) or None,
    the bias of every query row against the changed key positions (it does not depend
    on k, so it is the same before and after).

    With l_new, l_old (B,H,Nq,R) the new and old logits:
        m'   = max(m, max_j l_new)                  (overflow: rescale, never exp(> 0))
        a    = exp(m - m')
        z'   = a z + sum_j exp(l_new - m') - sum_j exp(l_old - m')
        n'   = a n + exp(l_new - m') v_new - exp(l_old - m') v_old
        mag' = a mag + sum_j exp(l_new - m') + sum_j exp(l_old - m')
    ``mag`` is the sum of magnitudes of all terms ever added to or taken from z since
    the row was last computed from scratch: the rounding error of z (and n) is about
    eps * mag, so z / mag measures the cancellation.  Returns (m', n', z', mag') as new
    tensors (``key_update_`` updates the state in place).
    """
    m, n, z, mag = m.clone(), n.clone(), z.clone(), mag.clone()
    key_update_(q * scale, k_old, k_new, v_old, v_new, m, n, z, mag, bias_cols)
    return m, n, z, mag


def key_update_(
    q_scaled: Tensor,
    k_old: Tensor,
    k_new: Tensor,
    v_old: Tensor,
    v_new: Tensor,
    m: Tensor,
    n: Tensor,
    z: Tensor,
    mag: Tensor,
    bias_cols: Tensor | None = None,
    workspace: Tensor | None = None,
) -> None:
    """``key_update`` in place on (m, n, z, mag), with q already multiplied by the scale.

    ``workspace`` (B,H,Nq,2R), optional, receives the logits: at large N a fresh tensor of
    that size is a fresh mapping from the allocator every call, and its page faults cost
    about as much as the matmul that fills it."""
    r = k_new.shape[2]
    keys = torch.cat([k_new, k_old], dim=2).transpose(-1, -2)
    logits = q_scaled @ keys if workspace is None else torch.matmul(q_scaled, keys, out=workspace)
    if bias_cols is not None:
        logits.unflatten(-1, (2, r)).add_(bias_cols[..., None, :])
    m2 = torch.maximum(m, logits[..., :r].amax(dim=-1))
    alpha = torch.exp(m - m2)
    p = logits.sub_(m2[..., None]).exp_()
    s_new = p[..., :r].sum(dim=-1)
    s_old = p[..., r:].sum(dim=-1)
    n.mul_(alpha[..., None]).add_(p @ torch.cat([v_new, -v_old], dim=2))
    z.mul_(alpha).add_(s_new).sub_(s_old)
    mag.mul_(alpha).add_(s_new).add_(s_old)
    m.copy_(m2)


# ============================================================================= helpers


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}"


def _check_grid(name: str, grid) -> tuple[int, int]:
    ok = (
        isinstance(grid, (tuple, list))
        and len(grid) == 2
        and all(isinstance(g, numbers.Integral) and not isinstance(g, bool) and g >= 1 for g in grid)
    )
    if not ok:
        raise ValueError(f"{name} must be a pair of ints >= 1 (height, width), got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {low}, got {_describe(value)}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a finite real number, got {_describe(scale)}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite real number, got {scale}")
    return float(scale)


def _check_bias(bias) -> AttentionBias | None:
    if bias is not None and not isinstance(bias, AttentionBias):
        raise TypeError(
            f"bias must be an AttentionBias (ConstantBias, DecomposedRelPos) or None, got {_describe(bias)}"
        )
    return bias


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor (B, H, N, d), got {_describe(t)}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(
            f"k must have shape (B, H, Nk, d) = ({b}, {h}, Nk, {d}) to match q, got {tuple(k.shape)}"
        )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must have shape (B, H, Nk, dv) = ({b}, {h}, {k.shape[2]}, dv) to "
            f"match k, got {tuple(v.shape)}"
        )


def _check_idx(name: str, idx, b: int, n: int) -> None:
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        raise TypeError(
            f"{name} must be a LongTensor (B, R) of per batch row indices or None, got {_describe(idx)}"
        )
    if idx.shape[0] != b or idx.shape[1] > n:
        raise ValueError(
            f"{name} must have shape (B, R) with B = {b} and 0 <= R <= {n}, got {tuple(idx.shape)}"
        )


# Estimated relative error of a row = _ERROR_PER_EPS * eps * mag / z (calibrated on random
# streams with peaky attention: the measured error was 0.7 to 1.4 times eps * mag / z).
_ERROR_PER_EPS = 2.0


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulators stay at least fp32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _elsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _flat_rows(idx: Tensor, h: int, n: int) -> Tensor:
    """Row indices (B,R) or (B,H,R) -> (B*H*R,) row numbers of a (B*H*N, c) view."""
    idx = _expand_heads(idx, h)
    b = idx.shape[0]
    offsets = torch.arange(b * h, device=idx.device).view(b, h, 1) * n
    return (idx + offsets).reshape(-1)


def _rows_gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (B,H,N,c), idx (B,R) or (B,H,R) -> x[b, h, idx] (B,H,R,c).

    ``index_select`` copies whole rows; ``gather`` with an expanded index reads element by
    element (several times slower on CPU), so it is kept for per-head index sets, which
    are small (repair rows)."""
    b, h, n, c = x.shape
    if idx.dim() == 3:
        return x.gather(2, idx[..., None].expand(-1, -1, -1, c))
    if b == 1:
        return x.index_select(2, idx[0])
    r = idx.shape[-1]
    return x.reshape(b * h * n, c).index_select(0, _flat_rows(idx, h, n)).view(b, h, r, c)


def _rows_write_(x: Tensor, idx: Tensor, src: Tensor) -> None:
    """In place x[b, h, idx] = src.  x (B,H,N,c) contiguous, idx (B,R) or (B,H,R), src (B,H,R,c)."""
    b, h, n, c = x.shape
    if b == 1 and idx.dim() == 2:
        x.index_copy_(2, idx[0], src)
    else:
        x.view(b * h * n, c).index_copy_(0, _flat_rows(idx, h, n), src.reshape(-1, c))


def _entries_write_(x: Tensor, flat: Tensor, src: Tensor) -> None:
    """In place x.view(-1)[flat] = src.  x (B,H,N) contiguous, flat from ``_flat_rows``."""
    x.view(-1).index_copy_(0, flat, src.reshape(-1))


def _check_stream(b, batch: int | None) -> int:
    if (
        isinstance(b, bool)
        or not isinstance(b, numbers.Integral)
        or b < 0
        or (batch is not None and b >= batch)
    ):
        size = "B - 1" if batch is None else batch - 1
        raise ValueError(f"b must be a batch row index in [0, {size}], got {b!r}")
    return int(b)


def _stream_inputs(
    q: Tensor, k: Tensor, v: Tensor, tables: tuple, bias, streams: Tensor
) -> tuple[Tensor, Tensor, Tensor, tuple] | None:
    """q, k, v (and per-batch tables) of the given batch rows, or None where the bias may hold
    a batch dim of its own (a ConstantBias): the caller then computes the whole batch."""
    if isinstance(bias, ConstantBias):
        return None
    return q.index_select(0, streams), k.index_select(0, streams), v.index_select(0, streams), tables


class _StreamState:
    """Per-stream restart and the finite check, shared by both delta attention modules.

    ``reset_stream(b)`` marks stream b: the next delta call updates every stream as usual, then
    overwrites stream b's state with a full initialisation from the buffers it is given (exact
    for b; the other streams' state and outputs are untouched, bit for bit). Stream b's rows of
    the index are not read. ``check_finite``: eager calls record in ``checksum`` (B,) the sum
    of each stream's output (NaN or Inf where it is not finite)."""

    check_finite: bool = False
    checksum: Tensor | None = None

    # Setting the pending restarts (a reset, a restored stream checkpoint, a compute path that
    # consumed them) also drops the kept output, so that it is never returned across a restart.
    @property
    def _fresh_streams(self) -> tuple[int, ...]:
        return self.__dict__.get("_fresh_streams_value", ())

    @_fresh_streams.setter
    def _fresh_streams(self, value: tuple[int, ...]) -> None:
        self.__dict__["_fresh_streams_value"] = value
        self.__dict__.pop("_kept", None)

    def _take_fresh(self) -> Tensor | None:
        if not self._fresh_streams:
            return None
        streams = torch.tensor(self._fresh_streams, dtype=torch.long)
        self._fresh_streams = ()
        return streams

    def _mark_stream(self, b: int, batch: int | None) -> None:
        b = _check_stream(b, batch)
        self._forget_output()
        if not self._needs_init and b not in self._fresh_streams:
            self._fresh_streams = tuple(sorted(self._fresh_streams + (b,)))

    def _checked(self, out: Tensor) -> Tensor:
        if self.check_finite and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
            acc = torch.float64 if out.dtype == torch.float64 else torch.float32
            self.checksum = out.sum(dim=tuple(range(1, out.dim())), dtype=acc)
        return out

    # The last output, returned again when no query and no key changed (the index inputs say
    # what changed: q, k, v may be fresh copies every call, windows for instance). It is valid
    # while the output itself is unchanged (its version counter: a caller that writes into it
    # makes the next call compute again); a reset, a restart or a restored stream checkpoint
    # drops it (see ``_fresh_streams``).
    def _forget_output(self) -> None:
        self.__dict__.pop("_kept", None)

    def _keep_output(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if _static_shapes(q) or _get_current_dispatch_mode() is not None:
            self._forget_output()
            return out
        try:
            key = (out.data_ptr(), out._version)
        except RuntimeError:  # inference tensors carry no version counter: nothing is kept
            self._forget_output()
            return out
        self.__dict__["_kept"] = (out, key)
        return out

    def _kept_output(self, q: Tensor, k: Tensor, v: Tensor, idx_q: Tensor, idx_k: Tensor) -> Tensor | None:
        """The last output when neither queries nor keys changed and it is still valid, else None."""
        kept = self.__dict__.get("_kept")
        if kept is None or idx_q.shape[1] or idx_k.shape[1] or self._fresh_streams:
            return None
        if _static_shapes(q) or _get_current_dispatch_mode() is not None:
            return None
        out, key = kept
        try:
            now = (out.data_ptr(), out._version)
        except RuntimeError:
            return None
        if now != key or out.shape[:3] != q.shape[:3] or out.dtype != q.dtype:
            return None
        self.checksum = None  # nothing new was written: the last frame's check covered it
        return out


# ============================================================================= exact delta


def delta_costs_more(bh, nq, nk, d, dv, rq, rk, repair, overhead, mac_cost=Fraction(1)):
    """Whether a delta update costs at least a full recompute, in fused-attention multiply-adds.

    The key swap takes 2 rk logits and values per query row, the recompute rq + repair full
    rows, each multiply-add worth ``mac_cost`` of fused attention's (a Fraction), plus
    ``overhead`` (the fixed work of one update); a full recompute takes nq rows of nk. ``bh``
    counts batch rows times heads. Integer arithmetic: called with ints it answers a bool, with
    sympy symbols the relation the cost model puts in its formula.
    """
    per_entry = bh * (d + dv)
    num, den = mac_cost.numerator, mac_cost.denominator
    delta = (nq * 2 * rk + (rq + repair) * nk) * per_entry * num + overhead * den
    return delta >= nq * nk * per_entry * den


class ExactDeltaAttention(_StreamState, nn.Module):
    """Exact delta attention: equals dense attention on the buffered q, k, v every call.

    State per (batch row, head, query row i): stabiliser m_i, numerator
    n_i = sum_j exp(l_ij - m_i) v_j, denominator z_i = sum_j exp(l_ij - m_i), the
    cancellation magnitude mag_i (see ``key_update``), and copies of k and v (the old
    rows are needed to subtract their terms).  No copy of q is kept: the rows of q
    outside ``idx_q`` are unchanged by contract, so the old logits of a changed key
    are recomputed from the current q.  State O(N (d + 2 dv)), no N x N tensor.

    Per call (changed queries Sq, changed keys Sk, ``repair_rows`` = c):
      1. every query row swaps the old terms of Sk for the new ones (``key_update``),
         rescaling by exp(m - m') when a new logit exceeds m (overflow);
      2. the rows Sq, plus per head the c rows with the worst cancellation ratio
         z / mag (top-c, static shape), are recomputed from scratch;
      3. if ``max_relative_error`` is set and a row not recomputed still has an
         estimated error 2 eps mag / z above it, the whole site is recomputed.  In eager
         mode the flag is read on the host (one bool); under ``torch.compile`` and
         ``torch.jit.trace`` (fvcore) the fallback is left out and ``stats["refreshed"]``
         records that it was needed, so the caller can ``reset()`` the stream.
    Cost O((|Sq| + c) Nk d + Nq |Sk| d); temporaries (B,H,N,2|Sk|) and (B,H,|Sq|+c,Nk).
    With ``full_when_cheaper`` (what ``evtrace.transform`` builds), a call whose delta
    update would cost more than plain attention (``delta_is_costlier``, from the shapes
    only) runs fused attention on q, k, v instead and keeps no state; the next delta call
    then initialises afresh.

    forward(q, k, v, idx_q, idx_k, tables=()):
        q (B,H,Nq,d), k (B,H,Nk,d), v (B,H,Nk,dv): the full current buffers.
        idx_q (B,Rq), idx_k (B,Rk): per batch row the query rows and key/value rows
        that may have changed (duplicate-free per row; Rq or Rk may be 0), or both
        None for a full (re)initialisation.  Returns (B,H,Nq,dv).

    Full initialisations (first call, ``reset``, ``reset_stream``, fallback) compute
    the state in blocks of ``init_chunk_rows`` query rows (temporaries
    (B,H,chunk,Nk)).  ``reset_stream(b)`` re-initialises stream b alone on the next
    call: the other streams take their delta update as usual (bit for bit what they would
    have computed without the reset), then stream b's state is computed from scratch from
    the buffers (the cost of one dense call for one stream).

    ``stats`` (tensors, no sync): ``worst_ratio`` (min z/mag before repair over rows
    not in Sq, 1 = no cancellation), ``worst_ratio_after`` (min over rows not
    recomputed), ``worst_ratio_seen`` (min of ``worst_ratio`` since construction),
    ``repaired`` (how many repaired rows had an estimated error above
    ``max_relative_error``, i.e. needed it), ``refreshed`` (1 if this call fell back
    to a full recompute), ``refresh_count`` (fallbacks since construction).
    """

    def __init__(
        self,
        scale: float,
        bias: AttentionBias | None = None,
        repair_rows: int = 8,
        max_relative_error: float | None = 1e-4,
        init_chunk_rows: int = 1024,
        full_when_cheaper: bool = False,
        site_name: str = "",
    ):
        super().__init__()
        self.site_name = site_name  # the attention site of the original graph it replaces
        self.scale = _check_scale(scale)
        self.bias = _check_bias(bias)
        self.repair_rows = _check_int("repair_rows", repair_rows, 0)
        self.full_when_cheaper = bool(full_when_cheaper)
        if max_relative_error is not None:
            if (
                isinstance(max_relative_error, bool)
                or not isinstance(max_relative_error, numbers.Real)
                or not 0.0 < float(max_relative_error) < 1.0
            ):
                raise ValueError(
                    "max_relative_error must be a real number in (0, 1) or None "
                    f"(no fallback), got {max_relative_error!r}"
                )
            max_relative_error = float(max_relative_error)
        self.max_relative_error = max_relative_error
        self.init_chunk_rows = _check_int("init_chunk_rows", init_chunk_rows, 1)
        for name in ("k_ref", "v_ref", "m", "n", "z", "mag"):
            self.register_buffer(name, None, persistent=False)
        self.register_buffer("_worst_ratio", torch.ones(()), persistent=False)
        self.register_buffer("_worst_ratio_after", torch.ones(()), persistent=False)
        self.register_buffer("_worst_ratio_seen", torch.ones(()), persistent=False)
        self.register_buffer("_repaired", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("_refreshed", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("_refresh_count", torch.zeros((), dtype=torch.long), persistent=False)
        self._needs_init = True

    # ------------------------------------------------------------------ public state API

    def reset(self) -> None:
        """The next call is a full initialisation (all state back to "first call")."""
        self._needs_init = True
        self._fresh_streams = ()
        self._forget_output()

    def reset_stream(self, b: int) -> None:
        """Stream b restarts: the next call re-initialises stream b's state from the buffers
        and leaves the other streams' state alone."""
        self._mark_stream(b, None if self.k_ref is None else self.k_ref.shape[0])

    @property
    def last_repaired(self) -> Tensor:
        """How many repaired rows needed it in the last call (0-dim long tensor)."""
        return self._repaired

    @property
    def stats(self) -> dict[str, Tensor]:
        return {
            "worst_ratio": self._worst_ratio,
            "worst_ratio_after": self._worst_ratio_after,
            "worst_ratio_seen": self._worst_ratio_seen,
            "repaired": self._repaired,
            "refreshed": self._refreshed,
            "refresh_count": self._refresh_count,
        }

    def state_bytes(self) -> int:
        """Bytes of state as currently allocated (0 before the first call)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.k_ref, self.v_ref, self.m, self.n, self.z, self.mag)
            if t is not None
        )

    @staticmethod
    def state_bytes_for(B: int, H: int, N: int, d: int, dv: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of state for Nq = Nk = N, without allocating."""
        acc = _elsize(_acc_dtype(dtype))
        return B * H * N * ((d + dv) * _elsize(dtype) + (dv + 3) * acc)

    def extra_repr(self) -> str:
        return (
            f"scale={self.scale:g}, bias={self.bias!r}, repair_rows={self.repair_rows}, "
            f"max_relative_error={self.max_relative_error}, full_when_cheaper={self.full_when_cheaper}"
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        idx_q: Tensor | None,
        idx_k: Tensor | None,
        tables: Sequence[Tensor] = (),
    ) -> Tensor:
        _check_qkv(q, k, v)
        if (idx_q is None) != (idx_k is None):
            raise ValueError(
                "idx_q and idx_k must both be LongTensors (B, R) or both be None "
                "(full initialisation); pass an empty (B, 0) index for a side "
                "that did not change"
            )
        tables = tuple(tables)
        if idx_q is not None:
            b = q.shape[0]
            _check_idx("idx_q", idx_q, b, q.shape[2])
            _check_idx("idx_k", idx_k, b, k.shape[2])
            kept = self._kept_output(q, k, v, idx_q, idx_k)
            if kept is not None:
                return kept
        return self._keep_output(self._compute(q, k, v, idx_q, idx_k, tables), q, k, v)

    def _compute(self, q, k, v, idx_q, idx_k, tables) -> Tensor:
        if idx_q is not None:
            if self.full_when_cheaper and self.delta_is_costlier(
                q.shape, v.shape[3], k.shape[2], idx_q.shape[1], idx_k.shape[1]
            ):
                # plain attention, no state kept: a later call that takes the delta path starts
                # with a full initialisation from the buffers it is given, which are all it needs
                self._needs_init = True
                self._fresh_streams = ()
                bias = None if self.bias is None else self.bias.full(q, tables).to(q.dtype)
                return self._checked(
                    F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
                )
        if idx_q is None or self._needs_init or not self._state_matches(q, k, v):
            return self._checked(self._initialise(q, k, v, tables))
        return self._checked(self._delta(q, k, v, idx_q, idx_k, tables))

    #: What one delta update costs against fused attention (``scaled_dot_product_attention``),
    #: fitted on this project's 2-core CPU over N = 197 .. 1764, 6 and 12 heads of 64, r = N/8 ..
    #: N/2 (eager, 2 threads): the fixed work (about 40 small ops, whatever the sizes) is worth
    #: 2^26 fused multiply-adds (0.5 to 0.6 ms), and each of its multiply-adds (batched matmuls
    #: on thin slices, the exp of the swapped logits) 1.4 fused ones. With them the choice agrees
    #: with the measured faster path at every point of the fit: ViT-B at 224 and DINOv2-S at 257
    #: tokens recompute in full; ViViT-B's 401 tokens take the delta update up to r of about N/7,
    #: ViTDet-B's 1764 up to about N/5.
    #: (the shipped ``CostProfile``; ``transform(cost_profile=...)`` sets them per module)
    delta_overhead_macs: int = DEFAULT_PROFILE.delta_overhead_macs
    delta_mac_cost: Fraction = DEFAULT_PROFILE.delta_mac_cost
    #: query rows per block of the eager key update (the logits of a block, (B, H, rows, 2 Rk))
    key_chunk_rows: int = DEFAULT_PROFILE.key_chunk_rows

    def take_cost_profile(self, profile) -> None:
        """Use a device's constants (a ``CostProfile``) for the delta-or-full choice and the key blocks."""
        self.delta_overhead_macs = profile.delta_overhead_macs
        self.delta_mac_cost = profile.delta_mac_cost
        self.key_chunk_rows = profile.key_chunk_rows

    def delta_is_costlier(self, q_shape: Sequence[int], dv: int, nk: int, rq: int, rk: int) -> bool:
        """Whether a delta update of rq changed queries and rk changed keys costs more than
        recomputing the site: the key swap takes 2 rk logits and values per query row, the
        recompute rq + repair_rows full rows, plus ``delta_overhead_macs``; a full recompute
        takes nq full rows.  Shapes only: the choice is static under torch.compile."""
        b, h, nq, d = q_shape
        return delta_costs_more(
            b * h,
            nq,
            nk,
            d,
            dv,
            rq,
            rk,
            min(self.repair_rows, nq),
            self.delta_overhead_macs,
            self.delta_mac_cost,
        )

    def preallocate(
        self,
        q_shape: Sequence[int],
        k_shape: Sequence[int],
        v_shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        """Allocate the state for these (B,H,N,d) shapes now rather than on the first call."""
        meta = dict(dtype=dtype, device=device)
        self._allocate(
            torch.empty(q_shape, **meta), torch.empty(k_shape, **meta), torch.empty(v_shape, **meta)
        )

    def _scratch(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A reusable temporary (not state: never read across calls)."""
        buf = self.__dict__.get("_scratch_tensor")
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self.__dict__["_scratch_tensor"] = buf
        return buf

    def _state_matches(self, q, k, v) -> bool:
        if self.k_ref is None:
            return False
        return (
            self.k_ref.shape == k.shape
            and self.v_ref.shape == v.shape
            and self.m.shape == q.shape[:3]
            and self.k_ref.dtype == k.dtype
            and self.k_ref.device == k.device
        )

    def _allocate(self, q, k, v) -> None:
        acc = _acc_dtype(q.dtype)
        b, h, nq, _ = q.shape
        # contiguous, whatever the layout of k and v (views of a qkv buffer): rows are written in place
        self.k_ref = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        self.v_ref = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        self.m = torch.empty((b, h, nq), dtype=acc, device=q.device)
        self.z = torch.empty_like(self.m)
        self.mag = torch.empty_like(self.m)
        self.n = torch.empty((b, h, nq, v.shape[3]), dtype=acc, device=q.device)

    def _full_state(self, q, k, v, tables) -> tuple[Tensor, Tensor, Tensor]:
        """m, n, z of every query row, in blocks of init_chunk_rows rows."""
        b, _, nq, _ = q.shape
        parts = []
        for start in range(0, nq, self.init_chunk_rows):
            stop = min(nq, start + self.init_chunk_rows)
            rows = torch.arange(start, stop, device=q.device).expand(b, stop - start)
            parts.append(row_softmax_state(q[:, :, start:stop], rows, k, v, self.scale, self.bias, tables))
        if len(parts) == 1:
            return parts[0]
        m, n, z = zip(*parts)
        return torch.cat(m, dim=2), torch.cat(n, dim=2), torch.cat(z, dim=2)

    def _initialise(self, q, k, v, tables) -> Tensor:
        if not self._state_matches(q, k, v):
            self._allocate(q, k, v)
        acc = _acc_dtype(q.dtype)
        m, n, z = self._full_state(q.to(acc), k.to(acc), v.to(acc), tables)
        self.k_ref.copy_(k)
        self.v_ref.copy_(v)
        self.m.copy_(m)
        self.n.copy_(n)
        self.z.copy_(z)
        self.mag.copy_(z)
        self._worst_ratio.fill_(1.0)
        self._worst_ratio_after.fill_(1.0)
        self._repaired.zero_()
        self._refreshed.zero_()
        self._needs_init = False
        self._fresh_streams = ()
        return (n / z[..., None]).to(q.dtype)

    def _restart_streams(self, q, k, v, tables, streams: Tensor) -> None:
        """Stream rows ``streams`` of the state computed from scratch from q, k, v."""
        acc = _acc_dtype(q.dtype)
        streams = streams.to(q.device)
        picked = _stream_inputs(q, k, v, tables, self.bias, streams)
        if picked is None:  # a bias that may carry a batch dim: the whole batch, then the rows
            m, n, z = self._full_state(q.to(acc), k.to(acc), v.to(acc), tables)
            m, n, z = (t.index_select(0, streams) for t in (m, n, z))
        else:
            qs, ks, vs, ts = picked
            m, n, z = self._full_state(qs.to(acc), ks.to(acc), vs.to(acc), ts)
        self.k_ref.index_copy_(0, streams, k.index_select(0, streams).to(self.k_ref.dtype))
        self.v_ref.index_copy_(0, streams, v.index_select(0, streams).to(self.v_ref.dtype))
        self.m.index_copy_(0, streams, m)
        self.n.index_copy_(0, streams, n)
        self.z.index_copy_(0, streams, z)
        self.mag.index_copy_(0, streams, z)

    def _delta(self, q, k, v, idx_q, idx_k, tables) -> Tensor:
        acc = _acc_dtype(q.dtype)
        b, h, nq, _ = q.shape
        qa = q.to(acc)
        m, n, z, mag = self.m, self.n, self.z, self.mag  # updated in place
        prepared = None if self.bias is None else self.bias.prepare(qa, tables)

        # 1. changed keys: swap their terms in every query row, then store the new rows
        if idx_k.shape[1] > 0:
            k_new = _rows_gather(k, idx_k)
            v_new = _rows_gather(v, idx_k)
            bias_cols = None if self.bias is None else self.bias.cols(qa, idx_k, tables, prepared)
            static = _static_shapes(q)
            # Eager, in blocks of query rows: each row's update is its own, and a block's logits
            # stay in cache through the passes over them (17 % faster at 1764 x 512 logits).
            step = nq if static else min(nq, self.key_chunk_rows)
            workspace = None if static else self._scratch((b, h, step, 2 * idx_k.shape[1]), acc, q.device)
            q_scaled = qa * self.scale
            k_old, v_old = _rows_gather(self.k_ref, idx_k).to(acc), _rows_gather(self.v_ref, idx_k).to(acc)
            k_new_acc, v_new_acc = k_new.to(acc), v_new.to(acc)
            for start in range(0, nq, step):
                rows = slice(start, min(nq, start + step))
                count = rows.stop - rows.start
                key_update_(
                    q_scaled[:, :, rows],
                    k_old,
                    k_new_acc,
                    v_old,
                    v_new_acc,
                    m[:, :, rows],
                    n[:, :, rows],
                    z[:, :, rows],
                    mag[:, :, rows],
                    # a bias may broadcast over the query rows (size 1 there): then it is whole
                    bias_cols if bias_cols is None or bias_cols.shape[2] == 1 else bias_cols[:, :, rows],
                    None if workspace is None else workspace[:, :, :count],
                )
            _rows_write_(self.k_ref, idx_k, k_new)
            _rows_write_(self.v_ref, idx_k, v_new)
        # Rows outside idx_k are unchanged by contract, so k_ref, v_ref now equal k, v; they
        # are contiguous, which the row recompute's matmuls prefer to views of a qkv buffer.
        ka, va = self.k_ref.to(acc), self.v_ref.to(acc)

        # 2. cancellation ratio z / mag per row; NaN or z <= 0 count as worst
        ratio = torch.where(z > 0, z / mag, torch.full_like(z, -1.0))
        ratio.view(-1).index_fill_(0, _flat_rows(idx_q, h, nq), float("inf"))
        restarting = self._take_fresh()
        if restarting is not None:  # their state is recomputed below: never worst, no fallback
            ratio.index_fill_(0, restarting.to(ratio.device), float("inf"))
        self._worst_ratio.copy_(ratio.amin().clamp_max(1.0))
        torch.minimum(self._worst_ratio_seen, self._worst_ratio, out=self._worst_ratio_seen)
        c = min(self.repair_rows, nq)
        rows = _expand_heads(idx_q, h)
        q_rows = _rows_gather(qa, idx_q)
        if c > 0:
            worst, repair = torch.topk(ratio, c, dim=2, largest=False, sorted=False)  # (B,H,c)
            rows = torch.cat([rows, repair], dim=2)
            q_rows = torch.cat([q_rows, _rows_gather(qa, repair)], dim=2)
        else:
            worst = ratio[..., :0]

        # 3. recompute changed query rows and repair rows from scratch
        if rows.shape[2] > 0:
            m_r, n_r, z_r = row_softmax_state(q_rows, rows, ka, va, self.scale, self.bias, tables, prepared)
            flat = _flat_rows(rows, h, nq)
            _entries_write_(m, flat, m_r)
            _entries_write_(z, flat, z_r)
            _entries_write_(mag, flat, z_r)
            _rows_write_(n, rows, n_r)
            ratio.view(-1).index_fill_(0, flat, float("inf"))
        self._worst_ratio_after.copy_(ratio.amin().clamp_max(1.0))

        # 4. fallback: a full recompute when a row not recomputed is still too inexact
        min_ratio = _ERROR_PER_EPS * torch.finfo(acc).eps / (self.max_relative_error or 1e-4)
        self._repaired.copy_((worst < min_ratio).sum())
        if self.max_relative_error is not None:
            need = self._worst_ratio_after < min_ratio
            self._refreshed.copy_(need.long())
            self._refresh_count.add_(need.long())
            if torch.compiler.is_compiling():
                # Compiled graphs keep static control flow: the fallback is not applied there
                # (torch.cond over the state trips inductor's aliasing check); the repair rows
                # still are, and stats["refreshed"] tells the caller to reset() the stream.
                pass
            elif not _static_shapes(need) and bool(need):  # eager: one bool read on the host
                m_f, n_f, z_f = self._full_state(qa, ka, va, tables)
                m.copy_(m_f)
                n.copy_(n_f)
                z.copy_(z_f)
                mag.copy_(z_f)
        else:
            self._refreshed.zero_()
        if restarting is not None:
            self._restart_streams(q, k, v, tables, restarting)
        return (n / z[..., None]).to(q.dtype)


# ============================================================================= paper


def group_changes(index: Tensor, tokens: int, slots: Tensor, capacity: int | None) -> Tensor:
    """Per group the positions to update, from the changed tokens of each stream.

    index (B, r): changed tokens per stream; slots (R, n): for every group row and position
    1 + the token's flat index b * tokens + t (0: a position that holds no token). Returns
    (R, c) distinct positions per row, the changed ones first, padded with unchanged ones (an
    update of an unchanged row is exact, only wasted). c = ``capacity``, or when None the
    largest number of changes in a row (a host sync)."""
    streams, r = index.shape
    flat = index + torch.arange(streams, device=index.device).unsqueeze(1) * tokens
    changed = torch.zeros(streams * tokens + 1, dtype=torch.bool, device=index.device)
    changed[flat.reshape(-1) + 1] = True
    changed[0] = False
    mask = changed[slots]  # (R, n)
    n = slots.shape[1]
    c = capacity if capacity is not None else max(1, int(mask.sum(dim=1).max()))
    order = torch.arange(n, 0, -1, device=index.device)  # ties: the lowest position first
    # integer scores: index bookkeeping, not arithmetic of the model (no float op to count)
    return (mask.long() * (n + 1) + order).topk(min(c, n), dim=1).indices


class GroupedDeltaAttention(ExactDeltaAttention):
    """Exact delta attention within groups of tokens (windows, divided space-time groups).

    q, k, v come as (R, 1, n, d): every row a group of n positions that attend to each other,
    each row its own stream of ExactDeltaAttention. ``group_ids`` (R, n) holds the global token
    id at each position (``offset`` + b N + t + 1; 0 for padding). The index inputs are the
    regions' per-stream token indices (B, r); each call turns them into per-row positions with
    :func:`group_changes`: in eager mode as many per row as the most changed row needs, under
    torch.compile and in FLOP counts (static shapes) min(r, n).
    """

    def __init__(
        self,
        scale: float,
        bias=None,
        *,
        group_ids: Tensor,
        offset: int,
        streams: int,
        tokens: int,
        heads: int = 1,
        **options,
    ):
        super().__init__(scale, bias, **options)
        # the last output of every group along the recompute path (stream state, saved with it)
        self.register_buffer("_group_out", None, persistent=False)
        self.heads = heads  # rows are (group, head) pairs, heads fastest: a bias table is per group
        slots = torch.where(group_ids > 0, group_ids - offset, torch.zeros_like(group_ids)).long()
        self.register_buffer("slots", slots, persistent=False)
        self.streams, self.tokens = streams, tokens

    def _positions(self, index: Tensor, q: Tensor) -> Tensor:
        static = _static_shapes(q)
        capacity = min(index.shape[1], self.slots.shape[1]) if static else None
        return group_changes(index, self.tokens, self.slots, capacity)

    def _grouped_bias(self, table: Tensor, rows: int) -> Tensor:
        """A logit table broadcastable to (groups, heads, n, n) (Swin's relative position bias,
        its shifted-window mask per window) as (rows, 1, n, n)."""
        n_q, n_k = table.shape[-2:]
        table = table.reshape(-1, *table.shape[-3:]) if table.dim() >= 4 else table.reshape(1, -1, n_q, n_k)
        groups = rows // self.heads
        if table.shape[0] not in (1, groups):  # a per-window table repeats for every stream
            table = table.repeat(groups // table.shape[0], 1, 1, 1)
        return table.expand(groups, self.heads, n_q, n_k).reshape(rows, 1, n_q, n_k)

    def grouped_tables(self, tables: Sequence[Tensor], rows: int) -> tuple[Tensor, ...]:
        """The logit-term tables as the rows see them (a bias table per row)."""
        if tables and isinstance(self.bias, ConstantBias):
            return (self._grouped_bias(tables[0], rows), *tables[1:])
        return tuple(tables)

    #: whether a full recompute leaves out the groups that did not change (off: every group)
    skip_unchanged_groups: bool = True

    def reset(self) -> None:
        super().reset()
        self._group_out = None

    def state_bytes(self) -> int:
        out = self._group_out
        return super().state_bytes() + (0 if out is None else out.numel() * out.element_size())

    def reset_stream(self, b: int) -> None:
        super().reset_stream(b)
        self._group_out = None  # the next recompute takes every group

    def forward(self, q, k, v, idx_q, idx_k, tables=()):
        tables = self.grouped_tables(tables, q.shape[0])
        if idx_q is None or idx_k is None:
            self._group_out = None
            return super().forward(q, k, v, None, None, tables)
        kept = self._kept_output(q, k, v, idx_q, idx_k)
        if kept is not None:
            return kept
        return self._keep_output(self._grouped(q, k, v, idx_q, idx_k, tables), q, k, v)

    def _grouped(self, q, k, v, idx_q, idx_k, tables) -> Tensor:
        rows_q = self._positions(idx_q, q)
        rows_k = rows_q if idx_k is idx_q else self._positions(idx_k, q)
        if (
            self.full_when_cheaper
            and self.skip_unchanged_groups
            and not _static_shapes(q)
            and _get_current_dispatch_mode() is None  # a FLOP counter counts every group
            and self.delta_is_costlier(q.shape, v.shape[3], k.shape[2], rows_q.shape[1], rows_k.shape[1])
        ):
            return self._checked(self._recompute_changed_groups(q, k, v, idx_q, idx_k, tables))
        self._group_out = None
        return super().forward(q, k, v, rows_q, rows_k, tables)

    def _changed_groups(self, idx_q: Tensor, idx_k: Tensor) -> Tensor:
        """The rows (groups x heads) holding a changed query, key or value position."""
        streams = idx_q.shape[0]
        changed = torch.zeros(streams * self.tokens + 1, dtype=torch.bool, device=idx_q.device)
        base = torch.arange(streams, device=idx_q.device).unsqueeze(1) * self.tokens + 1
        for index in (idx_q,) if idx_k is idx_q else (idx_q, idx_k):
            changed[(index + base).reshape(-1)] = True
        changed[0] = False
        return changed[self.slots].any(dim=1).nonzero().squeeze(1)

    def _recompute_changed_groups(self, q, k, v, idx_q, idx_k, tables) -> Tensor:
        """Fused attention on the groups that changed; the others keep their last output.

        A group none of whose positions changed has the same q, k, v (and so the same bias) as
        in the last call, so its output is the one computed then. Eager only (the set of groups
        is data-dependent); holds one output per group as state, and no delta state."""
        self._needs_init = True  # the delta state is not kept along this path
        self._fresh_streams = ()
        cached = self._group_out
        out_shape = (*q.shape[:3], v.shape[3])
        if (
            cached is None
            or tuple(cached.shape) != out_shape
            or cached.dtype != q.dtype
            or cached.device != q.device
        ):
            cached = self._fused(q, k, v, tables, None)
        else:
            rows = self._changed_groups(idx_q, idx_k)
            if rows.numel() == q.shape[0]:
                cached = self._fused(q, k, v, tables, None)
            elif rows.numel() > 0:
                cached.index_copy_(0, rows, self._fused(q, k, v, tables, rows))
        self._group_out = cached
        return cached.clone()  # callers may write into their input; the cache stays ours

    def _fused(self, q, k, v, tables, rows: Tensor | None) -> Tensor:
        if rows is None:
            bias = None if self.bias is None else self.bias.full(q, tables).to(q.dtype)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        q_rows, k_rows, v_rows = (t.index_select(0, rows) for t in (q, k, v))
        if self.bias is None:
            bias = None
        elif isinstance(self.bias, ConstantBias):  # its table may hold one entry per group
            bias = self.bias.full(q, tables).index_select(0, rows)
        else:  # the other biases depend on the row's own q only
            bias = self.bias.full(q_rows, tables)
        bias = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q_rows, k_rows, v_rows, attn_mask=bias, scale=self.scale)


class PaperDeltaAttention(_StreamState, nn.Module):
    """The paper's delta attention (Eventful Transformers, sec. 4), for comparison.

    State: logits L (B,H,Nq,Nk), the attention A_ref (B,H,Nq,Nk) and values V_ref
    (B,H,Nk,dv) last used per key column, and Y = A_ref @ V_ref (B,H,Nq,dv).
    Per call: L[Sq, :] and L[:, Sk] are recomputed, A = softmax(L) (over the whole
    N x N matrix, every call), then only the columns of changed keys are refreshed:
        Y += A[:, Sk] V[Sk] - A_ref[:, Sk] V_ref[Sk];  A_ref[:, Sk] = A[:, Sk];
        V_ref[Sk] = V[Sk].
    Exact when every token is selected.  Otherwise approximate: a changed logit in row
    i renormalises the whole row of A, but Y keeps the stale weights A_ref[i, j] of
    every column j outside Sk (and a changed query row i is only refreshed in the
    columns Sk), so Y drifts from softmax(L) V.

    Same forward signature as ``ExactDeltaAttention``.
    """

    def __init__(self, scale: float, bias: AttentionBias | None = None, site_name: str = ""):
        super().__init__()
        self.site_name = site_name
        self.scale = _check_scale(scale)
        self.bias = _check_bias(bias)
        for name in ("logits", "a_ref", "v_ref", "y"):
            self.register_buffer(name, None, persistent=False)
        self._needs_init = True

    def reset(self) -> None:
        """The next call is a full initialisation."""
        self._needs_init = True
        self._fresh_streams = ()
        self._forget_output()

    def reset_stream(self, b: int) -> None:
        """Stream b restarts: the next call re-initialises stream b's state (logits, A_ref,
        V_ref, Y rows) from the buffers and leaves the other streams' state alone."""
        self._mark_stream(b, None if self.y is None else self.y.shape[0])

    def state_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.logits, self.a_ref, self.v_ref, self.y)
            if t is not None
        )

    @staticmethod
    def state_bytes_for(B: int, H: int, N: int, d: int, dv: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of state for Nq = Nk = N, without allocating (d is unused: no k copy)."""
        return B * H * N * (2 * N + 2 * dv) * _elsize(dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}, bias={self.bias!r}"

    def preallocate(
        self,
        q_shape: Sequence[int],
        k_shape: Sequence[int],
        v_shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        """Allocate the state for these (B,H,N,d) shapes now rather than on the first call."""
        b, h, nq, _ = q_shape
        nk, dv = k_shape[2], v_shape[3]
        self.logits = torch.empty((b, h, nq, nk), dtype=dtype, device=device)
        self.a_ref = torch.empty_like(self.logits)
        self.v_ref = torch.empty(tuple(v_shape), dtype=dtype, device=device)
        self.y = torch.empty((b, h, nq, dv), dtype=dtype, device=device)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        idx_q: Tensor | None,
        idx_k: Tensor | None,
        tables: Sequence[Tensor] = (),
    ) -> Tensor:
        _check_qkv(q, k, v)
        if (idx_q is None) != (idx_k is None):
            raise ValueError(
                "idx_q and idx_k must both be LongTensors (B, R) or both be None (full initialisation)"
            )
        tables = tuple(tables)
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        shape_ok = (
            self.logits is not None
            and self.logits.shape == (b, h, nq, nk)
            and self.v_ref.shape == v.shape
            and self.y.dtype == q.dtype
        )
        if idx_q is None or self._needs_init or not shape_ok:
            logits = (q * self.scale) @ k.transpose(-1, -2)
            if self.bias is not None:
                logits = logits + self.bias.full(q, tables)
            a = torch.softmax(logits, dim=-1)
            if not shape_ok:
                self.preallocate(q.shape, k.shape, v.shape, q.dtype, q.device)
            self.logits.copy_(logits)
            self.a_ref.copy_(a)
            self.v_ref.copy_(v)
            self.y.copy_(a @ v)
            self._needs_init = False
            self._fresh_streams = ()
            return self._checked(self.y.clone())
        _check_idx("idx_q", idx_q, b, nq)
        _check_idx("idx_k", idx_k, b, nk)
        kept = self._kept_output(q, k, v, idx_q, idx_k)
        if kept is not None:
            return kept
        return self._keep_output(self._update(q, k, v, idx_q, idx_k, tables), q, k, v)

    def _update(self, q, k, v, idx_q, idx_k, tables) -> Tensor:
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        if idx_q.shape[1] > 0:
            q_rows = _rows_gather(q, idx_q)
            l_rows = (q_rows * self.scale) @ k.transpose(-1, -2)
            if self.bias is not None:
                l_rows = l_rows + self.bias.rows(q_rows, idx_q, tables)
            qidx = _expand_heads(idx_q, h)[..., None].expand(b, h, idx_q.shape[1], nk)
            self.logits.scatter_(2, qidx, l_rows)
        if idx_k.shape[1] > 0:
            k_cols = _rows_gather(k, idx_k)
            l_cols = (q * self.scale) @ k_cols.transpose(-1, -2)
            if self.bias is not None:
                l_cols = l_cols + self.bias.cols(q, idx_k, tables)
            cidx = idx_k[:, None, None, :].expand(b, h, nq, idx_k.shape[1])
            self.logits.scatter_(3, cidx, l_cols)
            a = torch.softmax(self.logits, dim=-1)
            a_new = a.gather(3, cidx)
            a_old = self.a_ref.gather(3, cidx)
            v_new = _rows_gather(v, idx_k)
            v_old = _rows_gather(self.v_ref, idx_k)
            self.y.add_(a_new @ v_new - a_old @ v_old)
            self.a_ref.scatter_(3, cidx, a_new)
            kidx = _expand_heads(idx_k, h)[..., None].expand(b, h, idx_k.shape[1], v.shape[3])
            self.v_ref.scatter_(2, kidx, v_new)
        restarting = self._take_fresh()
        if restarting is not None:
            self._restart_streams(q, k, v, tables, restarting.to(q.device))
        return self._checked(self.y.clone())

    def _restart_streams(self, q, k, v, tables, streams: Tensor) -> None:
        """Stream rows ``streams`` of the state computed from scratch from q, k, v."""
        picked = _stream_inputs(q, k, v, tables, self.bias, streams)
        if picked is None:
            qs, ks, vs, ts = q, k, v, tables
        else:
            qs, ks, vs, ts = picked
        logits = (qs * self.scale) @ ks.transpose(-1, -2)
        if self.bias is not None:
            logits = logits + self.bias.full(qs, ts)
        a = torch.softmax(logits, dim=-1)
        y = a @ vs
        if picked is None:
            logits, a, vs, y = (t.index_select(0, streams) for t in (logits, a, vs, y))
        self.logits.index_copy_(0, streams, logits)
        self.a_ref.index_copy_(0, streams, a)
        self.v_ref.index_copy_(0, streams, vs)
        self.y.index_copy_(0, streams, y)
