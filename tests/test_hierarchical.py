"""Hierarchical ViTs at their real depth: Swin-T layouts (4 stages, window 7, shifted windows,
patch merging, relative position bias) from HF transformers and from timm, with small widths.

Per model: a full update equals the original, every stage is gated and every window attention
delta-updated, the steady FLOP ratio at N/4 is at least 2.5x, and partial frames equal the
independent reference simulator (tests/reference.py) while differing from the original.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import evtrace
from tests.models import real_frames
from tests.reference import ReferenceStream, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")


def _declare_torchvision_ops():
    """transformers and timm import torchvision, whose wheel here is a CUDA build that does not
    load beside the CPU torch; its Python code only needs the two op schemas declared."""
    try:
        from tests.timm_setup import declare_torchvision_ops
    except ImportError:
        if not hasattr(torch.ops.torchvision, "nms"):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _declare_torchvision_ops.lib = lib
        return
    declare_torchvision_ops()


def hf_swin_t(attention: str = "eager"):
    """HF SwinModel with Swin-T's stages (depths 2, 2, 6, 2; window 7; 224 pixels) at width 16.
    One head in the first stage: q, k and v then keep whole rows, so they join the regions."""
    _declare_torchvision_ops()
    import transformers

    config = transformers.SwinConfig(
        image_size=224,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2, 6, 2],
        num_heads=[1, 2, 4, 8],
        window_size=7,
        attn_implementation=attention,
    )
    return transformers.SwinModel(config, add_pooling_layer=False).eval()


def _transform(model, example, policy):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emodel = evtrace.transform(model, example, policy=policy)
    return emodel, [str(w.message) for w in caught]


def check_hierarchical(model, stages: int, sites: int, min_ratio: float = 2.5):
    """Exact under All(), every region gated and every site delta-updated, the ratio at N/4,
    partial frames equal the reference simulator. Returns the report."""
    frames = real_frames(224, 4, patch_size=32)
    full, _ = _transform(model, frames[0], evtrace.All())
    with torch.no_grad():
        assert max(relative_error(full(f), model(f)) for f in frames[:2]) <= 1e-4

    policy = evtrace.TopFraction(0.25)
    emodel, warned = _transform(model, frames[0], policy)
    report = emodel.report()
    assert not warned, warned
    assert len(report.spaces) == stages, report.spaces
    assert report.regions and all(r.gated for r in report.regions), [
        (r.name, r.reason) for r in report.regions if not r.gated
    ]
    gated_spaces = {r.space for r in report.regions}
    assert gated_spaces == {s["name"] for s in report.spaces}, gated_spaces  # every stage gated
    assert len(report.sites) == sites
    assert all(s.mode == "exact" for s in report.sites), [(s.name, s.mode, s.reason) for s in report.sites]
    ratio = report.costs.dense() / report.costs.steady()
    assert ratio >= min_ratio, ratio

    sim = ReferenceStream(model, frames[0], policy)
    with torch.no_grad():
        errors = [relative_error(emodel(f), sim(f)) for f in frames]
        emodel.reset()
        partial = max(relative_error(emodel(f), model(f)) for f in frames)
    assert max(errors) <= 1e-5, errors
    assert partial > 1e-3, "the policy updated everything: the comparison proves nothing"
    return report


def test_hf_swin_t_four_stages_gated_and_equal_the_reference():
    check_hierarchical(hf_swin_t(), stages=4, sites=12)


def test_timm_swin_t_four_stages_gated_and_equal_the_reference():
    """Real timm: patch merging is reshape, permute, flatten, LayerNorm (a norm over merged
    tokens opens the next stage's sequence), and the shifted-window mask is added in a
    (B, windows, H, n, n) view after the relative position bias (one constant logit term)."""
    _declare_torchvision_ops()
    import timm

    model = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=0,
        embed_dim=24,
        num_heads=(3, 6, 12, 24),
    ).eval()
    report = check_hierarchical(model, stages=4, sites=12)
    assert [s["source"] for s in report.spaces[1:]] == [f"layers_{i}_downsample_norm" for i in (1, 2, 3)]
    assert all(s.bias == "constant" for s in report.sites), report.sites  # shifted ones included


class Branches(nn.Module):
    """A region with two entries whose first exit is read (by attention) before the second
    entry is computed: the region call must move after that entry, and the reader after it."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 8, 8)
        self.a, self.b, self.f, self.g = (nn.Linear(c, c) for _ in range(4))

    @staticmethod
    def attend(x):
        return torch.softmax(x @ x.transpose(1, 2) * 0.25, -1) @ x

    def forward(self, image):
        x = self.embed(image).flatten(2).transpose(1, 2)
        first = self.f(self.attend(self.a(x)))
        read_early = self.attend(first)
        second = self.attend(self.b(x))
        return self.g(first + second) + read_early


def test_region_exit_read_before_its_last_entry_is_placed_in_order():
    torch.manual_seed(0)
    model = Branches().eval()
    frames = real_frames(64, 4, patch_size=8)
    policy = evtrace.TopK(16)
    emodel, _ = _transform(model, frames[0], policy)
    report = emodel.report()
    assert any(r.gated and len(r.entries) == 2 for r in report.regions), report.regions
    assert all(s.mode == "exact" for s in report.sites)
    sim = ReferenceStream(model, frames[0], policy)
    with torch.no_grad():
        errors = [relative_error(emodel(f), sim(f)) for f in frames]
    assert max(errors) <= 1e-5, errors


class Excite(nn.Module):
    """A statistic of a region's exit (its mean over tokens: no token, a NON_TOKEN chain after
    it) scales a later node of the same token-wise chain: the two must be different regions,
    or the region would read its own output (squeeze-and-excitation, CvT's projections)."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 8, 8)
        self.a, self.b, self.c = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, image):
        x = self.embed(image).flatten(2).transpose(1, 2)
        first = self.a(x)
        scale = torch.sigmoid(first.mean(1, keepdim=True) * 2.0)
        return self.c(self.b(x) * scale) + first


def test_a_path_out_of_a_region_through_a_statistic_splits_it_and_keeps_the_reader_dense():
    """The statistic changes every frame: rows of the reading region that are not recomputed
    would keep its old value, so that region stays dense (with the reason); the others gate."""
    torch.manual_seed(0)
    model = Excite().eval()
    frames = real_frames(64, 4, patch_size=8)
    policy = evtrace.TopK(16)
    emodel, _ = _transform(model, frames[0], policy)
    regions = {tuple(r.linears): r for r in emodel.report().regions}
    assert set(regions) == {("a",), ("b",), ("c",)}, regions
    assert regions[("a",)].gated and regions[("b",)].gated
    assert "a value computed from the frame that holds no token" in regions[("c",)].reason
    sim = ReferenceStream(model, frames[0], policy)
    with torch.no_grad():
        errors = [relative_error(emodel(f), sim(f)) for f in frames]
    assert max(errors) <= 1e-5, errors
