"""evtrace.fidelity: metrics on hand-made maps with known values, the sweep machinery, the plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from evtrace import transform
from evtrace.runtime.policies import All, Threshold, TopK
from evtrace.tools.fidelity import (
    FidelityPoint,
    FrameCounter,
    at_saving,
    error_proportional_topk,
    evaluate_features,
    eventful_gflops,
    exact_vs_paper,
    feature_cosine,
    gate_error_shares,
    markdown_table,
    read_points,
    saliency_cc,
    saliency_kl,
    summary,
    uniform_policy,
    write_outputs,
)
from evtrace.tools.plots import fidelity_plot

from .models import small_dinov2

# ----------------------------------------------------------------------------- metrics


def test_feature_cosine_known_values():
    a = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], [[3.0, 4.0], [0.0, 0.0]]])
    b = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 5.0]], [[-6.0, -8.0], [0.0, 0.0]]])
    got = feature_cosine(a, b)
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx([1 / math.sqrt(2), 0.0, -1.0], abs=1e-12)
    x = torch.randn(2, 5, 7)
    assert feature_cosine(x, 3 * x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)  # scale invariant


def test_saliency_cc_known_values():
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 3.0, 2.0], [5.0, 7.0, 9.0], [3.0, 2.0, 1.0]])
    assert saliency_cc(a, b).tolist() == pytest.approx([0.5, 1.0, -1.0], abs=1e-12)
    flat = torch.ones(1, 1, 4, 4)
    assert saliency_cc(flat, torch.rand(1, 1, 4, 4)).item() == 0.0  # undefined -> 0, not NaN


def test_saliency_kl_known_values():
    p = torch.tensor([[0.5, 0.5], [1.0, 3.0], [2.0, 0.0]])
    q = torch.tensor([[0.25, 0.75], [2.0, 6.0], [1.0, 1.0]])
    want = [0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), 0.0, math.log(2)]
    assert saliency_kl(p, q).tolist() == pytest.approx(want, abs=1e-12)
    # asymmetric, and finite where q has zeros
    assert saliency_kl(q[:1], p[:1]).item() != pytest.approx(want[0], abs=1e-4)
    assert math.isfinite(saliency_kl(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])).item())


@pytest.mark.parametrize("fn", [feature_cosine, saliency_cc, saliency_kl])
def test_metrics_reject_mismatched_shapes(fn):
    with pytest.raises(ValueError, match="shapes differ"):
        fn(torch.rand(1, 4), torch.rand(1, 5))


def test_kl_rejects_negative_maps():
    with pytest.raises(ValueError, match="non-negative"):
        saliency_kl(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 1.0]]))


# ----------------------------------------------------------------------------- summaries


def _point(saving, cos, cc=math.nan, attention="exact", family="TopK", policy=None):
    return FidelityPoint(
        model="m",
        clip="c",
        attention=attention,
        policy=policy or f"p{saving}",
        family=family,
        tokens_per_gate=1.0,
        tokens=10,
        gflops_dense=8.0,
        gflops=8.0 / saving,
        cosine_mean=cos,
        cosine_worst=cos,
        cc_mean=cc,
        cc_worst=cc,
    )


def test_at_saving_interpolates_in_log_saving():
    pts = [_point(1.0, 1.0), _point(4.0, 0.9), _point(8.0, 0.8)]
    assert at_saving(pts, 2.0) == pytest.approx(0.95)  # halfway between 1x and 4x in log
    assert at_saving(pts, 4.0) == pytest.approx(0.9)
    assert math.isnan(at_saving(pts, 16.0))  # not reached
    assert at_saving([_point(2.015, 0.99), _point(5.0, 0.9)], 2.0) == 0.99  # within 1 %: taken as it is


def test_summary_and_exact_vs_paper():
    pts = [
        _point(1.5, 0.999, 0.999, policy="a"),
        _point(5.0, 0.95, 0.96, policy="b"),
        _point(1.5, 0.9995, 0.9995, "paper", policy="a"),
        _point(5.0, 0.94, 0.95, "paper", policy="b"),
    ]
    text = summary(pts)
    exact_row = next(line for line in text.splitlines() if "| exact |" in line)
    assert exact_row.endswith("| missed: cosine @2x, cosine @4x, CC @2x, CC @4x |")
    good = summary([_point(1.0, 1.0, 1.0), _point(2.0, 0.995, 0.992), _point(3.0, 0.98, 0.98)])
    assert good.splitlines()[-1].endswith("| met (not reached: cosine @4x, CC @4x) |")
    worse = exact_vs_paper(pts)
    assert len(worse) == 1 and worse[0].startswith("m a:")
    table = markdown_table(pts)
    assert table.count("\n") == 1 + len(pts) and "5.00x" in table


def test_fidelity_plot_writes_png(tmp_path):
    pts = [_point(s, 1 - 0.01 * s, 1 - 0.012 * s, mode) for mode in ("exact", "paper") for s in (1.5, 2, 4)]
    path = fidelity_plot(pts, tmp_path / "f.png", title="t")
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] == 430 and img.shape[1] == 1000  # two panels, 100 dpi
    assert img[..., :3].std() > 0.05


# ----------------------------------------------------------------------------- sweep machinery


@pytest.fixture(scope="module")
def stream():
    torch.manual_seed(0)
    model, x = small_dinov2(num_register_tokens=0)
    frames = [x]
    for _ in range(4):  # a slowly drifting stream: a few patches change a lot
        nxt = frames[-1].clone()
        nxt[..., :14, :28] += 0.5 * torch.randn_like(nxt[..., :14, :28])
        frames.append(nxt)
    return model, frames


def test_frame_counter_counts_tokens_per_gate(stream):
    model, frames = stream
    em = transform(model, frames[0], policy=TopK(3))
    counter = FrameCounter(em)
    with torch.no_grad():
        for f in frames:
            em(f)
    n = next(iter(em.regions().values())).gate.tokens
    assert set(len(c) for c in counter.counts.values()) == {len(frames)}
    assert all(c == [n] + [3] * (len(frames) - 1) for c in counter.counts.values())
    assert all(v == 3.0 for v in counter.steady_mean().values())
    assert all(i.shape == (1, 3) for i in counter.last_index.values())
    counter.remove()
    with torch.no_grad():
        em(frames[0])
    assert len(next(iter(counter.counts.values()))) == len(frames)  # hooks gone


def test_eventful_gflops_prices_measured_counts(stream):
    model, frames = stream
    em = transform(model, frames[0], policy=TopK(4))
    dense, at4 = eventful_gflops(em, model, frames[0])
    names = list(em.regions())
    _, at_counts = eventful_gflops(em, model, frames[0], {g: 4.0 for g in names})
    _, fewer = eventful_gflops(em, model, frames[0], {g: 2.0 for g in names})
    assert at_counts == pytest.approx(at4) and fewer < at4 < dense
    assert repr(next(iter(em.regions().values())).gate.policy) == "TopK(r=4)"  # restored


def test_evaluate_features_all_tokens_is_exact_and_topk_is_not(stream):
    model, frames = stream
    specs = [
        ("All", "All()", uniform_policy(All())),
        ("TopK", "TopK(r=2)", uniform_policy(TopK(2))),
        ("Threshold", "Threshold(tau=0)", uniform_policy(Threshold(0.0))),
    ]
    pts = evaluate_features(model, frames, specs, ("exact", "dense"), name="tiny")
    assert [(p.attention, p.policy) for p in pts] == [(a, s[1]) for a in ("exact", "dense") for s in specs]
    for p in pts:
        assert p.frames == len(frames) and math.isnan(p.cc_mean)
        if p.family in ("All", "Threshold"):  # tau = 0: every token that changed at all
            assert p.cosine_worst == pytest.approx(1.0, abs=1e-6)
        if p.family == "All":
            assert 0.5 < p.saving < 1.0  # every token, plus the gates and delta bookkeeping
        elif p.family == "Threshold":  # skips only the patches whose input did not change
            same_mode_all = next(q for q in pts if q.attention == p.attention and q.family == "All")
            assert p.saving > same_mode_all.saving and p.tokens_per_gate < p.tokens
        else:
            assert p.cosine_mean < 1.0 - 1e-6 and p.saving > 1.5
    assert np.isfinite([p.gflops for p in pts]).all()


def test_error_proportional_budgets_follow_gate_errors(stream):
    model, frames = stream
    em = transform(model, frames[0], policy=TopK(4))
    shares = gate_error_shares(em, frames, TopK(4))
    assert set(shares) == set(em.regions()) and sum(shares.values()) / len(shares) == pytest.approx(1.0)
    error_proportional_topk(frames, 4)(em)
    budgets = {g: r.gate.policy.r for g, r in em.regions().items()}
    n = next(iter(em.regions().values())).gate.tokens
    for g, r in budgets.items():
        assert r == max(1, min(n, round(4 * shares[g])))
    assert len(set(budgets.values())) > 1  # the gates' errors differ, so do their budgets
    assert all(r.fresh for r in em.regions().values())  # reset: the next frame starts a stream


def test_write_outputs_round_trip(tmp_path):
    pts = [
        _point(s, 1 - 0.004 * s, 1 - 0.005 * s, mode, policy=f"r{s}")
        for mode in ("exact", "paper")
        for s in (1.5, 2, 4)
    ]
    second = [
        FidelityPoint(
            model="ViT-B",
            clip="c",
            attention="exact",
            policy="TopK(r=9)",
            family="TopK",
            tokens_per_gate=9,
            tokens=17,
            gflops_dense=2.0,
            gflops=1.0,
            cosine_mean=0.99,
            cosine_worst=0.98,
            frames=6,
        )
    ]
    paths = write_outputs(pts, second, tmp_path, seconds=1.0)
    text = paths["markdown"].read_text()
    assert "exact is at least as faithful as paper mode for every policy" in text
    assert "| ViT-B | exact | TopK(r=9) | 9.0 of 17 |" in text and "(6 frames)" in text
    assert imread(paths["plot"]).shape[:2] == (430, 1000)
    back = read_points(paths["json"])
    assert [p.policy for p in back] == [p.policy for p in pts + second]
    assert back[0].cc_mean == pytest.approx(pts[0].cc_mean) and math.isnan(back[-1].cc_mean)
