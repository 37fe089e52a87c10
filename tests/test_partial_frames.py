"""The build's check on partial frames: what would crash or disagree after transform stays dense,
loudly, or raises with ``strict=True``; what is sound is left as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import evtrace
from evtrace.cost.count import count_flops
from evtrace.graph.errors import KeptDenseWarning, RewriteError
from tests.passes_models import WIDTH, Attention, PatchTokens, TokenMLP, image
from tests.reference import relative_error
from tests.test_reference import assert_partial_and_delta, run_pair


class TokenGather(nn.Module):
    """A region that reorders its tokens with a constant index: every frame's gathered rows are
    fewer than the index expects (it crashed on the first partial frame, and in count_flops)."""

    def __init__(self):
        super().__init__()
        self.embed = PatchTokens()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.register_buffer("order", torch.arange(16).flip(0))

    def forward(self, x):
        return self.fc2(self.fc1(self.embed(x))[:, self.order])


def frames(count: int = 4) -> list[torch.Tensor]:
    out = [image(0)]
    for i in range(1, count):
        frame = out[-1].clone()
        frame[..., : 4 * i, :8] += 0.5 * image(i)[..., : 4 * i, :8]
        out.append(frame)
    return out


def test_a_region_that_crashes_on_partial_frames_is_kept_dense_with_a_warning():
    torch.manual_seed(0)
    model = TokenGather().eval()
    with pytest.warns(
        KeptDenseWarning, match=r"'fc1..fc2' \(kept dense: it failed on a partial frame \(IndexError"
    ):
        emodel = evtrace.transform(model, image(), policy=evtrace.TopK(5))
    (region,) = emodel.report().regions
    assert not region.gated
    assert region.reason.startswith(
        "kept dense: it failed on a partial frame (IndexError: index 15 is out of bounds"
    )
    with torch.no_grad():
        for frame in frames():
            assert torch.equal(emodel(frame), model(frame))
    count = count_flops(emodel, image())
    assert count.steady == count_flops(model, image()).total


def test_strict_raises_instead_of_keeping_anything_dense():
    torch.manual_seed(0)
    with pytest.raises(
        RewriteError,
        match=r"rewriting 'fc1..fc2' failed: IndexError: index 15 is out of bounds.*"
        r"transform\(\.\.\., strict=False\) keeps it dense instead",
    ):
        evtrace.transform(TokenGather().eval(), image(), policy=evtrace.TopK(5), strict=True)
    with pytest.raises(TypeError, match="strict must be a bool"):
        evtrace.transform(TokenMLP().eval(), image(), strict="yes")


def test_strict_raises_on_a_failed_rewrite(monkeypatch):
    import passes.sparse_regions as sparse_regions

    def fail(*args):
        raise RuntimeError("a construct this pass cannot rewrite")

    monkeypatch.setattr(sparse_regions, "rewrite_region", fail)
    with pytest.raises(RewriteError, match="rewriting 'fc1..fc2' failed: RuntimeError: a construct"):
        evtrace.transform(TokenMLP().eval(), image(), policy=evtrace.TopK(4), strict=True)


def test_a_region_whose_sparse_rows_disagree_is_kept_dense(monkeypatch):
    import passes.sparse_regions as sparse_regions

    real = sparse_regions.rewrite_region

    def off(gm, region, *args):
        rewrite = real(gm, region, *args)
        sparse = gm.get_submodule(rewrite.module_name).sparse
        output = next(n for n in sparse.graph.nodes if n.op == "output")
        with sparse.graph.inserting_before(output):
            off = tuple(sparse.graph.call_function(torch.add, (y, 0.05)) for y in output.args[0])
        output.args = (off,)
        sparse.recompile()
        return rewrite

    monkeypatch.setattr(sparse_regions, "rewrite_region", off)
    torch.manual_seed(0)
    with pytest.warns(
        KeptDenseWarning, match="its exit buffers differ from its dense graph on the same tokens"
    ):
        emodel = evtrace.transform(TokenMLP().eval(), image(), policy=evtrace.TopK(4))
    (region,) = emodel.report().regions
    assert not region.gated
    assert region.reason.startswith("kept dense: on a partial frame (5 of 16 tokens) its exit buffers differ")


def test_a_site_whose_delta_update_disagrees_is_kept_dense(monkeypatch):
    from evtrace.runtime.attention import ExactDeltaAttention

    real = ExactDeltaAttention._delta
    monkeypatch.setattr(ExactDeltaAttention, "_delta", lambda self, *a: real(self, *a) * 1.1)
    torch.manual_seed(0)
    model = Attention().eval()
    with pytest.warns(KeptDenseWarning, match="its delta update differs from the site computed densely"):
        emodel = evtrace.transform(model, image(), policy=evtrace.TopK(4))
    (site,) = emodel.report().sites
    assert site.mode == "dense" and site.reason.startswith("kept dense: on a partial frame its delta update")
    assert all(region.gated for region in emodel.report().regions)  # the regions passed


@pytest.mark.parametrize("fused", [False, True])
def test_a_sound_model_passes_the_check_untouched(fused, monkeypatch):
    """No warning, every region and site rewritten, the global random state untouched, and the
    stream afterwards exactly that of a model built without the check."""
    import passes.build as build

    torch.manual_seed(0)
    model = Attention(fused=fused).eval()
    state = torch.random.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptDenseWarning)
        emodel = evtrace.transform(model, image(), policy=evtrace.TopK(4))
    assert torch.equal(torch.random.get_rng_state(), state)
    report = emodel.report()
    assert all(r.gated for r in report.regions) and all(s.mode == "exact" for s in report.sites)
    assert all(m.gate.policy is emodel.policy for m in emodel.regions().values())
    monkeypatch.setattr(build, "check_partial_frames", lambda gm, args: [])
    unchecked = evtrace.transform(model, image(), policy=evtrace.TopK(4))
    with torch.no_grad():
        for frame in frames():
            assert torch.equal(emodel(frame), unchecked(frame))
    assert relative_error(emodel(frames()[-1]), model(frames()[-1])) > 1e-3  # partial frames


# ------------------------------------------------------------------ HF families that crashed


def _hf(name):
    import transformers as tf

    if name == "data2vec":
        config = tf.Data2VecVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            use_relative_position_bias=True,
        )
        return tf.Data2VecVisionModel(config).eval(), 32
    if name == "pvt_v2":
        config = tf.PvtV2Config(
            image_size=64,
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            num_attention_heads=[1, 2],
            patch_sizes=[7, 3],
            strides=[4, 2],
        )
        return tf.PvtV2Model(config).eval(), 64
    config = tf.SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 4], window_size=4
    )
    return tf.SwinModel(config).eval(), 64


def test_hf_data2vec_is_rewritten_whole_and_equals_the_reference():
    """Export's fused attention hands out (B, N, H, d) memory viewed as (B, H, N, d) and the graph
    views it after a permute: the delta attention output keeps that layout (the first frame
    crashed before)."""
    from tests.models import real_frames

    torch.manual_seed(0)
    model, size = _hf("data2vec")
    clip = real_frames(size, 5, patch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptDenseWarning)
        _, spy, emodel, _ = run_pair(model, clip, evtrace.TopK(5))
    report = emodel.report()
    assert report.frontend == "export"
    assert all(r.gated for r in report.regions) and all(s.mode == "exact" for s in report.sites)
    assert_partial_and_delta(model, clip, emodel, spy)
    count_flops(evtrace.transform(model, clip[0], policy=evtrace.TopK(5)), clip[0])


@pytest.mark.parametrize("name", ["pvt_v2", "swin"])
def test_hf_families_that_crashed_run_every_frame(name):
    """PvtV2 (a reshape to a shape computed outside the region) and 3-stage Swin (a site whose
    q, k, v a region took in) crashed on the first partial frame or in the transform. Their causes
    are fixed in the analysis and the rewrite: nothing is kept dense by the partial-frame check,
    every frame runs and equals the original under a full update, partial frames run and count."""
    from tests.models import real_frames

    torch.manual_seed(0)
    model, size = _hf(name)
    clip = real_frames(size, 4, patch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptDenseWarning)
        emodel = evtrace.transform(model, clip[0], policy=evtrace.All())
    report = emodel.report()
    kept = [r.reason for r in report.regions if r.reason.startswith("kept dense")]
    kept += [s.reason for s in report.sites if s.reason.startswith("kept dense")]
    assert not kept
    with torch.no_grad():
        for frame in clip:
            assert relative_error(emodel(frame), model(frame)) <= 1e-4
    emodel.set_policy(evtrace.TopFraction(0.25))
    with torch.no_grad():
        for frame in clip:
            emodel(frame)
    count_flops(emodel, clip[0])
