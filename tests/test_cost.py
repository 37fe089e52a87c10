"""Cost accounting: count_flops in both conventions, the sympy cost model, state memory, the
paper's dense figures, and bad input.

Absolute numbers are checked against hand formulas (a tiny ViT) and the published figures; the
cost model (built from the analysis records) is checked against the runtime count (ATen ops).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import evtrace
from evtrace.cost.count import count_flops
from evtrace.runtime.attention import ExactDeltaAttention
from models_zoo import vitdet_b, vivit_b
from tests.models import ZOO, small_vit, small_vitdet, small_vivit

# small ViT of tests.models: 64 px, patch 16 -> 16 patches + class token; D 64, 4 heads, depth 2,
# MLP 4D, 10 classes
N, D, H, DEPTH, CLASSES = 17, 64, 4, 2, 10


def vit_block_paper(rows: int, tokens: int = N) -> int:
    """One pre-norm block, paper convention: qkv, proj, fc1, fc2 (MACs + bias adds) on ``rows``
    tokens, two residual adds, attention products on all ``tokens``."""
    linears = rows * (D * 3 * D + 3 * D + D * D + D + D * 4 * D + 4 * D + 4 * D * D + D)
    return linears + 2 * rows * D + 2 * tokens * tokens * D


def test_tiny_vit_dense_matches_hand_formula():
    model, x = small_vit()
    count = count_flops(model, x)
    # position embedding add on N tokens; head on the class token
    expected = DEPTH * vit_block_paper(N) + N * D + (D * CLASSES + CLASSES)
    assert count.total == count.steady == count.first_frame == expected
    assert sum(count.per_layer.values()) == expected
    assert count.per_layer["head"] == D * CLASSES + CLASSES
    assert count.per_layer["blocks.0.attn.qkv"] == N * (3 * D * D + 3 * D)
    assert count.gflops == expected / 1e9


@pytest.mark.parametrize("r", [1, 5, 17])
def test_tiny_vit_eventful_dense_attention_matches_hand_formula(r):
    model, x = small_vit()
    emodel = evtrace.transform(model, x, policy=r, attention="dense")
    count = count_flops(emodel, x)
    # gates: c - p on each gate input (N x D each): region 0 gates the block input (1 input);
    # the other two gate the attention output and the residual stream (2 inputs); the norms are
    # reductions, free
    gates = N * D + 2 * (2 * N * D)
    sparse = DEPTH * (vit_block_paper(r) - 2 * N * N * D) + r * D  # pos-embed add inside region 0
    attention = DEPTH * 2 * N * N * D
    assert count.steady == sparse + gates + attention + D * CLASSES + CLASSES
    assert count.tokens_per_gate == {name: r for name in emodel.regions()}


def test_sdpa_and_explicit_attention_count_the_same():
    for convention in ("paper", "fvcore"):
        explicit = count_flops(*ZOO["vit"](), convention=convention).total
        fused = count_flops(*ZOO["vit_sdpa"](), convention=convention).total
        assert explicit == fused


def test_fvcore_convention_on_a_tiny_vit_is_macs():
    model, x = small_vit()
    count = count_flops(model, x, "fvcore")
    macs = DEPTH * (N * (3 * D * D + D * D + 8 * D * D) + 2 * N * N * D) + D * CLASSES
    layer_norm = (2 * DEPTH + 1) * 5 * N * D  # fvcore's estimate for affine LayerNorm
    patch_conv = 16 * (3 * 16 * 16) * D
    assert count.total == macs + layer_norm + patch_conv


@pytest.mark.parametrize("name", sorted(ZOO))
def test_fvcore_counts_every_op_of_every_zoo_model(name):
    # no op of a zoo model falls to the generic rule (fvcore's unsupported list is empty); the
    # eventful models are counted on their first frame and in the steady state
    model, x = ZOO[name]()
    dense = count_flops(model, x, "fvcore")
    assert dense.generic_ops == {}
    for mode in ("exact", "paper"):
        emodel = evtrace.transform(model, x, policy=2, attention=mode)
        count = count_flops(emodel, x, "fvcore")
        assert count.generic_ops == {}
        # fvcore prices an einsum from numpy's einsum_path report, rounded to 4 significant digits:
        # the same rel-pos terms spelled as another equation (windows delta-updated as groups) may
        # differ by that rounding
        assert abs(count.first_frame - dense.total) <= 1e-6 * dense.total
        assert 0 < count.steady < dense.total


@pytest.mark.parametrize("name, rs", [("vit", [1, 4, 17]), ("vitdet", [3, 20, 100]), ("vivit", [1, 2, 3])])
@pytest.mark.parametrize("mode, overhead", [("exact", 0), ("exact", None), ("paper", None), ("dense", None)])
def test_cost_formula_equals_the_count(name, rs, mode, overhead, monkeypatch):
    if overhead is not None:  # small sites always take the full recompute; without the overhead term
        # the delta branch of the formula is the one compared at small r
        monkeypatch.setattr(ExactDeltaAttention, "delta_overhead_macs", overhead)
    model, x = ZOO[name]()
    emodel = evtrace.transform(model, x, policy=rs[0], attention=mode)
    for r in rs:
        emodel.set_policy(r)
        count = count_flops(emodel, x)
        costs = emodel.report().costs
        assert costs.per_layer() == count.per_layer
        assert costs.per_layer(first_frame=True) == count.first_frame_per_layer
        assert costs.steady() == count.steady and costs.first_frame() == count.first_frame
    assert costs.dense() == count_flops(model, x).total
    text = emodel.report().cost_formula()
    lines = [line.strip() for line in text.splitlines()]
    assert (
        lines[-1]
        == f"total: {costs.steady():,} steady, {costs.first_frame():,} first frame, {costs.dense():,} dense"
    )
    for layer, value in costs.per_layer().items():  # every layer, with its own count at the last r
        assert any(line.startswith(f"{layer} (") and line.endswith(f"= {value:,}") for line in lines), layer
    regions = [line for line in lines if " (region): " in line]
    assert len(regions) == len(emodel.regions())
    assert all(f"r={rs[-1]}" in line.replace(",", " ").split() for line in regions)


def test_count_does_not_touch_the_model_state():
    model, x = small_vitdet()
    emodel = evtrace.transform(model, x, policy=10)
    frames = [x, x + 0.1 * torch.randn_like(x), x + 0.2 * torch.randn_like(x)]
    emodel(frames[0])
    before = {k: v.clone() for k, v in emodel.graph_module.state_dict(keep_vars=True).items()}
    buffers = [b.clone() for b in emodel.graph_module.buffers()]
    count_flops(emodel, x)
    count_flops(emodel, x, "fvcore", policy=3)
    assert all(torch.equal(a, b) for a, b in zip(buffers, emodel.graph_module.buffers()))
    assert all(torch.equal(v, emodel.graph_module.state_dict()[k]) for k, v in before.items())
    assert repr(emodel.policy) == "TopK(r=10)"
    fresh = evtrace.transform(model, x, policy=10)
    fresh(frames[0])
    with torch.no_grad():
        for frame in frames[1:]:
            torch.testing.assert_close(emodel(frame), fresh(frame))


def test_policies_enter_as_documented():
    model, x = small_vit()
    emodel = evtrace.transform(model, x, policy=5)
    topk = count_flops(emodel, x, policy=evtrace.TopK(9)).steady
    assert count_flops(emodel, x, policy=evtrace.TopFraction(0.5)).steady == topk  # ceil(0.5 * 17) = 9
    assert count_flops(emodel, x, policy=evtrace.FixedCapacityThreshold(0.1, 9)).steady == topk
    everything = count_flops(emodel, x, policy=evtrace.All()).steady
    threshold = count_flops(emodel, x, policy=evtrace.Threshold(0.1))
    assert threshold.steady == everything and set(threshold.tokens_per_gate.values()) == {N}


@pytest.mark.parametrize("img_size, published", [(672, 174.5), (1024, 467.4)])
def test_vitdet_b_dense_paper_figures(img_size, published):
    with torch.device("meta"):
        model = vitdet_b(img_size=img_size, with_pyramid=False).eval()
    count = count_flops(model, torch.empty(1, 3, img_size, img_size, device="meta"))
    assert abs(count.gflops / published - 1) < 0.005, count.gflops


def test_vivit_b_epic_kitchens_figure():
    with torch.device("meta"):
        model = vivit_b(num_frames=32, img_size=320, num_classes=300).eval()
    count = count_flops(model, torch.empty(1, 3, 32, 320, 320, device="meta"))
    assert round(12 * count.total / 1e12, 2) == 7.12


def test_state_memory_in_the_report():
    model, x = small_vitdet()
    emodel = evtrace.transform(model, x, policy=10, attention="paper")
    emodel(x)
    costs = emodel.report().costs
    ours = emodel.state_bytes(per_layer=True)
    for name in emodel.regions():
        assert next(layer for layer in costs.layers if layer.name == name).state_bytes == ours[name]
    attention = next(layer for layer in costs.layers if layer.kind == "attention (paper)")
    assert attention.state_bytes == sum(v for k, v in ours.items() if k.startswith("evtrace_attention"))
    # the paper's layout, by hand: 3 blocks of 8 N D floats; the global block adds two H N N
    # tensors and 2 N D
    tokens, dim, heads = 100, 64, 2
    assert costs.paper_state_bytes() == 4 * (
        3 * 8 * tokens * dim + 2 * heads * tokens * tokens + 2 * tokens * dim
    )
    text = str(emodel.report())
    assert "state (paper layout)" in text and "steady GFLOPs" in text and "fewer" in text


def test_inspect_prints_savings_at_a_policy():
    model, x = small_vivit()
    plain = evtrace.inspect(model, x)
    assert plain.costs.dense() == count_flops(model, x).total
    report = evtrace.inspect(model, x, policy=2)
    emodel = evtrace.transform(model, x, policy=2)
    assert report.costs.steady() == count_flops(emodel, x).steady
    assert "x fewer" in str(report)


class _Cumsum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=-1) + x


@pytest.mark.parametrize("convention", ["paper", "fvcore"])
def test_an_op_without_a_rule_is_counted_and_named(convention):
    # the generic rule: one FLOP per output element; the add is free in fvcore's convention
    count = count_flops(_Cumsum(), torch.randn(2, 8), convention)
    assert count.generic_ops == {"aten::cumsum": 16}
    assert count.total == 16 + (16 if convention == "paper" else 0)


def test_unknown_convention():
    model, x = small_vit()
    with pytest.raises(ValueError, match="'paper', 'fvcore'"):
        count_flops(model, x, "macs")
    with pytest.raises(ValueError, match="eventful"):
        count_flops(model, x, policy=3)
