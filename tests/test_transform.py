"""The rewrite against the original model, on real frames."""

import pytest
import torch

import evtrace
from evtrace.runtime.attention import dense_attention
from tests.models import ZOO, hf_models, real_clips, real_frames, small_vit

MODES = ["exact", "paper", "dense"]


def _frames_for(name):
    if name == "vivit":
        return real_clips(32, 8, 4)
    size = {"vit": 64, "vit_sdpa": 64, "dinov2_registers": 56, "vitdet": 160, "vitdet_sdpa": 160}[name]
    return real_frames(size, 8, patch_size=14 if name == "dinov2_registers" else 16)


def _assert_equal_every_frame(model, emodel, frames, tol=1e-4):
    result = evtrace.verify(model, emodel, frames)
    assert len(result.per_frame()) == len(frames)
    assert result.max_relative <= tol, str(result)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_updating_every_token_equals_the_original(name, mode):
    model, _ = ZOO[name]()
    frames = _frames_for(name)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.All(), attention=mode)
    assert any(s.mode == mode for s in emodel.report().sites)
    _assert_equal_every_frame(model, emodel, frames)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["hf_vit", "hf_vivit", "hf_dinov2"])
def test_hf_models_updating_every_token_equal_the_original(name, mode):
    make, example, _ = hf_models()[name]
    model = make()
    if name == "hf_vivit":
        frames = real_clips(32, 8, 4, layout="BTCHW")
    else:
        frames = real_frames(example.shape[-1], 8, patch_size=8 if name == "hf_vit" else 7)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.All(), attention=mode)
    assert emodel.report().frontend == "export"
    with torch.no_grad():
        for frame in frames:
            got, want = emodel(frame).last_hidden_state, model(frame).last_hidden_state
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()


class AttentionProbe:
    """Captures every delta attention call: its buffered q, k, v and its output."""

    def __init__(self, emodel):
        self.calls = []
        self.handles = [
            m.register_forward_hook(self._hook, with_kwargs=True) for m in emodel.attention_modules().values()
        ]

    def _hook(self, module, args, kwargs, output):
        q, k, v, _, _ = args[:5]
        tables = args[5] if len(args) > 5 else kwargs.get("tables", ())
        self.calls.append(
            (module, q.clone(), k.clone(), v.clone(), tuple(t.clone() for t in tables), output.clone())
        )


@pytest.mark.parametrize("name", ["vit", "dinov2_registers", "vitdet", "vit_sdpa"])
def test_partial_exact_attention_equals_dense_attention_on_the_buffers(name):
    model, _ = ZOO[name]()
    frames = _frames_for(name)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopFraction(0.3), attention="exact")
    deltas = []
    for module in emodel.attention_modules().values():
        module.full_when_cheaper = False  # small models: a full recompute is cheaper; test the delta math
        module.register_forward_hook(lambda m, args, out: deltas.append(args[3] is not None))
    probe = AttentionProbe(emodel)
    with torch.no_grad():
        for frame in frames:
            emodel(frame)
    assert len(probe.calls) == len(frames) * len(emodel.attention_modules())
    assert sum(deltas) == (len(frames) - 1) * len(emodel.attention_modules())
    for module, q, k, v, tables, out in probe.calls:
        want = dense_attention(q, k, v, module.scale, module.bias, tables)
        assert (out - want).abs().max() <= 1e-4 * want.abs().max()
    # and the stream really was partial: the output differs from the original model
    assert evtrace.verify(model, emodel, frames).max_relative > 1e-3


def test_batch_of_three_streams_equals_three_single_streams():
    model, _ = small_vit()
    frames = real_frames(64, 6)
    others = [f.flip(-1) for f in frames]
    thirds = [f.flip(-2) for f in frames]
    batched = evtrace.transform(model, torch.cat([frames[0]] * 3), policy=evtrace.TopK(5))
    singles = [evtrace.transform(model, frames[0], policy=evtrace.TopK(5)) for _ in range(3)]
    with torch.no_grad():
        for a, b, c in zip(frames, others, thirds, strict=True):
            out = batched(torch.cat([a, b, c]))
            for i, (single, x) in enumerate(zip(singles, (a, b, c), strict=True)):
                torch.testing.assert_close(out[i : i + 1], single(x), atol=1e-5, rtol=1e-4)


def test_budget_changes_mid_stream_without_reset_and_reset_restores_the_first_call():
    model, _ = small_vit()
    frames = real_frames(64, 6)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(4))
    with torch.no_grad():
        first = emodel(frames[0])
        emodel(frames[1])
        emodel.set_policy(12)
        assert all(r.gate.policy.r == 12 for r in emodel.regions().values())
        emodel(frames[2])
        region = next(iter(emodel.regions().values()))
        assert not region.fresh  # no reset happened
        emodel.reset()
        torch.testing.assert_close(emodel(frames[0]), first)
        torch.testing.assert_close(first, model(frames[0]), atol=1e-5, rtol=1e-4)


def test_per_gate_override_by_module_path():
    model, _ = small_vit(depth=3)
    emodel = evtrace.transform(model, real_frames(64, 1)[0], policy=evtrace.TopK(8))
    emodel.set_policy(evtrace.TopK(3), gates="blocks.1.mlp.fc1")
    budgets = {name: r.gate.policy.r for name, r in emodel.regions().items()}
    changed = [name for name, r in budgets.items() if r == 3]
    assert changed == ["blocks.1.attn.proj..blocks.2.attn.qkv"], (
        budgets
    )  # the region holding blocks.1.mlp.fc1
    assert sum(1 for r in budgets.values() if r == 8) == len(budgets) - 1


def test_threshold_and_fixed_capacity_policies_run_and_stay_exact_when_they_update_everything():
    model, _ = small_vit()
    frames = real_frames(64, 4)
    for policy in (evtrace.Threshold(0.0), evtrace.FixedCapacityThreshold(0.0, capacity=17)):
        emodel = evtrace.transform(model, frames[0], policy=policy)
        _assert_equal_every_frame(model, emodel, frames)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.FixedCapacityThreshold(1e9, capacity=6))
    with torch.no_grad():
        first = emodel(frames[0])
        # nothing exceeds tau: the masked rows come from the references, nothing moves
        torch.testing.assert_close(emodel(frames[3]), first, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph_matches_eager():
    model, _ = small_vit(depth=1)
    frames = real_frames(64, 4)
    eager = evtrace.transform(model, frames[0], policy=evtrace.TopK(6))
    compiled_model = evtrace.transform(model, frames[0], policy=evtrace.TopK(6))
    compiled = torch.compile(compiled_model, fullgraph=True)
    with torch.no_grad():
        for frame in frames:
            torch.testing.assert_close(compiled(frame), eager(frame), atol=1e-5, rtol=1e-4)
