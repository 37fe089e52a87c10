"""Cost profiles: the device constants of the runtime's static choices, applied, saved, measured."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch

import evtrace
from evtrace.runtime.attention import ExactDeltaAttention
from evtrace.runtime.cost_profile import DEFAULT_PROFILE, CostProfile
from evtrace.runtime.packed import MAX_PACKED_ROWS, MIN_PACKED_ROWS, PackedLinear, packing_available
from tests.models import real_frames, small_vit

#: a device where a delta update is as cheap as it can be: the delta path is always taken
CHEAP_DELTA = CostProfile(delta_overhead_macs=0, delta_mac_cost=Fraction(1, 20), device="test", source="test")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, _ = small_vit(img_size=96)  # 37 tokens
    return model, real_frames(96, count=4)


def test_the_shipped_profile_is_the_runtime_default():
    assert ExactDeltaAttention.delta_overhead_macs == DEFAULT_PROFILE.delta_overhead_macs == 2**26
    assert ExactDeltaAttention.delta_mac_cost == DEFAULT_PROFILE.delta_mac_cost == Fraction(7, 5)
    assert (MIN_PACKED_ROWS, MAX_PACKED_ROWS) == (
        DEFAULT_PROFILE.min_packed_rows,
        DEFAULT_PROFILE.max_packed_rows,
    )


def test_a_profile_round_trips_through_a_file(tmp_path):
    profile = CostProfile(
        delta_overhead_macs=123, delta_mac_cost=Fraction(3, 2), min_packed_rows=8, device="x"
    )
    path = tmp_path / "profile.json"
    profile.save(path)
    assert CostProfile.load(path) == profile
    assert json.loads(path.read_text())["delta_mac_cost"] == "3/2"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(delta_overhead_macs=-1), ValueError, "delta_overhead_macs must be an int >= 0"),
        (dict(min_packed_rows=0), ValueError, "min_packed_rows must be an int >= 1"),
        (dict(min_packed_rows=64, max_packed_rows=32), ValueError, "min_packed_rows \\(64\\) is above"),
        (dict(delta_mac_cost=0), ValueError, "delta_mac_cost must be > 0"),
        (dict(delta_mac_cost=[1]), TypeError, "delta_mac_cost must be a Fraction"),
        (dict(key_chunk_rows=True), ValueError, "key_chunk_rows must be an int >= 1"),
    ],
)
def test_bad_profiles_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        CostProfile(**kwargs)


def test_bad_profile_files_are_refused(tmp_path, setup):
    path = tmp_path / "p.json"
    data = DEFAULT_PROFILE.to_dict()
    path.write_text(json.dumps(data | {"extra": 1}))
    with pytest.raises(ValueError, match="unknown \\['extra'\\]"):
        CostProfile.load(path)
    path.write_text(json.dumps(data | {"version": 0}))
    with pytest.raises(ValueError, match="version 0 is not 1: calibrate again"):
        CostProfile.load(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="not a cost profile"):
        CostProfile.load(path)
    model, frames = setup
    with pytest.raises(TypeError, match="cost_profile must be a CostProfile"):
        evtrace.transform(model, frames[0], cost_profile=3)


def _delta_calls(emodel) -> list:
    calls = []
    for m in emodel.attention_modules().values():
        original = m._delta
        m._delta = lambda *a, original=original: calls.append(1) or original(*a)
    return calls


def test_the_static_choice_follows_the_profile_and_the_outputs_do_not(setup, tmp_path):
    model, frames = setup
    shipped = evtrace.transform(model, frames[0], policy=evtrace.TopK(9))
    CHEAP_DELTA.save(tmp_path / "cheap.json")
    cheap = evtrace.transform(model, frames[0], policy=evtrace.TopK(9), cost_profile=tmp_path / "cheap.json")
    for m in cheap.attention_modules().values():
        assert (m.delta_overhead_macs, m.delta_mac_cost) == (0, Fraction(1, 20))
    shipped_calls, cheap_calls = _delta_calls(shipped), _delta_calls(cheap)
    with torch.no_grad():
        for x in frames:
            a, b = shipped(x), cheap(x)
            assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    # 37 tokens: the shipped CPU constants recompute in full, the cheap device takes the delta path
    assert shipped_calls == [] and len(cheap_calls) == 2 * (len(frames) - 1)
    for m in [*shipped.attention_modules().values(), *cheap.attention_modules().values()]:
        del m._delta  # the spies go: count_flops copies the modules
    # the FLOP count (the graph run) and the report's cost model (sympy) both follow the profile
    count_shipped = evtrace.count_flops(shipped, frames[0]).steady
    count_cheap = evtrace.count_flops(cheap, frames[0]).steady
    assert count_cheap < count_shipped
    assert cheap.report().costs.steady() == count_cheap
    assert shipped.report().costs.steady() == count_shipped


@pytest.mark.skipif(not packing_available(), reason="oneDNN packing is not available in this torch build")
def test_packed_rows_follow_the_profile():
    weight, x = torch.randn(32, 16), torch.randn(20, 16)
    kernel = PackedLinear("k")
    kernel(x, weight)
    assert kernel.packed  # 20 rows: inside the shipped [16, 1024]
    from evtrace.runtime.cost_profile import apply_cost_profile

    holder = torch.nn.Module()
    holder.kernel = PackedLinear("k")
    assert apply_cost_profile(holder, CostProfile(min_packed_rows=64)) == 1
    assert holder.kernel(x, weight).shape == (20, 32) and not holder.kernel.packed


def test_calibrate_measures_a_profile_on_the_models_own_shapes(setup):
    model, frames = setup
    profile = evtrace.calibrate(model, frames[0], repeats=1)
    assert isinstance(profile, CostProfile)
    assert profile.delta_overhead_macs >= 0 and profile.delta_mac_cost > 0
    assert profile.min_packed_rows <= profile.max_packed_rows
    assert "(1, 4, 37, 16)" in profile.source and profile.device.startswith("cpu")
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(9), cost_profile=profile)
    with torch.no_grad():
        for x in frames:
            want = model(x)
        got = emodel(frames[-1])
    assert got.shape == want.shape
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        evtrace.calibrate(model, frames[0], repeats=0)
