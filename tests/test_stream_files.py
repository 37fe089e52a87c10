"""Stream files are data: read with ``torch.load(weights_only=True)`` (a crafted file runs
nothing), checked as a whole against the receiving model (names, shapes, dtypes, finiteness, the
policies' and the detector's settings) before anything is written: a file that does not fit
raises and leaves the model bit for bit as it was, and a load never changes its settings."""

from __future__ import annotations

import pytest
import torch

import evtrace


def _run(emodel, clip):
    with torch.no_grad():
        return [emodel(x).clone() for x in clip]


# ----------------------------------------------------------------------------- stream files are data
# A stream file is read with torch.load(weights_only=True) and checked as a whole against the
# receiving model (names, shapes, dtypes, finiteness, the policies' and detector's settings)
# before anything is written: a file that does not fit raises and changes nothing.


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _small(policy=None, **options):
    from tests.models import real_frames, small_vit

    model, _ = small_vit()
    frames = real_frames(64, 6)
    emodel = evtrace.transform(model, frames[0], policy=policy or evtrace.TopK(5), **options)
    return model, frames, emodel


def _everything(emodel):
    """Every state buffer, cloned, and the Python-side stream counters and policy repr."""
    state = {name: b.clone() for name, b in emodel.named_buffers()}
    state["counters"] = (emodel.frames_since_refresh, emodel.refreshes, emodel._frames, emodel._fresh)
    state["flags"] = [(r.fresh, r.fresh_streams) for r in emodel.regions().values()]
    state["policies"] = [repr(r.gate.policy) for r in emodel.regions().values()]
    state["scene"] = None if emodel._previous is None else [p.clone() for p in emodel._previous]
    return state


def _assert_unchanged(before, after):
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        elif key == "scene" and value is not None:
            assert all(torch.equal(a, b) for a, b in zip(value, after[key], strict=True)), key
        else:
            assert value == after[key], key


def test_a_crafted_stream_file_executes_nothing(tmp_path):
    _, frames, emodel = _small()
    _run(emodel, frames[:3])
    marker = tmp_path / "ran.txt"
    state = emodel.stream_state()
    state["counters"] = _Payload(marker)
    torch.save(state, tmp_path / "evil.pt")
    before = _everything(emodel)
    with pytest.raises(ValueError, match="not loaded as data|unsafe|refused"):
        emodel.load_stream(tmp_path / "evil.pt")
    assert not marker.exists()
    _assert_unchanged(before, _everything(emodel))


def _tampered(emodel, edit, tmp_path):
    state = emodel.stream_state()
    edit(state)
    torch.save(state, tmp_path / "stream.pt")
    return tmp_path / "stream.pt"


def _first_reference(state):
    return next(k for k in state["tensors"] if k.endswith("reference0"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (  # a (C,) tensor in place of a (1, N, C) buffer would broadcast into it
            lambda s: s["tensors"].__setitem__(_first_reference(s), torch.zeros(64)),
            r"shape \(64,\).*\(1, 17, 64\)",
        ),
        (
            lambda s: s["tensors"].__setitem__(
                _first_reference(s), s["tensors"][_first_reference(s)].double()
            ),
            r"dtype torch\.float64.*torch\.float32",
        ),
        (
            lambda s: s["tensors"][_first_reference(s)].view(-1).__setitem__(3, float("nan")),
            r"NaN or Inf",
        ),
        (  # the last tensor: a load that copies as it checks has overwritten every other one
            lambda s: s["tensors"][
                [k for k, v in s["tensors"].items() if v is not None and v.is_floating_point()][-1]
            ].fill_(float("inf")),
            r"NaN or Inf",
        ),
        (
            lambda s: s["tensors"].pop(_first_reference(s)),
            r"missing",
        ),
        (
            lambda s: s["tensors"].__setitem__("evtrace_region_0.extra", torch.zeros(3)),
            r"extra|unexpected",
        ),
    ],
    ids=["shape", "dtype", "nan", "last-tensor", "missing", "extra"],
)
def test_a_stream_file_that_does_not_fit_loads_nothing(tmp_path, edit, message):
    _, frames, source = _small()
    _run(source, frames[:4])
    path = _tampered(source, edit, tmp_path)
    _, _, target = _small()
    _run(target, [f.flip(-1) for f in frames[:3]])
    before = _everything(target)
    with pytest.raises(ValueError, match=message):
        target.load_stream(path)
    _assert_unchanged(before, _everything(target))


def test_another_architecture_with_the_same_state_tensors_is_refused(tmp_path):
    """LayerScale adds ops inside the regions but no state: only the graph tells them apart."""
    from tests.models import real_frames, small_vit

    frames = real_frames(64, 4)
    plain = evtrace.transform(small_vit()[0], frames[0], policy=evtrace.TopK(5))
    scaled = evtrace.transform(small_vit(layer_scale=0.1)[0], frames[0], policy=evtrace.TopK(5))
    _run(plain, frames[:3])
    _run(scaled, frames[:2])
    plain.save_stream(tmp_path / "stream.pt")
    before = _everything(scaled)
    with pytest.raises(ValueError, match="graph"):
        scaled.load_stream(tmp_path / "stream.pt")
    _assert_unchanged(before, _everything(scaled))


def test_a_load_never_changes_the_receiving_models_policy_or_detector(tmp_path):
    _, frames, source = _small(evtrace.policies.SteeredThreshold(0.25, rate=0.2))
    _run(source, frames[:4])
    source.save_stream(tmp_path / "stream.pt")
    shared = evtrace.policies.SteeredThreshold(0.5)
    _, _, target = _small(shared)
    _run(target, frames[:2])
    before = _everything(target)
    with pytest.raises(ValueError, match=r"target.*0\.25.*0\.5|rate"):
        target.load_stream(tmp_path / "stream.pt")
    assert (shared.target, shared.rate) == (0.5, 0.05)
    _assert_unchanged(before, _everything(target))
    # a stream saved with scene-cut detection does not turn one on in a model built without
    _, _, plain = _small(evtrace.policies.SteeredThreshold(0.25, rate=0.2), scene_cut=None)
    with pytest.raises(ValueError, match="scene.cut"):
        plain.load_stream(tmp_path / "stream.pt")
    assert plain._scene_cut is None


def test_the_stream_file_holds_only_plain_data(tmp_path):
    _, frames, emodel = _small(evtrace.policies.Staleness(evtrace.policies.SteeredThreshold(0.4), k=3))
    _run(emodel, frames[:4])
    emodel.save_stream(tmp_path / "stream.pt")
    torch.load(tmp_path / "stream.pt", weights_only=True)  # raises on anything but data
