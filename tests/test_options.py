"""Behaviour of the documented options (not only their argument checks), on real frames."""

from __future__ import annotations

import pytest
import torch

import evtrace
import models_zoo
from evtrace.graph.errors import NonFiniteInputError
from evtrace.runtime.attention import ExactDeltaAttention
from tests.models import real_frames, small_vit
from tests.reference import ReferenceStream, analyse, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5


@pytest.fixture(scope="module")
def vit():
    model, _ = small_vit()
    return model, real_frames(64, 6)


def _outputs(emodel, frames):
    with torch.no_grad():
        return [emodel(f) for f in frames]


def _dense_frames(model, frames, outs):
    """Indices of the frames whose output equals the original model's (computed densely)."""
    with torch.no_grad():
        return [i for i, (f, y) in enumerate(zip(frames, outs)) if relative_error(y, model(f)) <= TOL]


# ----------------------------------------------------------------------------- refresh


def test_refresh_every_recomputes_exactly_every_k_frames(vit):
    model, frames = vit
    frames = frames + frames[::-1]
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(4), refresh_every=3)
    outs = _outputs(emodel, frames)
    assert _dense_frames(model, frames, outs) == [0, 3, 6, 9]
    assert emodel.refreshes == 3
    plain = _outputs(evtrace.transform(model, frames[0], policy=evtrace.TopK(4)), frames)
    assert _dense_frames(model, frames, plain) == [0]


def _cut_stream():
    return real_frames(64, 6) + real_frames(64, 3, clip="carphone", start=10)  # a cut at frame 6


def test_scene_cut_refreshes_on_the_cut_and_nowhere_else(vit):
    model, _ = vit
    frames = _cut_stream()
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(4), scene_cut=4.0)
    counts = []
    with torch.no_grad():
        outs = []
        for f in frames:
            outs.append(emodel(f))
            counts.append(emodel.refreshes)
    assert counts == [0] * 6 + [1] * 3
    assert _dense_frames(model, frames, outs) == [0, 6]
    plain = _outputs(evtrace.transform(model, frames[0], policy=evtrace.TopK(4), scene_cut=None), frames)
    assert _dense_frames(model, frames, plain) == [0]
    default = _outputs(evtrace.transform(model, frames[0], policy=evtrace.TopK(4)), frames)
    assert _dense_frames(model, frames, default) == [0, 6]  # scene cuts are detected by default


def test_scene_cut_after_the_cut_continues_against_the_new_scene(vit):
    """After the refresh the stream is eventful again, and equals a stream started at the cut."""
    model, _ = vit
    frames = _cut_stream()
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(4), scene_cut=4.0)
    outs = _outputs(emodel, frames)
    fresh = _outputs(evtrace.transform(model, frames[6], policy=evtrace.TopK(4)), frames[6:])
    for a, b in zip(outs[6:], fresh):
        assert relative_error(a, b) <= TOL


# ----------------------------------------------------------------------------- resets


def _single_runs(model, streams, policy):
    singles = []
    for stream in streams:
        em = evtrace.transform(model, stream[0], policy=policy)
        singles.append(_outputs(em, stream))
    return singles


def test_reset_of_one_stream_leaves_the_other_streams_alone(vit):
    model, frames = vit
    streams = [frames, [f.flip(-1) for f in frames]]
    policy = evtrace.TopK(5)
    emodel = evtrace.transform(model, torch.cat([frames[0]] * 2), policy=policy)
    restart = 3
    with torch.no_grad():
        outs = []
        for i, pair in enumerate(zip(*streams)):
            if i == restart:
                emodel.reset(stream=1)
            outs.append(emodel(torch.cat(pair)))
    want0 = _single_runs(model, streams[:1], policy)[0]
    want1 = _single_runs(model, [streams[1][restart:]], policy)[0]
    for i, y in enumerate(outs):
        assert relative_error(y[:1], want0[i]) <= TOL, f"stream 0, frame {i}"
    for i, y in enumerate(outs[restart:]):
        assert relative_error(y[1:], want1[i]) <= TOL, f"stream 1, frame {restart + i}"


def test_reset_of_a_valid_stream_makes_that_stream_start_afresh(vit):
    """What holds today as well: after reset(stream=1) stream 1's next frame is its dense output."""
    model, frames = vit
    emodel = evtrace.transform(model, torch.cat([frames[0]] * 2), policy=evtrace.TopK(5))
    with torch.no_grad():
        for f in frames[:3]:
            emodel(torch.cat([f, f.flip(-1)]))
        emodel.reset(stream=1)
        x = torch.cat([frames[3], frames[3].flip(-1)])
        assert relative_error(emodel(x)[1:], model(x[1:])) <= TOL


# ----------------------------------------------------------------------------- inputs


def test_check_inputs_false_skips_the_check_and_changes_nothing_else(vit):
    model, frames = vit
    checked = evtrace.transform(model, frames[0], policy=evtrace.TopK(5))
    unchecked = evtrace.transform(model, frames[0], policy=evtrace.TopK(5), check_inputs=False)
    for a, b in zip(_outputs(checked, frames), _outputs(unchecked, frames)):
        assert torch.equal(a, b)
    bad = frames[1].clone()
    bad[..., 3, 5] = float("nan")
    with torch.no_grad():
        with pytest.raises(NonFiniteInputError):
            checked(bad)
        unchecked.reset()
        out = unchecked(bad)  # not inspected: a dense first frame, and the NaN flows through
    assert torch.isnan(out).any()


# ----------------------------------------------------------------------------- verify


def test_verify_per_layer_compares_every_exit_buffer(vit):
    model, frames = vit
    frames = frames[:4]
    full = evtrace.transform(model, frames[0], policy=evtrace.All())
    result = evtrace.verify(model, full, frames, per_layer=True)
    names = set(full.exit_buffers())
    assert names and {e.output for e in result.layers} == names
    assert len(result.layers) == len(names) * len(frames)
    assert max(e.relative for e in result.layers) <= 1e-4
    partial = evtrace.transform(model, frames[0], policy=evtrace.TopK(3))
    result = evtrace.verify(model, partial, frames, per_layer=True)
    first = [e.relative for e in result.layers if e.frame == 0]
    later = [e.relative for e in result.layers if e.frame > 0]
    assert len(first) == len(names) and max(first) <= 1e-4
    assert max(later) > 1e-2  # the exits of a partial stream lag behind the original
    without = evtrace.verify(model, partial, frames)
    assert without.layers == []


# ----------------------------------------------------------------------------- overrides


def test_gate_override_by_prefix_matches_whole_path_components():
    """``gates="blocks.1"`` selects the regions with a linear under blocks.1, not blocks.10/11."""
    model = models_zoo.vit(
        img_size=32, patch_size=16, embed_dim=16, depth=12, num_heads=2, num_classes=0
    ).eval()
    x = real_frames(32, 1)[0]
    emodel = evtrace.transform(model, x, policy=evtrace.TopK(4))
    view = analyse(model, x)
    expected = sorted(
        r.name for r in view.regions if any(p == "blocks.1" or p.startswith("blocks.1.") for p in r.linears)
    )
    assert expected and any("blocks.10" in n or "blocks.11" in n for n in emodel.regions())
    override = evtrace.TopK(2)
    emodel.set_policy(override, gates="blocks.1")
    assert sorted(n for n, r in emodel.regions().items() if r.gate.policy is override) == expected
    emodel.set_policy(evtrace.TopK(3), gates="blocks.1.mlp.fc1")  # a module path: its one region
    assert (
        sum(
            isinstance(r.gate.policy, evtrace.TopK) and r.gate.policy.r == 3
            for r in emodel.regions().values()
        )
        == 1
    )
    with pytest.raises(ValueError, match="no gate matches"):
        emodel.set_policy(2, gates="blocks.1.mlp.fc")  # a prefix of a name, not of a path


# ----------------------------------------------------------------------------- torch.compile


def test_fixed_capacity_threshold_under_compile_equals_the_reference():
    """Static shapes: the delta path runs inside the compiled graph, the fallback never fires,
    one graph for the first frame and one for the steady state, outputs equal the reference."""
    import torch._dynamo

    model, _ = small_vit(depth=1)  # inductor compiles in about 10 s per graph here
    frames = real_frames(64, 4)
    policy = evtrace.FixedCapacityThreshold(1.0, capacity=6)
    emodel = evtrace.transform(model, frames[0], policy=policy)
    sites = [m for m in emodel.attention_modules().values() if isinstance(m, ExactDeltaAttention)]
    assert sites
    for m in sites:
        m.full_when_cheaper = False
    sim = ReferenceStream(model, frames[0], policy)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(emodel, fullgraph=True)
    with torch.no_grad():
        for f in frames:
            assert relative_error(compiled(f), sim(f)) <= 1e-4
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 2, graphs
    assert sum(int(m.stats["refresh_count"]) for m in sites) == 0  # fallbacks: none needed
    # the delta update ran: only it lowers the cancellation ratio it tracks
    assert all(float(m.stats["worst_ratio_seen"]) < 1.0 for m in sites)
    # and the stream was partial, with masked slots: some gate selected fewer than its capacity
    sizes = [len(t) for frame in sim.history[1:] for s in frame.values() for t in s]
    assert min(sizes) < 6 and max(sizes) >= 1
    torch._dynamo.reset()
