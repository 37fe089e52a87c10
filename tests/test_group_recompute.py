"""Grouped attention (windows) recomputed in full: only the groups holding a changed position run;
the others keep their last output. Checked against attention written out in the test, with a spy
on the fused kernel, through resets and stream checkpoints of a windowed ViTDet."""

from __future__ import annotations

import pytest
import torch

import evtrace
import evtrace.runtime.attention as attention_module
from evtrace.runtime.attention import DecomposedRelPos, GroupedDeltaAttention
from evtrace.tools.coverage import families, output_tensor

GRID, WINDOW, HEADS, D = 4, 2, 2, 8  # a 4 x 4 token grid in four 2 x 2 windows
TOKENS = GRID * GRID


def _window_ids() -> torch.Tensor:
    """(groups x heads, positions): 1 + the token at each window position, heads fastest."""
    rows = []
    for wy in range(GRID // WINDOW):
        for wx in range(GRID // WINDOW):
            ids = [
                1 + (wy * WINDOW + y) * GRID + wx * WINDOW + x for y in range(WINDOW) for x in range(WINDOW)
            ]
            rows.extend([ids] * HEADS)
    return torch.tensor(rows)


def _site() -> GroupedDeltaAttention:
    bias = DecomposedRelPos((WINDOW, WINDOW), (WINDOW, WINDOW))
    return GroupedDeltaAttention(
        D**-0.5,
        bias,
        group_ids=_window_ids(),
        offset=0,
        streams=1,
        tokens=TOKENS,
        heads=1,
        full_when_cheaper=True,
    )


def _written_out(q, k, v, tables) -> torch.Tensor:
    """softmax(scale q k^T + decomposed rel-pos) v, each term spelt out."""
    rh, rw = tables
    out = torch.empty(q.shape[:3] + (v.shape[3],))
    for r in range(q.shape[0]):
        qr = q[r, 0]
        bias = torch.empty(WINDOW * WINDOW, WINDOW * WINDOW)
        for i in range(WINDOW * WINDOW):
            for j in range(WINDOW * WINDOW):
                qy, qx, ky, kx = i // WINDOW, i % WINDOW, j // WINDOW, j % WINDOW
                bias[i, j] = qr[i] @ rh[qy, ky] + qr[i] @ rw[qx, kx]
        logits = (qr @ k[r, 0].T) * D**-0.5 + bias
        out[r, 0] = torch.softmax(logits, dim=-1) @ v[r, 0]
    return out


@pytest.fixture
def kernel_rows(monkeypatch):
    """The rows (groups x heads) each fused-attention call of the module computes."""
    seen: list[int] = []
    fused = attention_module.F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append(q.shape[0])
        return fused(q, *args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    return seen


def _frames(steps: int, changes: list[list[int]]):
    gen = torch.Generator().manual_seed(0)
    rows = len(_window_ids())
    q, k, v = (torch.randn(rows, 1, WINDOW * WINDOW, D, generator=gen) for _ in range(3))
    tables = (torch.randn(WINDOW, WINDOW, D, generator=gen), torch.randn(WINDOW, WINDOW, D, generator=gen))
    ids = _window_ids()
    yield q.clone(), k.clone(), v.clone(), None, tables
    for tokens in changes[:steps]:
        for t in tokens:  # every (row, position) that holds token t gets new q, k and v
            for r, p in (ids == t + 1).nonzero().tolist():
                for x in (q, k, v):
                    x[r, 0, p] = torch.randn(D, generator=gen)
        yield q.clone(), k.clone(), v.clone(), torch.tensor([tokens]), tables


def test_only_the_changed_windows_run_and_every_output_is_exact(kernel_rows):
    site = _site()
    changes = [[0, 1], [15], [5, 10], [3]]  # windows 0; 3; 0 and 3; 1
    expected_rows = [None, 2 * HEADS, 1 * HEADS, 2 * HEADS, 1 * HEADS]
    for step, (q, k, v, idx, tables) in enumerate(_frames(len(changes), changes)):
        kernel_rows.clear()
        out = site(q, k, v, idx, idx, tables)
        torch.testing.assert_close(out, _written_out(q, k, v, tables), rtol=1e-5, atol=1e-6)
        if step == 0:
            continue  # the first call fills the state densely
        if step == 1:
            assert kernel_rows == [len(q)]  # nothing cached yet: every group
        else:
            assert kernel_rows == [expected_rows[step]]


def test_a_call_that_changes_nothing_runs_no_kernel_and_returns_a_copy(kernel_rows):
    site = _site()
    frames = list(_frames(1, [[6]]))
    for q, k, v, idx, tables in frames:
        site(q, k, v, idx, idx, tables)
    q, k, v, _, tables = frames[-1]
    kernel_rows.clear()
    out = site(q, k, v, torch.empty(1, 0, dtype=torch.long), torch.empty(1, 0, dtype=torch.long), tables)
    assert kernel_rows == []
    torch.testing.assert_close(out, _written_out(q, k, v, tables), rtol=1e-5, atol=1e-6)
    out.zero_()  # a caller writing into the output must not reach the cache
    again = site(q, k, v, torch.empty(1, 0, dtype=torch.long), torch.empty(1, 0, dtype=torch.long), tables)
    torch.testing.assert_close(again, _written_out(q, k, v, tables), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("restart", ["reset", "reset_stream"])
def test_a_restart_recomputes_every_window(restart, kernel_rows):
    site = _site()
    frames = list(_frames(2, [[0], [15]]))
    for q, k, v, idx, tables in frames[:2]:
        site(q, k, v, idx, idx, tables)
    getattr(site, restart)(*(() if restart == "reset" else (0,)))
    q, k, v, idx, tables = frames[2]
    kernel_rows.clear()
    out = site(q, k, v, idx, idx, tables)
    torch.testing.assert_close(out, _written_out(q, k, v, tables), rtol=1e-5, atol=1e-6)
    assert kernel_rows == [len(q)]


def test_the_window_skip_is_off_under_a_flop_counter(kernel_rows):
    site = _site()
    frames = list(_frames(2, [[0], [15]]))
    for q, k, v, idx, tables in frames[:2]:
        site(q, k, v, idx, idx, tables)
    q, k, v, idx, tables = frames[2]
    kernel_rows.clear()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        site(q, k, v, idx, idx, tables)
    assert kernel_rows == [len(q)]


def _vitdet(policy=6):
    family = families()["zoo_vitdet"]
    model, example = family.build()
    return family, model, evtrace.transform(model, example, policy=policy)


def test_the_windowed_vitdet_takes_the_skip_path():
    family, _, emodel = _vitdet()
    sites = [m for m in emodel.modules() if isinstance(m, GroupedDeltaAttention)]
    assert sites, "the zoo ViTDet has windowed attention"
    with torch.no_grad():
        for x in family.real_inputs(3):
            emodel(x)
    assert all(site._group_out is not None for site in sites)


def _window_caches(emodel) -> list:
    return [m._group_out for m in emodel.modules() if isinstance(m, GroupedDeltaAttention)]


def _another_stream(emodel, clip) -> None:
    for x in clip:  # other content fills the window caches
        emodel(x.flip(-1) * 0.5)


def test_a_windowed_stream_checkpoint_carries_the_window_outputs_and_continues_bit_for_bit():
    family, model, emodel = _vitdet()
    clip = family.real_inputs(7)
    with torch.no_grad():
        for x in clip[:3]:
            emodel(x)
        saved = emodel.stream_state()
        expected = [output_tensor(emodel(x)).clone() for x in clip[3:]]
        _, _, other = _vitdet()
        _another_stream(other, clip)
        other.load_stream(saved)
        caches = [saved["tensors"][k] for k in sorted(saved["tensors"]) if k.endswith("._group_out")]
        assert caches and all(c is not None for c in caches)
        assert all(torch.equal(a, b) for a, b in zip(caches, _window_caches(other)))
        assert all(torch.equal(a, output_tensor(other(x))) for a, x in zip(expected, clip[3:]))


def test_a_stream_saved_before_its_window_cache_filled_does_not_inherit_one():
    family, _, emodel = _vitdet()
    clip = family.real_inputs(6)
    with torch.no_grad():
        emodel(clip[0])  # the dense first frame: no window cache yet
        saved = emodel.stream_state()
        expected = [output_tensor(emodel(x)).clone() for x in clip[1:]]
        _, _, other = _vitdet()
        _another_stream(other, clip)
        assert all(c is not None for c in _window_caches(other))
        other.load_stream(saved)
        assert all(c is None for c in _window_caches(other))
        assert all(torch.equal(a, output_tensor(other(x))) for a, x in zip(expected, clip[1:]))


@pytest.mark.parametrize("grid, streams", [((5, 7), 2), ((6, 6), 1)])
def test_decomposed_rel_pos_columns_equal_the_written_out_bias(grid, streams):
    gen = torch.Generator().manual_seed(1)
    kh, kw = grid
    bias = DecomposedRelPos(grid, grid)
    q = torch.randn(streams, 3, kh * kw, D, generator=gen)
    tables = (torch.randn(kh, kh, D, generator=gen), torch.randn(kw, kw, D, generator=gen))
    cols = torch.stack([torch.randperm(kh * kw, generator=gen)[:9] for _ in range(streams)])
    got = bias.cols(q, cols, tables)
    want = torch.empty(streams, 3, kh * kw, 9)
    for b in range(streams):
        for i in range(kh * kw):
            for c, j in enumerate(cols[b].tolist()):
                want[b, :, i, c] = (
                    q[b, :, i] @ tables[0][i // kw, j // kw] + q[b, :, i] @ tables[1][i % kw, j % kw]
                )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    meta = bias.cols(q.to("meta"), cols.to("meta"), tuple(t.to("meta") for t in tables))
    assert meta.shape == want.shape  # counting takes the gathers, with the same shapes
