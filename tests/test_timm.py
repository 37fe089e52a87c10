"""Real timm models (``timm.create_model(..., pretrained=False)``, small configurations).

Plain ViTs (class token, distillation token, registers, layer scale, rotary embeddings and SwiGLU)
must transform with every attention site exact, equal the original under a full update and the
reference simulator (tests/reference.py) on partial frames of real video, and save at least 2x
at N/4. Swin (4 stages, window 7, shifted windows, patch merging) must be exact wherever it is
gated, and every window attention is delta-updated (patch merging opens the next sequence, the
shifted-window mask is one constant logit term).
"""

from __future__ import annotations

import pytest
import torch

import evtrace
from evtrace.cost.count import count_flops
from evtrace.verification import verify
from tests.models import real_frames
from tests.reference import ReferenceStream, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

PLAIN = {
    "vit_tiny_patch16_224": dict(depth=2, img_size=64),
    "deit_tiny_distilled_patch16_224": dict(depth=2, img_size=64),
    "deit3_small_patch16_224": dict(depth=2, img_size=64, embed_dim=96, num_heads=3),
    "vit_small_patch14_reg4_dinov2": dict(depth=2, img_size=56, embed_dim=96, num_heads=3),
    "eva02_tiny_patch14_224": dict(depth=2, img_size=56),
}
SWIN_T = dict(depths=(2, 2, 2, 2), embed_dim=24, num_heads=(1, 2, 4, 8))  # Swin-T's layout, narrow


def _build(timm, name, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    h = model.patch_embed.img_size[0]  # the configured size (the data config has the pretrained one)
    patch = model.patch_embed.patch_size[0]
    frames = real_frames(h, count=4, patch_size=patch)
    return model, frames


def _check_exact_and_partial(model, frames, tol=1e-5):
    x = frames[0]
    full = evtrace.transform(model, x, policy=evtrace.All(), scene_cut=None)
    assert verify(model, full, frames).max_relative <= tol
    emodel = evtrace.transform(model, x, policy=evtrace.TopFraction(0.25), scene_cut=None)
    sim = ReferenceStream(model, x, evtrace.TopFraction(0.25))
    moved = 0.0
    with torch.no_grad():
        for frame in frames:
            got = emodel(frame)
            assert relative_error(got, sim(frame)) <= tol
            moved = max(moved, relative_error(got, model(frame)))
    assert moved > 1e-3  # the stream really was partial
    return emodel


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_timm_vits_are_exact_gated_and_save(timm, name):
    model, frames = _build(timm, name, **PLAIN[name])
    emodel = _check_exact_and_partial(model, frames)
    report = emodel.report()
    assert len(report.sites) == PLAIN[name]["depth"]
    assert all(s.mode == "exact" for s in report.sites)
    dense = [x.module for x in report.linears if x.status == "dense"]
    assert all(m.startswith("head") for m in dense), dense  # the classifier reads pooled tokens
    ratio = count_flops(model, frames[0]).total / count_flops(emodel, frames[0]).steady
    assert ratio >= 2.0


def test_timm_swin_t_layout_is_exact_where_gated(timm):
    model, frames = _build(timm, "swin_tiny_patch4_window7_224", **SWIN_T)
    assert len(model.layers) == 4 and model.layers[0].blocks[0].window_size == (7, 7)
    emodel = _check_exact_and_partial(model, frames)
    for convention in ("paper", "fvcore"):  # counting never crashes where the frames run
        assert count_flops(emodel, frames[0], convention).steady > 0


def test_timm_swin_t_layout_is_gated_in_every_stage(timm):
    model, frames = _build(timm, "swin_tiny_patch4_window7_224", **SWIN_T)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopFraction(0.25), scene_cut=None)
    report = emodel.report()
    assert len(report.sites) == 8 and all(s.mode != "dense" for s in report.sites)
    assert count_flops(model, frames[0]).total / count_flops(emodel, frames[0]).steady >= 2.5
