"""The pack_linears pass and PackedLinear: linears on gathered rows with packed oneDNN weights.

What must hold: a packed linear equals ``F.linear`` (float rounding only); it falls back to
``F.linear`` wherever the packed kernel does not apply; it sees weight changes (new tensor,
in-place write) and is told about ``.data`` writes; the pass rewrites the sparse graphs' linears
with stored weights and nothing else; the eventful model, its FLOP count, copies and pickles are
unchanged by it.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import evtrace
from evtrace.runtime.gates import SparseRegion
from evtrace.runtime.packed import (
    MAX_PACKED_ROWS,
    MIN_PACKED_ROWS,
    PackedLinear,
    PackedSiblingLinears,
    packing_available,
    with_packed_linears,
)
from evtrace.runtime.policies import All, TopK
from passes.canonicalize import Canonicalize
from passes.context import PassContext
from passes.pack_linears import pack_graph
from tests.models import small_vit

needs_onednn = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def frames(x: torch.Tensor, count: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out, frame = [], x.clone()
    for _ in range(count):
        frame = frame.clone()
        frame[..., :16, :32] += torch.randn(frame[..., :16, :32].shape, generator=gen)
        out.append(frame)
    return out


def vit_and_frame():
    """A small ViT with 37 tokens: TopK(20) gathers 20 rows, enough for the packed kernel."""
    return small_vit(img_size=96)


R = 20


def packed_modules(emodel) -> list:
    return [m for m in emodel.graph_module.modules() if isinstance(m, (PackedLinear, PackedSiblingLinears))]


@needs_onednn
@pytest.mark.parametrize("shape", [(20, 32), (2, 10, 32), "transposed"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_linear_equals_linear(shape, with_bias):
    weight = nn.Parameter(torch.randn(48, 32))
    bias = torch.randn(48) if with_bias else None
    x = torch.randn(32, 20).t() if shape == "transposed" else torch.randn(*shape)
    kernel = PackedLinear("layer")
    with torch.inference_mode():
        out = kernel(x, weight, bias)
    assert kernel.packed
    assert rel_err(out, F.linear(x, weight, bias)) < 1e-5


@needs_onednn
def test_falls_back_where_packing_does_not_apply():
    weight, bias = nn.Parameter(torch.randn(8, 4)), torch.randn(8)
    x = torch.randn(MIN_PACKED_ROWS + 4, 4)  # packed, but for the condition each case breaks
    cases = {
        "float64": lambda k: k(x.double(), weight.double(), bias.double()),
        "gradients": lambda k: k(x, weight, bias),  # weight requires grad, grad mode on
        "meta": lambda k: k(x.to("meta"), weight.to("meta"), bias.to("meta")),
    }
    for name, call in cases.items():
        kernel = PackedLinear(name)
        call(kernel)
        assert not kernel.packed, name
    with torch.inference_mode():
        made_in_inference = torch.randn(8, 4)
        kernel = PackedLinear("inference tensor")
        kernel(x, made_in_inference, bias)
        assert not kernel.packed
    kernel = PackedLinear("counted")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        kernel(x, weight, bias)
    assert not kernel.packed and counter.get_total_flops() == 2 * x.shape[0] * 4 * 8
    kernel = PackedLinear("disabled")
    with torch.no_grad(), warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=False):
        warnings.simplefilter("ignore")  # oneDNN's TF32 notice
        out = kernel(x, weight, bias)
    assert not kernel.packed and torch.equal(out, F.linear(x, weight, bias))
    kernel = PackedLinear("traced")
    plain_weight = weight.detach()
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: kernel(t, plain_weight, bias), (x,), check_trace=False)
    assert not kernel.packed and "aten::linear" in str(traced.graph) and "mkldnn" not in str(traced.graph)


@needs_onednn
def test_repacks_when_the_weight_changes():
    layer = nn.Linear(16, 24)
    kernel = PackedLinear("layer")
    x = torch.randn(20, 16)
    with torch.no_grad():
        kernel(x, layer.weight, layer.bias)
        assert kernel.packed
        layer.weight.mul_(-2.0)  # in place: the version counter moves
        assert rel_err(kernel(x, layer.weight, layer.bias), layer(x)) < 1e-5
        layer.weight = nn.Parameter(torch.randn(24, 16))  # another tensor
        assert rel_err(kernel(x, layer.weight, layer.bias), layer(x)) < 1e-5
        layer.weight.data.copy_(torch.randn(24, 16))  # torch records no write: stale until told
        assert rel_err(kernel(x, layer.weight, layer.bias), layer(x)) > 1e-2
        kernel.invalidate()
        assert rel_err(kernel(x, layer.weight, layer.bias), layer(x)) < 1e-5


class StoredAndComputedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        x = self.proj(x)
        x = F.linear(x, self.weight)
        return F.linear(x, self.weight * self.scale)  # computed each call: nothing to keep packed


@needs_onednn
def test_pass_packs_stored_weights_only():
    model = StoredAndComputedWeights().eval()
    gm = torch.fx.symbolic_trace(model)
    Canonicalize().run(gm, PassContext(gm))
    x = torch.randn(2, 10, 8)
    expected = model(x)
    names = pack_graph(gm)
    assert len(names) == 2
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in names]
    assert [n.args[1].target for n in calls] == ["proj.weight", "weight"]
    assert sum(n.op == "call_function" and n.target is F.linear for n in gm.graph.nodes) == 1
    with torch.inference_mode():
        assert rel_err(gm(x), expected) < 1e-5


@needs_onednn
def test_transform_packs_the_region_graphs_with_one_kernel_per_weight():
    model, x = vit_and_frame()
    packed = evtrace.transform(model, x, TopK(R))
    plain = evtrace.transform(model, x, TopK(R), pack_weights=False)
    regions = [m for m in packed.graph_module.modules() if isinstance(m, SparseRegion)]
    for region in regions:
        for graph in (region.sparse, region.dense):
            calls = [n for n in graph.graph.nodes if n.op == "call_module"]
            assert not any(isinstance(graph.get_submodule(n.target), nn.Linear) for n in calls)
        sparse_kernels = {id(m) for m in region.sparse.modules() if isinstance(m, PackedLinear)}
        dense_kernels = {id(m) for m in region.dense.modules() if isinstance(m, PackedLinear)}
        assert sparse_kernels == dense_kernels  # one packed copy per weight
    kernels = {id(m): m for m in packed.graph_module.modules() if isinstance(m, PackedLinear)}
    assert len(kernels) == 8  # qkv, proj, fc1, fc2 of both blocks; the head is outside the regions
    head_calls = [n for n in packed.graph_module.graph.nodes if n.op == "call_module" and n.target == "head"]
    assert len(head_calls) == 1  # outside every region: a plain nn.Linear call
    assert not packed_modules(plain)
    with torch.inference_mode():
        for frame in frames(x):
            assert rel_err(packed(frame), plain(frame)) < 1e-5
    assert all(m.packed for m in kernels.values())
    for kernel in kernels.values():  # a steady frame alone packs them again: the sparse graphs use them
        kernel.invalidate()
    with torch.inference_mode():
        packed(frames(x)[0])
    assert all(m.packed for m in kernels.values())
    assert evtrace.count_flops(packed, x).steady == evtrace.count_flops(plain, x).steady
    assert evtrace.count_flops(packed, x).first_frame == evtrace.count_flops(plain, x).first_frame


@needs_onednn
def test_very_few_or_many_rows_run_unpacked():
    weight = torch.randn(16, 8)
    kernel = PackedLinear("wide")
    with torch.inference_mode():
        for rows in (1, MIN_PACKED_ROWS - 1, MAX_PACKED_ROWS + 1):
            out = kernel(torch.randn(rows, 8), weight)
            assert not kernel.packed and out.shape == (rows, 16)
        kernel(torch.randn(MAX_PACKED_ROWS, 8), weight)
        assert kernel.packed


@needs_onednn
def test_full_update_still_equals_the_original():
    model, x = vit_and_frame()
    emodel = evtrace.transform(model, x, All(), scene_cut=None)
    with torch.inference_mode():
        for frame in frames(x):
            assert rel_err(emodel(frame), model(frame)) < 1e-5


@needs_onednn
def test_new_weights_reach_the_packed_copies():
    model, x = vit_and_frame()
    other, _ = vit_and_frame()
    other.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
    emodel = evtrace.transform(model, x, TopK(R))
    reference = evtrace.transform(other, x, TopK(R), pack_weights=False)
    clip = frames(x)
    with torch.inference_mode():
        for frame in clip[:2]:
            emodel(frame)
    emodel.load_state_dict(other.state_dict())
    emodel.reset()
    with torch.inference_mode():
        for frame in clip:
            assert rel_err(emodel(frame), reference(frame)) < 1e-5


@needs_onednn
def test_reset_packed_weights_after_a_data_write():
    model, x = vit_and_frame()
    emodel = evtrace.transform(model, x, TopK(R), scene_cut=None)
    clip = frames(x)
    with torch.inference_mode():
        for frame in clip[:2]:
            emodel(frame)
        for p in model.parameters():
            p.data.mul_(0.5)
        emodel.reset_packed_weights()
        assert not any(m.packed for m in packed_modules(emodel))
        emodel.reset()
        reference = evtrace.transform(model, x, TopK(R), scene_cut=None, pack_weights=False)
        for frame in clip:
            assert rel_err(emodel(frame), reference(frame)) < 1e-5


@needs_onednn
def test_copies_and_pickles_drop_the_packed_copies():
    model, x = vit_and_frame()
    emodel = evtrace.transform(model, x, TopK(R))
    clip = frames(x)
    for make_copy in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        emodel.reset()
        with torch.inference_mode():
            emodel(clip[0])
            emodel(clip[1])
        restored = make_copy(emodel)
        assert not any(m.packed for m in packed_modules(restored))
        with torch.inference_mode():
            for frame in clip[2:]:
                assert rel_err(restored(frame), emodel(frame)) < 1e-5
        assert all(m.packed for m in packed_modules(restored))


@needs_onednn
def test_export_front_end_linears_are_packed():
    import transformers as tf

    config = tf.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=7
    )
    model, x = tf.Dinov2Model(config).eval(), torch.randn(1, 3, 56, 56)  # 65 tokens
    packed = evtrace.transform(model, x, TopK(R))
    plain = evtrace.transform(model, x, TopK(R), pack_weights=False)
    assert packed_modules(packed) and not packed_modules(plain)
    with torch.inference_mode():
        for frame in frames(x, 4):
            a, b = packed(frame), plain(frame)
            a = a.last_hidden_state if hasattr(a, "last_hidden_state") else a
            b = b.last_hidden_state if hasattr(b, "last_hidden_state") else b
            assert rel_err(a, b) < 1e-5
    assert all(m.packed for m in packed_modules(packed))
    siblings = [m for m in packed_modules(packed) if isinstance(m, PackedSiblingLinears)]
    assert len(siblings) == 2  # query, key and value of each layer: one product of the stacked weights
    assert all(m.store is packed._packed_weights for m in packed_modules(packed))


class ThreeProjections(nn.Module):
    """q, k and v projections of one input (as HF attention layers have them), then their use."""

    def __init__(self, bias=(True, True, True)):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(8, d, bias=b) for d, b in zip((8, 8, 12), bias))

    def forward(self, x):
        return self.q(x).sum(-1) + self.k(x).sum(-1) * self.v(x).mean(-1)


@needs_onednn
def test_linears_of_one_input_run_as_one_product():
    model = ThreeProjections().eval()
    gm = torch.fx.symbolic_trace(model)
    Canonicalize().run(gm, PassContext(gm))
    names = pack_graph(gm)
    kernels = [gm.get_submodule(n) for n in names]
    assert len(kernels) == 1 and isinstance(kernels[0], PackedSiblingLinears)
    x = torch.randn(2, 10, 8)
    with torch.no_grad():
        assert rel_err(gm(x), model(x)) < 1e-5
        assert kernels[0].packed
        with FlopCounterMode(display=False) as counter:  # counted as the three linears it replaces
            gm(x)
        assert counter.get_total_flops() == 2 * 20 * 8 * (8 + 8 + 12)
        model.k.weight.mul_(-3.0)  # one of the three changes: the stacked copy is packed again
        assert rel_err(gm(x), model(x)) < 1e-5


@needs_onednn
def test_linears_of_one_input_with_and_without_bias_stay_apart():
    model = ThreeProjections(bias=(True, False, True)).eval()
    gm = torch.fx.symbolic_trace(model)
    Canonicalize().run(gm, PassContext(gm))
    names = pack_graph(gm)
    assert len(names) == 3 and all(isinstance(gm.get_submodule(n), PackedLinear) for n in names)
    x = torch.randn(2, 10, 8)
    with torch.inference_mode():
        assert rel_err(gm(x), model(x)) < 1e-5


@needs_onednn
def test_packed_dense_copy():
    model, x = vit_and_frame()
    packed = with_packed_linears(model)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert list(packed.state_dict()) == list(model.state_dict())
    with torch.inference_mode():
        assert rel_err(packed(x), model(x)) < 1e-5
    kernels = {m.kernel.name: m.kernel.packed for m in packed.modules() if hasattr(m, "kernel")}
    assert kernels.pop("head") is False  # one row (the class token): below MIN_PACKED_ROWS
    assert len(kernels) == 8 and all(kernels.values())


def test_pack_weights_must_be_a_bool():
    model, x = vit_and_frame()
    with pytest.raises(TypeError, match="pack_weights must be a bool"):
        evtrace.transform(model, x, TopK(R), pack_weights="yes")


@needs_onednn
def test_every_input_signature_shares_one_packed_copy_per_weight():
    model, x = vit_and_frame()
    emodel = evtrace.transform(model, x, TopK(R))
    pair = torch.cat([x, x.flip(-1)])
    with torch.inference_mode():
        for frame in frames(x, 3):
            emodel(frame)
        for frame in frames(pair, 3):
            emodel(frame)  # a second variant (batch 2), built for this signature
    kernels = [
        m for v in emodel._variants.values() for m in v.graph_module.modules() if isinstance(m, PackedLinear)
    ]
    assert len(emodel._variants) == 2 and len(kernels) == 2 * 8
    stores = {id(k.store) for k in kernels}
    assert len(stores) == 1 and len(kernels[0].store) == 8  # 8 weights, packed once for both
    twin = copy.deepcopy(emodel)
    twin_kernels = [m for m in twin.graph_module.modules() if isinstance(m, PackedLinear)]
    assert len({id(k.store) for k in twin_kernels}) == 1 and twin_kernels[0].store is not kernels[0].store
    assert len(twin_kernels[0].store) == 0
