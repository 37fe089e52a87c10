"""evtrace.tools.steps_fidelity on a tiny random model (no real weights, no clips)."""

from __future__ import annotations

import torch

from evtrace.runtime.policies import All, TopK
from evtrace.tools.steps_fidelity import (
    FactorisedVideo,
    baselines,
    evaluate,
    markdown_table,
    step_cosines,
    summary,
)
from tests.models import small_vit


def _setup():
    vit, _ = small_vit(img_size=32, patch_size=8, embed_dim=32, num_heads=2)
    torch.manual_seed(0)
    model = FactorisedVideo(vit, steps=4, dim=32, tubelet=2, temporal_heads=2).eval()
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 3, 1, 32, 32, generator=g)
    clips = {
        "drift": base + 0.1 * torch.randn(2, 3, 8, 32, 32, generator=g).cumsum(dim=2),
        "noise": torch.randn(2, 3, 8, 32, 32, generator=g),
    }
    return model, clips


def test_full_update_gives_cosine_one_and_partial_less():
    model, clips = _setup()
    points = evaluate(model, clips, [("All", All()), ("TopK(3)", TopK(3))], attentions=("exact",))
    assert len(points) == 4
    full = [p for p in points if p.policy == "All"]
    for p in full:
        assert p.cosine_worst > 1 - 1e-6 and p.cosine_mean > 1 - 1e-6
        assert p.temporal_worst > 1 - 1e-6
        assert abs(p.saving - 1.0) < 0.02  # All recomputes everything (a little gate overhead aside)
    partial = [p for p in points if p.policy == "TopK(3)"]
    for p in partial:
        assert p.r == 3 and p.tokens == 17
        assert p.saving > 1.5 and p.spatial_saving > p.saving  # the dense temporal model saves nothing
        assert p.cosine_worst <= p.cosine_mean < 1.0
        assert p.worst_at[0] in (0, 1) and 1 <= p.worst_at[1] <= 3
    table = markdown_table(points)
    assert "step cosine mean" in table and "step cosine worst" in table and "temporal cosine mean" in table
    assert table.count("\n") == 1 + len(points)
    text = summary(points)
    assert "step cosine worst @2x" in text and "| drift | exact |" in text


def test_step_cosines_per_view_and_step():
    a = torch.randn(2, 3, 5, 4)
    b = a.clone()
    b[1, 2] = -b[1, 2]
    cos = step_cosines(a, b)
    assert cos.shape == (2, 3)
    assert torch.allclose(cos[1, 2], torch.tensor(-1.0, dtype=cos.dtype))
    assert torch.allclose(cos[0], torch.ones(3, dtype=cos.dtype))


def test_baselines_hold_and_full_check():
    model, clips = _setup()
    base = baselines(model, clips, full_check="drift")
    assert set(base["hold"]) == set(base["hold0"]) == {"drift", "noise"}
    assert base["hold0"]["drift"][0] <= base["hold"]["drift"][0]  # drift moves further from step 0
    drift, noise = base["hold"]["drift"], base["hold"]["noise"]
    assert drift[1] <= drift[0] and noise[0] < drift[0]  # independent noise moves more than a drift
    kind, step, temporal = base["full"]
    assert kind == "drift" and step > 1 - 1e-6 and temporal > 1 - 1e-6
