"""Time steps inside a call as the stream (stream_axis="steps"): the paper's ViViT setting.

The independent reference for partial policies is ``tests.reference.ReferenceStream`` run on the
zoo ViViT's spatial encoder alone, one time step per "frame", with the temporal model applied
by hand: it shares nothing with the step split, the StepLoop or the rewritten graph.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import evtrace
from evtrace.cost.model import build_cost_model
from evtrace.runtime.policies import All, TopK
from models_zoo.vivit import vivit_b
from tests.models import small_vit
from tests.reference import ReferenceStream

STEPS = 4  # num_frames 8, tubelets of 2


def _vivit(**kw):
    torch.manual_seed(0)
    config = dict(
        num_frames=8,
        img_size=32,
        tubelet=(2, 8, 8),
        spatial_depth=2,
        temporal_depth=1,
        embed_dim=64,
        num_heads=4,
        num_classes=5,
    )
    return vivit_b(**(config | kw)).eval()


def _clips(views: int, seed: int = 1) -> torch.Tensor:
    """Clips whose time steps change a little from one to the next (as video does)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(views, 3, 1, 32, 32, generator=g)
    drift = 0.15 * torch.randn(views, 3, 8, 32, 32, generator=g).cumsum(dim=2)
    return base + drift


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


class _OneStep(torch.nn.Module):
    """The spatial path of one tubelet time step, written out by hand: (B, 3, 2, H, W) -> tokens."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, step_clip):
        tokens = self.model.patch_embed.proj(step_clip).flatten(2).transpose(1, 2)  # (B, h w, D)
        return self.model.spatial(tokens)


def _reference(model, clip: torch.Tensor, policy, carry_from: ReferenceStream | None = None):
    """The paper's ViViT setting by hand: the spatial path eventful over the time steps
    (ReferenceStream, reset per call), the temporal model and head dense."""
    steps = [clip[:, :, 2 * t : 2 * t + 2] for t in range(STEPS)]
    sim = carry_from or ReferenceStream(_OneStep(model).eval(), steps[0], policy)
    if carry_from is None:
        sim.reset()
    per_step = [sim(step) for step in steps]
    cls = torch.stack([y[:, 0] for y in per_step], dim=1)  # (B, T', D)
    return model.head(model.temporal(cls)[:, 0]), sim


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("axis", ["steps", "steps+calls"])
def test_full_update_equals_the_original_per_view(views, axis):
    model = _vivit()
    clip = _clips(views)
    emodel = evtrace.transform(model, clip, All(), stream_axis=axis)
    with torch.no_grad():
        want = model(clip)
        for call in range(2):  # the second call continues (steps+calls) or starts afresh (steps)
            assert _relative(emodel(clip), want) <= 1e-4, (axis, call)


def test_partial_policy_matches_the_independent_reference():
    model = _vivit()
    clip = _clips(2)
    policy = TopK(6)
    emodel = evtrace.transform(model, clip, policy, stream_axis="steps")
    with torch.no_grad():
        want, _ = _reference(model, clip, policy)
        got = emodel(clip)
        dense = model(clip)
    assert _relative(got, want) <= 1e-4
    assert _relative(got, dense) > 1e-3  # the policy really skipped tokens


def test_state_is_reset_between_calls_and_carried_when_sliding():
    model = _vivit()
    first, second = _clips(1, seed=1), _clips(1, seed=2)
    policy = TopK(6)
    # unrelated random clips: the detector would call the next clip's first step a cut
    fresh = evtrace.transform(model, second, policy, stream_axis="steps", scene_cut=None)
    reset = evtrace.transform(model, first, policy, stream_axis="steps", scene_cut=None)
    sliding = evtrace.transform(model, first, policy, stream_axis="steps+calls", scene_cut=None)
    with torch.no_grad():
        want_fresh = fresh(second)
        reset(first)
        sliding(first)
        assert torch.allclose(reset(second), want_fresh, atol=1e-6)  # nothing of the first clip left
        _, sim = _reference(model, first, policy)
        want_sliding, _ = _reference(model, second, policy, carry_from=sim)
        got_sliding = sliding(second)
    assert _relative(got_sliding, want_sliding) <= 1e-4
    assert _relative(got_sliding, want_fresh) > 1e-4  # the carried state changed the result


def test_views_of_a_batch_are_independent_streams():
    model = _vivit()
    clips = _clips(3)
    policy = TopK(5)
    batched = evtrace.transform(model, clips, policy, stream_axis="steps")
    alone = evtrace.transform(model, clips[1:2], policy, stream_axis="steps")
    with torch.no_grad():
        assert torch.allclose(batched(clips)[1:2], alone(clips[1:2]), atol=1e-5)


def test_counts_per_call_agree_with_an_independent_count():
    """count_flops of the step-wise model == the spatial encoder counted as an ordinary
    eventful model (first frame + (T'-1) steady) + the temporal model and head counted dense;
    the sympy model agrees."""
    model = _vivit()
    clip = _clips(2)
    policy = TopK(6)
    emodel = evtrace.transform(model, clip, policy, stream_axis="steps", attention="paper")
    step_clip = clip[:, :, :2]
    spatial = evtrace.transform(_OneStep(model).eval(), step_clip, policy, attention="paper")
    per_view = evtrace.count_flops(spatial, step_clip)
    temporal_in = torch.zeros(2, STEPS, 64)
    temporal = evtrace.count_flops(model.temporal, temporal_in).steady
    head = 2 * (64 * 5 + 5)  # two views, a linear 64 -> 5 with bias
    want = per_view.first_frame + (STEPS - 1) * per_view.steady + temporal + head
    got = evtrace.count_flops(emodel, clip)
    assert got.steady == got.first_frame == want
    assert emodel.report().costs.steady() == want  # the sympy model at the policy in force
    assert build_cost_model(emodel.plan).dense() == evtrace.count_flops(model, clip).steady
    assert set(got.per_layer) >= {r.name for r in emodel.plan.gated_regions}


def test_sliding_counts_steady_calls_at_the_policy_only():
    model = _vivit()
    clip = _clips(1)
    emodel = evtrace.transform(model, clip, TopK(6), stream_axis="steps+calls", attention="paper")
    count = evtrace.count_flops(emodel, clip)
    assert count.steady < count.first_frame
    assert emodel.report().costs.steady() == count.steady


def test_inspect_reports_the_per_step_sub_model_and_the_report_the_stream():
    model = _vivit()
    clip = _clips(1)
    text = str(evtrace.inspect(model, clip))
    assert "spatial runs once per time step: 4 steps x 1 view(s)" in text
    assert "stream_axis='steps'" in text
    report = str(evtrace.transform(model, clip, TopK(6), stream_axis="steps").report())
    assert "the stream is the 4 time steps inside each call" in report
    assert "FLOPs per call (4 time steps)" in report


def test_a_model_without_time_steps_is_refused_with_the_reason():
    model, image = small_vit()
    with pytest.raises(ValueError, match="no sub-model that runs once per time step.*no time axis"):
        evtrace.transform(model, image, stream_axis="steps")
    assert "time steps" not in str(evtrace.inspect(model, image))


def test_joint_and_divided_attention_keep_the_calls_and_say_why():
    pytest.importorskip("transformers")
    from evtrace.tools.coverage import families

    zoo = families()
    reasons = {
        "hf_vivit": "tokens of one sequence and its attention mixes them",
        "hf_videomae": "tokens of one sequence and its attention mixes them",
        "hf_timesformer_eager": "divided space-time attention",
    }
    for name, reason in reasons.items():
        model, clip = zoo[name].build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match=reason):
                evtrace.transform(model, clip, stream_axis="steps")
            line = evtrace.inspect(model, clip).time_steps
            assert line.startswith("eventful across calls only: ") and reason in line, (name, line)


def test_bad_stream_axis_and_short_clips_get_clear_errors():
    model = _vivit()
    clip = _clips(1)
    with pytest.raises(ValueError, match="stream_axis must be one of"):
        evtrace.transform(model, clip, stream_axis="time")
    emodel = evtrace.transform(model, clip, TopK(6), stream_axis="steps")
    with torch.no_grad():
        emodel(clip)
        with pytest.raises(ValueError, match=r"clips of shape \(views, 3, 8, 32, 32\)"):
            emodel(clip[:, :, :6])
        assert (
            _relative(emodel(clip), evtrace.transform(model, clip, TopK(6), stream_axis="steps")(clip)) < 1e-6
        )


def test_step_loop_rejects_folded_inputs_of_another_size():
    model = _vivit()
    clip = _clips(1)
    emodel = evtrace.transform(model, clip, TopK(6), stream_axis="steps")
    loop = emodel.graph_module.evtrace_steps
    with pytest.raises(ValueError, match="built for 1 view\\(s\\) x 4 time steps"):
        loop(torch.zeros(3 * 4, 16, 64))


def test_a_sliding_stream_survives_pickling_and_moves_between_models():
    import io
    import pickle

    model = _vivit()
    clip = _clips(2)
    emodel = evtrace.transform(model, clip, TopK(6), stream_axis="steps+calls")
    with torch.no_grad():
        emodel(clip)
        restored = pickle.loads(pickle.dumps(emodel))
        other = evtrace.transform(model, clip, TopK(6), stream_axis="steps+calls")
        saved = io.BytesIO()
        emodel.save_stream(saved)
        saved.seek(0)
        other.load_stream(saved)
        want = emodel(clip)
        assert torch.equal(restored(clip), want)
        assert torch.equal(other(clip), want)


@pytest.mark.parametrize("axis", ["steps", "steps+calls"])
def test_export_keeps_the_time_step_stream(axis):
    from evtrace.deploy import export

    model = _vivit()
    clips = [_clips(1, seed=s) for s in (1, 2, 3)]
    with pytest.warns(UserWarning, match="does not detect scene cuts between the time steps"):
        export(evtrace.transform(model, clips[0], TopK(6), stream_axis=axis), clips[0])
    emodel = evtrace.transform(model, clips[0], TopK(6), stream_axis=axis, scene_cut=None)
    reference = evtrace.transform(model, clips[0], TopK(6), stream_axis=axis, scene_cut=None)
    program = export(emodel, clips[0])
    with torch.no_grad():
        for clip in clips:  # the sliding stream's state carries from call to call in the program too
            assert torch.allclose(program(clip), reference(clip), atol=1e-6)


class _PerFrame(torch.nn.Module):
    """A per-frame image encoder, then a temporal model: one frame per time step."""

    def __init__(self, steps: int):
        super().__init__()
        from models_zoo import vit
        from models_zoo.vivit import TransformerEncoder

        torch.manual_seed(0)
        self.encoder = vit(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=0)
        self.temporal = TransformerEncoder(steps, 64, 1, 4)
        self.steps = steps

    def forward(self, clip):  # (B, 3, T, H, W)
        tokens = self.encoder.forward_features(clip.transpose(1, 2).flatten(0, 1))
        return self.temporal(tokens[:, 0].unflatten(0, (-1, self.steps)))[:, 0], tokens.unflatten(
            0, (-1, self.steps)
        )


def test_a_cut_between_time_steps_restarts_that_view_at_that_step():
    from tests.models import real_frames

    model = _PerFrame(8).eval()
    cut = torch.stack(real_frames(64, 4, clip="bigbuckbunny") + real_frames(64, 4, clip="carphone"), dim=2)
    smooth = torch.stack(real_frames(64, 8, clip="bigbuckbunny"), dim=2)
    clips = torch.cat([smooth, cut])  # view 0 smooth, view 1 cut at step 4
    detecting = evtrace.transform(model, clips, TopK(4), stream_axis="steps")
    blind = evtrace.transform(model, clips, TopK(4), stream_axis="steps", scene_cut=None)
    with torch.no_grad():
        _, dense = model(clips)
        _, got = detecting(clips)
        _, without = blind(clips)
    loop = detecting.graph_module.evtrace_steps
    assert loop.last_cuts == [(4, 1)]
    assert _relative(got[1, 4], dense[1, 4]) < 1e-5  # the cut step is computed densely
    assert _relative(without[1, 4], dense[1, 4]) > 0.1
    assert torch.equal(got[:, :4], without[:, :4]) and torch.equal(got[0], without[0])  # nothing else moved
    assert blind.graph_module.evtrace_steps.last_cuts == []


def test_the_tubelet_model_detects_a_cut_on_its_step_tokens():
    from tests.models import real_frames

    model = _vivit(num_frames=16, img_size=64)
    cut = torch.stack(real_frames(64, 8, clip="bigbuckbunny") + real_frames(64, 8, clip="carphone"), dim=2)
    smooth = torch.stack(real_frames(64, 16, clip="bigbuckbunny"), dim=2)
    emodel = evtrace.transform(model, cut, TopK(16), stream_axis="steps")
    loop = emodel.graph_module.evtrace_steps
    with torch.no_grad():
        emodel(cut)
        assert loop.last_cuts == [(4, 0)]  # frames 8 and 9: the fifth tubelet
        emodel(smooth)
        assert loop.last_cuts == []


def test_torch_compile_keeps_the_time_step_stream():
    from tests.models import real_frames

    model = _vivit(num_frames=16, img_size=64)
    clips = [torch.stack(real_frames(64, 16, clip="bigbuckbunny", start=s), dim=2) for s in (40, 60, 40)]
    eager = evtrace.transform(model, clips[0], TopK(16), stream_axis="steps+calls")
    compiled = torch.compile(evtrace.transform(model, clips[0], TopK(16), stream_axis="steps+calls"))
    with torch.no_grad():
        for clip in clips:  # smooth clips: no cut fires in eager mode, where the detector runs
            assert _relative(compiled(clip), eager(clip)) < 1e-5
