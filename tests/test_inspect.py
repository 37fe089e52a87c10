import json

import pytest
import torch
from torch import nn

import evtrace
from tests.models import ZOO, ZOO_SITES, hf_models, small_vit

MAIN_PATH_LINEARS = (
    "qkv",
    "proj",
    "fc1",
    "fc2",
    "query",
    "key",
    "value",
    "dense",
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
)


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_zoo_models(name, frontend):
    model, x = ZOO[name]()
    report = evtrace.inspect(model, x, frontend=frontend)
    assert len(report.sites) == ZOO_SITES[name]
    block_linears = [lin for lin in report.linears if ".blocks." in "." + lin.module]
    assert block_linears and all(lin.status == "sparse" for lin in block_linears), [
        (lin.module, lin.reason) for lin in block_linears if lin.status != "sparse"
    ]
    assert report.fallbacks == []
    for site in report.sites:
        assert site.q_from.endswith("qkv") and site.output_projection.endswith("proj")


def test_vit_report_counts_and_dense_head():
    model, x = small_vit(depth=3)
    report = evtrace.inspect(model, x)
    assert len(report.sparse_linears) == 12
    head = [lin for lin in report.linears if lin.module == "head"][0]
    assert head.status == "dense" and "readout" in head.reason
    assert [r.entries for r in report.regions][0] == ["cat"]
    assert all(r.gated for r in report.regions)


def test_vitdet_windowed_sites_are_delta_updated_per_window_and_head():
    model, x = ZOO["vitdet"]()
    report = evtrace.inspect(model, x)
    windowed = [s for s in report.sites if s.windowed]
    # 160 px, patch 16: a 10 x 10 grid padded to 12 x 12, nine 4 x 4 windows, two heads
    assert len(windowed) == 2 and all(s.mode == "exact" and s.heads == (18, 1, 16, 32) for s in windowed)
    planned = evtrace.inspect(model, x, policy=2).sites  # the plan of transform's default mode
    assert [s.mode for s in planned] == ["exact"] * 3
    paper = evtrace.transform(model, x, policy=2, attention="paper").report().sites
    assert [s.mode for s in paper if s.windowed] == ["dense", "dense"]
    assert all(
        s.reason == "grouped (windowed) attention is delta-updated in exact mode only"
        for s in paper
        if s.windowed
    )
    glob = [s for s in report.sites if not s.windowed][0]
    assert glob.bias == "decomposed_rel_pos" and glob.reason == "" and glob.heads == (1, 2, 100, 32)


@pytest.mark.parametrize("name", ["hf_vit", "hf_vivit", "hf_vitdet", "hf_dinov2"])
def test_hf_transformers_models(name):
    make, x, layers = hf_models()[name]
    report = evtrace.inspect(make(), x)
    assert report.frontend == "export"
    assert len(report.sites) == layers
    assert report.fallbacks == []
    assert len(report.sparse_linears) >= 4 * layers
    if name == "hf_vitdet":
        assert all(s.bias == "decomposed_rel_pos" for s in report.sites)


def test_report_text_and_json():
    model, x = small_vit()
    report = evtrace.inspect(model, x)
    text = str(report)
    assert "blocks.0.attn.qkv" in text and "blocks.1.attn" in text and "dense head" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["sites"][0]["heads"] == [1, 4, 17, 16]
    assert data["regions"][0]["linears"] == ["blocks.0.attn.qkv"]


class WithUnknownOp(nn.Module):
    """A ViT whose MLP uses an op evtrace has no rule for (cumsum over channels)."""

    def __init__(self):
        super().__init__()
        self.vit, _ = small_vit(depth=1)

    def forward(self, x):
        tokens = self.vit.forward_features(x)
        return torch.cumsum(tokens, dim=-1)


def test_unknown_op_on_a_token_path_is_a_dense_fallback_with_its_reason():
    model = WithUnknownOp().eval()
    report = evtrace.inspect(model, torch.randn(1, 3, 64, 64))
    assert [f.op for f in report.fallbacks] == ["cumsum"]
    assert "no token rule for op 'cumsum'" in report.fallbacks[0].reason
    assert "cumsum" in str(report)
