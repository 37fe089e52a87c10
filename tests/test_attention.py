"""Delta attention: exactness against dense attention over random streams, biases, the
numerical hazards of the delta form (overflow, cancellation), state handling, errors."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from evtrace.runtime.attention import (
    ConstantBias,
    DecomposedRelPos,
    ExactDeltaAttention,
    PaperDeltaAttention,
    dense_attention,
)

# ----------------------------------------------------------------------------- helpers


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|, NaN and inf count as infinitely wrong."""
    e = (y.double() - ref.double()).abs().max().item()
    return e / ref.abs().max().item() if math.isfinite(e) else math.inf


def random_rows(gen: torch.Generator, b: int, n: int, r: int) -> torch.Tensor:
    """(B, r) distinct indices per batch row, different rows per batch row."""
    return torch.stack([torch.randperm(n, generator=gen)[:r] for _ in range(b)])


def replace_rows(x: torch.Tensor, idx: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """x (B,H,N,c) with rows idx (B,R) of every head replaced by new (B,H,R,c)."""
    index = idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return x.scatter(2, index, new)


class Stream:
    """Random q, k, v buffers where each frame changes random rows (per batch row)."""

    def __init__(self, b, h, nq, nk, d, dv, seed=0, scale_qk=1.0, dtype=torch.float32):
        self.gen = torch.Generator().manual_seed(seed)
        self.s, self.dtype = scale_qk, dtype
        self.q = self.randn(b, h, nq, d) * scale_qk
        self.k = self.randn(b, h, nk, d) * scale_qk
        self.v = self.randn(b, h, nk, dv)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)

    def step(self, rq: int, rk: int, mode: str = "replace", same_rows: bool = False):
        """Change rq query rows and rk key/value rows; returns (idx_q, idx_k).

        same_rows: the same tokens change in q, k and v (one gate before the qkv
        projection; needs Nq = Nk and rq = rk).
        """
        b, h, nq, d = self.q.shape
        nk, dv = self.k.shape[2], self.v.shape[3]
        idx_q = random_rows(self.gen, b, nq, rq)
        idx_k = idx_q if same_rows else random_rows(self.gen, b, nk, rk)
        if mode == "replace":  # fresh tokens: the harshest change
            new_q = self.randn(b, h, rq, d) * self.s
            new_k = self.randn(b, h, rk, d) * self.s
            new_v = self.randn(b, h, rk, dv)
        else:  # "drift": the changed tokens move by 30 % (video-like)
            a = 0.3
            gq = self.q.gather(2, idx_q[:, None, :, None].expand(-1, h, -1, d))
            gk = self.k.gather(2, idx_k[:, None, :, None].expand(-1, h, -1, d))
            gv = self.v.gather(2, idx_k[:, None, :, None].expand(-1, h, -1, dv))
            new_q = (gq + a * self.s * self.randn(*gq.shape)) / math.sqrt(1 + a * a)
            new_k = (gk + a * self.s * self.randn(*gk.shape)) / math.sqrt(1 + a * a)
            new_v = gv + a * self.randn(*gv.shape)
        self.q = replace_rows(self.q, idx_q, new_q)
        self.k = replace_rows(self.k, idx_k, new_k)
        self.v = replace_rows(self.v, idx_k, new_v)
        return idx_q, idx_k

    def qkv(self):
        return self.q.to(self.dtype), self.k.to(self.dtype), self.v.to(self.dtype)


def calibrated_stream(spread: float, seed: int, b=1, h=4, n=300, d=32) -> Stream:
    """A stream whose largest per-row logit spread (max - min) is about ``spread``."""
    s = Stream(b, h, n, n, d, d, seed=seed)
    logits = d**-0.5 * s.q @ s.k.transpose(-1, -2)
    factor = math.sqrt(spread / (logits.amax(-1) - logits.amin(-1)).max().item())
    s.q, s.k, s.s = s.q * factor, s.k * factor, factor
    return s


def hazard_error(spread, repair_rows, mode, seed=0, frames=100, fallback=None, r=40):
    """Worst relative error of fp32 ExactDeltaAttention against fp64 dense over a stream
    (H 4, N 300, d 32, r of 300 tokens changed per frame), and the number of fallbacks."""
    s = calibrated_stream(spread, seed)
    scale = 32**-0.5
    mod = ExactDeltaAttention(scale, repair_rows=repair_rows, max_relative_error=fallback)
    mod(*s.qkv(), None, None)
    worst, refreshes = 0.0, 0
    for _ in range(frames):
        idx_q, idx_k = s.step(r, r, mode, same_rows=True)
        y = mod(*s.qkv(), idx_q, idx_k)
        worst = max(worst, rel_err(y, dense_attention(s.q, s.k, s.v, scale)))
        refreshes += int(mod.stats["refreshed"])
    return worst, refreshes


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("repair_rows", [0, 8])
@pytest.mark.parametrize("chunk", [256, 7], ids=["one-block", "blocks-of-7-rows"])
def test_exact_delta_equals_dense_over_stream(repair_rows, chunk):
    b, h, n, d = 2, 3, 40, 8
    s = Stream(b, h, n, n, d, d, seed=1)
    scale = d**-0.5
    mod = ExactDeltaAttention(scale, repair_rows=repair_rows)
    mod.key_chunk_rows = chunk  # the key update in blocks of query rows: 40 = 5 x 7 + 5
    y = mod(*s.qkv(), None, None)
    assert rel_err(y, dense_attention(s.q, s.k, s.v, scale)) <= 1e-5
    sizes = [(5, 7), (0, 4), (6, 0), (0, 0), (40, 40), (1, 1), (20, 3)]
    for frame in range(56):
        rq, rk = sizes[frame % len(sizes)]
        idx_q, idx_k = s.step(rq, rk)
        y = mod(*s.qkv(), idx_q, idx_k)
        assert y.shape == (b, h, n, d) and y.dtype == torch.float32
        err = rel_err(y, dense_attention(s.q, s.k, s.v, scale))
        assert err <= 1e-5, f"frame {frame}: relative error {err:.2e}"


def test_exact_delta_cross_attention_and_dv():
    """Nq != Nk, dv != d, a row both in idx_q and among the changed keys."""
    s = Stream(2, 2, 12, 30, 8, 5, seed=2)
    mod = ExactDeltaAttention(0.3)
    mod(*s.qkv(), None, None)
    for _ in range(10):
        idx_q, idx_k = s.step(4, 6)
        y = mod(*s.qkv(), idx_q, idx_k)
        assert y.shape == (2, 2, 12, 5)
        assert rel_err(y, dense_attention(s.q, s.k, s.v, 0.3)) <= 1e-5


def test_exact_delta_batch_rows_are_independent_streams():
    """Batch row 1 changing must not disturb row 0, and each row equals its own dense."""
    s = Stream(2, 2, 20, 20, 4, 4, seed=3)
    mod = ExactDeltaAttention(0.5)
    mod(*s.qkv(), None, None)
    for _ in range(5):
        idx_q, idx_k = s.step(3, 3)
        y = mod(*s.qkv(), idx_q, idx_k)
        for bb in range(2):
            ref = dense_attention(s.q[bb : bb + 1], s.k[bb : bb + 1], s.v[bb : bb + 1], 0.5)
            assert rel_err(y[bb : bb + 1], ref) <= 1e-5


def test_paper_delta_exact_with_every_token_and_approximate_otherwise():
    b, h, n, d = 2, 3, 40, 8
    scale = d**-0.5
    every = Stream(b, h, n, n, d, d, seed=4)
    partial = Stream(b, h, n, n, d, d, seed=4)
    full_mod, part_mod = PaperDeltaAttention(scale), PaperDeltaAttention(scale)
    full_mod(*every.qkv(), None, None)
    part_mod(*partial.qkv(), None, None)
    all_rows = torch.arange(n).expand(b, n)
    worst_partial = 0.0
    for _ in range(10):
        every.step(6, 6)
        y = full_mod(*every.qkv(), all_rows, all_rows)
        assert rel_err(y, dense_attention(every.q, every.k, every.v, scale)) <= 1e-5
        idx_q, idx_k = partial.step(6, 6)
        y = part_mod(*partial.qkv(), idx_q, idx_k)
        worst_partial = max(
            worst_partial, rel_err(y, dense_attention(partial.q, partial.k, partial.v, scale))
        )
    assert worst_partial > 1e-2, "the paper's scheme must be approximate with partial updates"


# ----------------------------------------------------------------------------- biases


def vitdet_add_decomposed_rel_pos(attn, q, rh, rw, q_size, k_size):
    """ViTDet's add_decomposed_rel_pos (detectron2), verbatim up to names."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    bsz, _, dim = q.shape
    r_q = q.reshape(bsz, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    attn = (attn.view(bsz, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).view(
        bsz, q_h * q_w, k_h * k_w
    )
    return attn


def relpos_case(seed=5, b=2, h=3, q_grid=(5, 8), k_grid=(4, 6), d=8):
    g = torch.Generator().manual_seed(seed)
    nq, nk = q_grid[0] * q_grid[1], k_grid[0] * k_grid[1]
    tables = (
        torch.randn(q_grid[0], k_grid[0], d, generator=g, dtype=torch.float64),
        torch.randn(q_grid[1], k_grid[1], d, generator=g, dtype=torch.float64),
    )
    return DecomposedRelPos(q_grid, k_grid), tables, Stream(b, h, nq, nk, d, d, seed=seed)


def test_decomposed_rel_pos_matches_vitdet():
    bias, tables, s = relpos_case()
    b, h, nq, d = s.q.shape
    nk = s.k.shape[2]
    scale = d**-0.5
    attn = (s.q * scale) @ s.k.transpose(-1, -2)
    want = vitdet_add_decomposed_rel_pos(
        attn.reshape(b * h, nq, nk), s.q.reshape(b * h, nq, d), tables[0], tables[1], bias.q_grid, bias.k_grid
    )
    full = bias.full(s.q, tables)
    torch.testing.assert_close(attn + full, want.reshape(b, h, nq, nk))
    idx = random_rows(s.gen, b, nq, 7)
    q_rows = s.q.gather(2, idx[:, None, :, None].expand(-1, h, -1, d))
    torch.testing.assert_close(
        bias.rows(q_rows, idx, tables), full.gather(2, idx[:, None, :, None].expand(-1, h, -1, nk))
    )
    per_head = torch.stack([random_rows(s.gen, b, nq, 7) for _ in range(h)], dim=1)  # (B,H,R)
    q_rows = s.q.gather(2, per_head[..., None].expand(-1, -1, -1, d))
    torch.testing.assert_close(
        bias.rows(q_rows, per_head, tables), full.gather(2, per_head[..., None].expand(-1, -1, -1, nk))
    )
    cols = random_rows(s.gen, b, nk, 5)
    torch.testing.assert_close(
        bias.cols(s.q, cols, tables), full.gather(3, cols[:, None, None, :].expand(-1, h, nq, -1))
    )
    prepared = bias.prepare(s.q, tables)  # the shared factor tables give the same entries
    torch.testing.assert_close(
        bias.rows(q_rows, per_head, tables, prepared),
        full.gather(2, per_head[..., None].expand(-1, -1, -1, nk)),
    )
    torch.testing.assert_close(
        bias.cols(s.q, cols, tables, prepared), full.gather(3, cols[:, None, None, :].expand(-1, h, nq, -1))
    )


@pytest.mark.parametrize("chunk", [256, 5], ids=["one-block", "blocks-of-5-rows"])
@pytest.mark.parametrize("kind", ["relpos", "constant", "constant-from-tables", "key-mask"])
def test_delta_modules_with_bias_equal_dense(kind, chunk):
    bias, tables, s = relpos_case()
    b, h, nq, d = s.q.shape
    nk = s.k.shape[2]
    g = torch.Generator().manual_seed(9)
    if kind == "constant":
        bias, tables = ConstantBias(torch.randn(h, nq, nk, generator=g)), ()
    elif kind == "constant-from-tables":
        bias, tables = ConstantBias(), (torch.randn(b, 1, nq, nk, generator=g),)
    elif kind == "key-mask":  # broadcast over heads and queries, -inf masks two keys
        mask = torch.zeros(1, 1, 1, nk)
        mask[..., :2] = -math.inf
        bias, tables = ConstantBias(mask), ()
    scale = d**-0.5
    exact = ExactDeltaAttention(scale, bias=bias)
    exact.key_chunk_rows = chunk
    paper = PaperDeltaAttention(scale, bias=bias)
    tables32 = tuple(t.float() for t in tables)
    exact(*s.qkv(), None, None, tables32)
    paper(*s.qkv(), None, None, tables32)
    all_rows = torch.arange(nq).expand(b, nq), torch.arange(nk).expand(b, nk)
    for _ in range(8):
        idx_q, idx_k = s.step(6, 5)
        ref = dense_attention(s.q, s.k, s.v, scale, bias, tables)
        assert rel_err(exact(*s.qkv(), idx_q, idx_k, tables32), ref) <= 1e-5
        assert rel_err(paper(*s.qkv(), *all_rows, tables32), ref) <= 1e-5


# ----------------------------------------------------------------------------- hazards

# Measured with hazard_error (worst relative error over 200 frames and 3 seeds, fp32 against
# fp64 dense, H 4, N 300, d 32, 40 tokens changed per frame in q, k, v; "spread" is the
# largest per-row logit max - min; fp32 dense itself: 7e-7, 9e-7, 2e-6, 4e-6):
#   spread              17      38      70      150
#   replace c=0         3e-5    2e-2    inf     inf
#   replace c=8         2e-6    6e-6    8e-5    1e-1
#   drift   c=0         4e-6    9e-4    5e-1    inf
#   drift   c=8         2e-6    2e-6    3e-6    7e-5
# With the fallback (max_relative_error=1e-4, the default) every case stays <= 8e-5;
# full refreshes per 200 frames: replace c=8 0 / 0 / 4-9 / ~200, drift c=8 0 / 0 / 0 / 7-10,
# c=0 up to every frame.


def test_peaky_logits_spread_70_with_repair_rows_holds_1e4():
    # video-like drift: the repair rows alone hold the error
    err, _ = hazard_error(70, 8, "drift", frames=60)
    assert err <= 1e-4
    # fresh tokens every frame: repair rows plus the fallback (the default)
    err, refreshes = hazard_error(70, 8, "replace", frames=60, fallback=1e-4)
    assert err <= 1e-4
    assert refreshes < 30


def test_peaky_logits_without_repair_is_the_hazard():
    """Without repair rows and fallback, cancellation ruins rows at spread 70."""
    err, _ = hazard_error(70, 0, "replace", frames=40)
    assert err > 1e-3
    err, refreshes = hazard_error(70, 0, "replace", frames=20, fallback=1e-4)
    assert err <= 1e-4 and refreshes > 0  # the fallback catches it


def test_cancellation_stats_report_worst_ratio():
    s = Stream(1, 1, 4, 4, 2, 2, seed=0)
    s.q = torch.ones(1, 1, 4, 2, dtype=torch.float64)
    s.k = torch.zeros(1, 1, 4, 2, dtype=torch.float64)
    s.k[0, 0, 0] = 15.0  # key 0 holds all the weight of every row
    mod = ExactDeltaAttention(1.0, repair_rows=1, max_relative_error=None)
    mod(*s.qkv(), None, None)
    s.k[0, 0, 0] = 0.0  # removed: z / mag ~ exp(-30) in every row
    idx = torch.tensor([[0]])
    y = mod(*s.qkv(), torch.zeros(1, 0, dtype=torch.long), idx)
    assert mod.stats["worst_ratio"].item() < 1e-10
    assert mod.stats["worst_ratio_seen"].item() < 1e-10
    assert mod.last_repaired.item() == 1  # one repair row per head, it needed it
    assert mod.stats["worst_ratio_after"].item() < 1e-10  # three rows still broken
    assert mod.stats["refreshed"].item() == 0
    # the fallback recomputes the site
    mod = ExactDeltaAttention(1.0, repair_rows=1)
    s.k[0, 0, 0] = 15.0
    mod(*s.qkv(), None, None)
    s.k[0, 0, 0] = 0.0
    y = mod(*s.qkv(), torch.zeros(1, 0, dtype=torch.long), idx)
    assert mod.stats["refreshed"].item() == 1 and mod.stats["refresh_count"].item() == 1
    assert rel_err(y, dense_attention(s.q, s.k, s.v, 1.0)) <= 1e-6


def test_overflow_new_logits_far_above_stabiliser():
    b, h, n, d = 2, 2, 20, 4
    s = Stream(b, h, n, n, d, d, seed=6)
    s.q[..., 0] = 1.0 + s.q[..., 0].abs()  # every query has a positive first component
    mod = ExactDeltaAttention(1.0)
    mod(*s.qkv(), None, None)
    idx = random_rows(s.gen, b, n, 2)
    new_k = torch.zeros(b, h, 2, d, dtype=torch.float64)
    new_k[..., 0] = 400.0  # logits jump by >= 400: exp(l - m_old) overflows fp32
    s.k = replace_rows(s.k, idx, new_k)
    empty = torch.zeros(b, 0, dtype=torch.long)
    y = mod(*s.qkv(), empty, idx)
    assert torch.isfinite(y).all()
    assert rel_err(y, dense_attention(s.q, s.k, s.v, 1.0)) <= 1e-5
    # and back: the keys that held all the weight leave again (cancellation -> repair)
    s.k = replace_rows(s.k, idx, s.randn(b, h, 2, d))
    y = mod(*s.qkv(), empty, idx)
    assert torch.isfinite(y).all()
    assert rel_err(y, dense_attention(s.q, s.k, s.v, 1.0)) <= 1e-5


# ----------------------------------------------------------------------------- state


class RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append((t.numel(), str(func), tuple(t.shape)))
        return out


def test_no_n_by_n_tensor_and_state_allocated_once():
    b, h, n, d = 1, 2, 64, 4
    s = Stream(b, h, n, n, d, d, seed=7)
    mod = ExactDeltaAttention(0.5, repair_rows=4, init_chunk_rows=16)
    rec = RecordShapes()
    with rec:
        mod(*s.qkv(), None, None)
    ptrs = [t.data_ptr() for t in (mod.k_ref, mod.v_ref, mod.m, mod.n, mod.z, mod.mag)]
    for _ in range(3):
        idx_q, idx_k = s.step(6, 6)
        with rec:
            y = mod(*s.qkv(), idx_q, idx_k)
    assert rel_err(y, dense_attention(s.q, s.k, s.v, 0.5)) <= 1e-5
    biggest = max(rec.numels)
    assert biggest[0] <= b * h * n * n // 4, f"an N x N sized temporary: {biggest}"
    assert ptrs == [t.data_ptr() for t in (mod.k_ref, mod.v_ref, mod.m, mod.n, mod.z, mod.mag)]
    assert mod.state_dict() == {} and PaperDeltaAttention(1.0).state_dict() == {}


def test_state_bytes():
    b, h, n, d, dv = 2, 3, 40, 8, 6
    s = Stream(b, h, n, n, d, dv, seed=8)
    exact, paper = ExactDeltaAttention(1.0), PaperDeltaAttention(1.0)
    assert exact.state_bytes() == 0 and paper.state_bytes() == 0
    exact(*s.qkv(), None, None)
    paper(*s.qkv(), None, None)
    assert exact.state_bytes() == ExactDeltaAttention.state_bytes_for(b, h, n, d, dv)
    assert exact.state_bytes() == b * h * n * (d + 2 * dv + 3) * 4
    assert paper.state_bytes() == PaperDeltaAttention.state_bytes_for(b, h, n, d, dv)
    assert paper.state_bytes() == b * h * n * (2 * n + 2 * dv) * 4
    # ViTDet-B global block at 1024 px: N = 4096, 12 heads of 64
    assert ExactDeltaAttention.state_bytes_for(
        1, 12, 4096, 64, 64
    ) * 40 < PaperDeltaAttention.state_bytes_for(1, 12, 4096, 64, 64)


def test_reset_and_reset_stream_reinitialise():
    s = Stream(2, 2, 16, 16, 4, 4, seed=10)
    mod = ExactDeltaAttention(0.5)
    mod(*s.qkv(), None, None)
    # a new video: everything changes, but after reset() the indices are ignored
    s2 = Stream(2, 2, 16, 16, 4, 4, seed=11)
    mod.reset()
    idx = torch.zeros(2, 1, dtype=torch.long)
    assert rel_err(mod(*s2.qkv(), idx, idx), dense_attention(s2.q, s2.k, s2.v, 0.5)) <= 1e-5
    # stream 1 restarts with a new video while stream 0 goes on
    s2.q[1], s2.k[1], s2.v[1] = s.q[1], s.k[1], s.v[1]
    mod.reset_stream(1)
    assert rel_err(mod(*s2.qkv(), idx, idx), dense_attention(s2.q, s2.k, s2.v, 0.5)) <= 1e-5
    with pytest.raises(ValueError, match=r"b must be a batch row index in \[0, 1\], got 2"):
        mod.reset_stream(2)
    # a new geometry (here a bigger batch) re-initialises
    s3 = Stream(3, 2, 16, 16, 4, 4, seed=12)
    assert rel_err(mod(*s3.qkv(), None, None), dense_attention(s3.q, s3.k, s3.v, 0.5)) <= 1e-5


def test_compiles_fullgraph():
    """Dynamo traces the whole delta call (fallback cond included) without a graph break."""
    bias, tables, s = relpos_case(b=1, h=2, q_grid=(3, 4), k_grid=(3, 4), d=4)
    tables = tuple(t.float() for t in tables)
    mod = ExactDeltaAttention(0.5, bias=bias, repair_rows=2)
    mod(*s.qkv(), None, None, tables)
    compiled = torch.compile(mod, fullgraph=True, backend="eager")
    for _ in range(2):
        idx_q, idx_k = s.step(3, 2)
        y = compiled(*s.qkv(), idx_q, idx_k, tables)
        assert rel_err(y, dense_attention(s.q, s.k, s.v, 0.5, bias, tables)) <= 1e-5


def test_jit_trace_for_fvcore():
    """fvcore counts FLOPs through torch.jit.trace: the delta call must trace."""
    s = Stream(1, 2, 10, 10, 4, 4, seed=13)
    mod = ExactDeltaAttention(0.5)
    mod(*s.qkv(), None, None)
    idx_q, idx_k = s.step(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(mod, (*s.qkv(), idx_q, idx_k), check_trace=False)
    assert isinstance(traced, torch.jit.ScriptModule)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda: ExactDeltaAttention("1"), TypeError, "scale must be a finite real number"),
        (lambda: ExactDeltaAttention(math.inf), ValueError, "scale must be a finite real number"),
        (
            lambda: ExactDeltaAttention(1.0, repair_rows=-1),
            ValueError,
            r"repair_rows must be an int >= 0, got -1",
        ),
        (
            lambda: ExactDeltaAttention(1.0, repair_rows=2.0),
            TypeError,
            r"repair_rows must be an int >= 0, got float 2.0",
        ),
        (
            lambda: ExactDeltaAttention(1.0, max_relative_error=0.0),
            ValueError,
            r"max_relative_error must be a real number in \(0, 1\) or None",
        ),
        (
            lambda: ExactDeltaAttention(1.0, init_chunk_rows=0),
            ValueError,
            "init_chunk_rows must be an int >= 1",
        ),
        (
            lambda: ExactDeltaAttention(1.0, bias=torch.zeros(3, 3)),
            TypeError,
            r"bias must be an AttentionBias \(ConstantBias, DecomposedRelPos\) or None",
        ),
        (lambda: PaperDeltaAttention(1.0, bias="x"), TypeError, "bias must be an AttentionBias"),
        (
            lambda: DecomposedRelPos((0, 4), (4, 4)),
            ValueError,
            r"q_grid must be a pair of ints >= 1 \(height, width\), got \(0, 4\)",
        ),
        (lambda: DecomposedRelPos((4, 4), 16), ValueError, "k_grid must be a pair of ints"),
        (lambda: ConstantBias([1.0]), TypeError, "bias must be a tensor with 1 to 4 dims"),
    ],
)
def test_constructor_errors(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_forward_errors():
    s = Stream(2, 2, 8, 8, 4, 4)
    mod = ExactDeltaAttention(1.0)
    q, k, v = s.qkv()
    with pytest.raises(ValueError, match=r"q must be a floating point tensor \(B, H, N, d\)"):
        mod(q[0], k, v, None, None)
    with pytest.raises(ValueError, match=r"k must have shape \(B, H, Nk, d\) = \(2, 2, Nk, 4\)"):
        mod(q, k[..., :3], v, None, None)
    with pytest.raises(ValueError, match=r"v must have shape \(B, H, Nk, dv\) = \(2, 2, 8, dv\)"):
        mod(q, k, v[:, :, :5], None, None)
    mod(q, k, v, None, None)
    idx = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="idx_q and idx_k must both be"):
        mod(q, k, v, idx, None)
    with pytest.raises(TypeError, match=r"idx_q must be a LongTensor \(B, R\)"):
        mod(q, k, v, idx.int(), idx)
    with pytest.raises(
        ValueError,
        match=r"idx_k must have shape \(B, R\) with B = 2 and "
        r"0 <= R <= 8, got \(1, 1\)",
    ):
        mod(q, k, v, idx, idx[:1])
    bias = DecomposedRelPos((2, 4), (2, 4))
    with pytest.raises(ValueError, match=r"expected Rh of shape \(qh, kh, d\) = \(2, 2, 4\)"):
        bias.full(q, (torch.zeros(2, 2, 3), torch.zeros(4, 4, 4)))
    with pytest.raises(ValueError, match=r"expects tables=\(Rh, Rw\), got 0 entries"):
        bias.full(q, ())
    with pytest.raises(ValueError, match="ConstantBias.None. takes its bias from tables"):
        ConstantBias().full(q, ())


# ----------------------------------------------------------------------------- property


@st.composite
def stream_cases(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    nq, nk = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    d, dv = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    frames = draw(st.lists(st.tuples(st.integers(0, nq), st.integers(0, nk)), min_size=1, max_size=4))
    return (
        b,
        h,
        nq,
        nk,
        d,
        dv,
        frames,
        draw(st.integers(0, 4)),
        draw(st.booleans()),
        draw(st.integers(0, 2**16)),
    )


@settings(max_examples=30, derandomize=True, deadline=None)
@given(stream_cases())
def test_property_exact_delta_equals_dense(case):
    b, h, nq, nk, d, dv, frames, repair_rows, with_bias, seed = case
    s = Stream(b, h, nq, nk, d, dv, seed=seed)
    bias = ConstantBias(torch.randn(h, nq, nk, generator=s.gen)) if with_bias else None
    mod = ExactDeltaAttention(0.7, bias=bias, repair_rows=repair_rows)
    mod(*s.qkv(), None, None)
    for rq, rk in frames:
        idx_q, idx_k = s.step(rq, rk)
        y = mod(*s.qkv(), idx_q, idx_k)
        assert rel_err(y, dense_attention(s.q, s.k, s.v, 0.7, bias)) <= 1e-5


def test_a_large_change_is_recomputed_in_full_when_that_multiplies_less(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=gen) for _ in range(3))
    mod = ExactDeltaAttention(8**-0.5, repair_rows=2, full_when_cheaper=True)
    mod.delta_overhead_macs = 0  # compare the multiply-adds alone, each as a fused one
    mod.delta_mac_cost = Fraction(1)
    assert mod.delta_is_costlier(q.shape, 8, 30, 10, 10)  # 30*20 + 12*30 = 960 >= 900 per (head, channel)
    assert not mod.delta_is_costlier(q.shape, 8, 30, 9, 9)  # 30*18 + 11*30 = 870 < 900
    mod.delta_mac_cost = Fraction(7, 5)
    assert mod.delta_is_costlier(q.shape, 8, 30, 9, 9)  # 1.4 * 870 >= 900
    assert not mod.delta_is_costlier(q.shape, 8, 30, 6, 6)  # 1.4 * (30*12 + 8*30) = 840 < 900
    mod.delta_mac_cost = Fraction(1)
    assert ExactDeltaAttention(1.0).delta_is_costlier((1, 12, 197, 64), 64, 197, 33, 33)  # small: overhead
    assert not ExactDeltaAttention(1.0).delta_is_costlier((1, 12, 1764, 64), 64, 1764, 256, 256)
    paths = []
    monkeypatch.setattr(
        mod, "_delta", lambda *a: paths.append("delta") or ExactDeltaAttention._delta(mod, *a)
    )
    monkeypatch.setattr(
        mod, "_initialise", lambda *a: paths.append("init") or ExactDeltaAttention._initialise(mod, *a)
    )
    mod(q, k, v, None, None)
    for r in (9, 10, 10, 9):
        idx = torch.randperm(30, generator=gen)[:r].unsqueeze(0)
        q[:, :, idx[0]] += 0.5
        k[:, :, idx[0]] -= 0.5
        out = mod(q, k, v, idx, idx)
        torch.testing.assert_close(out, dense_attention(q, k, v, 8**-0.5), atol=1e-5, rtol=1e-5)
    # r = 9 takes the delta path; r = 10 plain attention, keeping no state, so the next r = 9
    # starts from a full initialisation
    assert paths == ["init", "delta", "init"]
