"""passes.regions: token-wise nodes grouped into regions between token-mixing ops."""

from evtrace.graph.meta import region_of
from passes.pipeline import PIPELINE, analyze
from tests.passes_models import Attention, NoLinear, TokenMLP, image

UNTIL_REGIONS = PIPELINE[: [p.name for p in PIPELINE].index("regions") + 1]


def test_a_residual_mlp_is_one_gated_region():
    ctx = analyze(TokenMLP().eval(), image(), frontend="fx", passes=UNTIL_REGIONS)
    (region,) = ctx.regions
    assert region.gated and region.name == "fc1..fc2"
    assert [h.name for h in region.heavy] == ["fc1", "fc2"]
    assert [e.name for e in region.entries] == ["transpose"]  # the patch tokens, made outside
    assert [x.name for x in region.exits] == ["add"]
    assert all(region_of(n) == region.name for n in region.nodes)


def test_attention_splits_regions_and_its_nodes_stay_outside():
    ctx = analyze(Attention().eval(), image(), frontend="fx", passes=UNTIL_REGIONS)
    assert [r.name for r in ctx.regions] == ["qkv", "proj"]
    (site,) = ctx.sites
    assert not any(region_of(n) for n in site.nodes)


def test_no_linear_means_no_gate():
    ctx = analyze(NoLinear().eval(), image(), frontend="fx", passes=UNTIL_REGIONS)
    (region,) = ctx.regions
    assert not region.gated
    assert region.dense_reason == "no linear inside: gating would cost more than it saves"
