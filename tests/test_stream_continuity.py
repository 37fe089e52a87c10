"""Property: a stream snapshotted at a random frame (``save_stream`` / ``load_stream`` into a
model built the same way, ``pickle``, ``copy.deepcopy``) continues bit for bit as the original
does, under every policy, static or stateful."""

import copy
import pickle

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import evtrace
from evtrace.runtime.policies import (
    AdaptiveBudget,
    FixedCapacityThreshold,
    GateAllocation,
    Staleness,
    SteeredThreshold,
    Threshold,
    TopFraction,
    TopK,
)
from tests.models import small_vit

FUZZ = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::evtrace.graph.errors.LowSavingsWarning"),
]

STATIC = {
    "TopK": lambda: TopK(5),
    "TopFraction": lambda: TopFraction(0.3),
    "Threshold": lambda: Threshold(0.4),
    "Threshold relative": lambda: Threshold(0.3, relative=True),
    "FixedCapacityThreshold": lambda: FixedCapacityThreshold(0.2, capacity=6, relative=True),
}
STATEFUL = {
    "SteeredThreshold": lambda: SteeredThreshold(0.4, rate=0.2),
    "AdaptiveBudget": lambda: AdaptiveBudget(0.3),
    "Staleness": lambda: Staleness(TopK(4), k=3),
    "GateAllocation": lambda: GateAllocation(0.4),
}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return small_vit()


def frames(x: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """Each frame: some patches change a lot, others a little (the policies' state moves)."""
    g = torch.Generator().manual_seed(seed)
    out, frame = [], x.clone()
    for _ in range(count):
        weight = torch.rand(1, 1, 4, 4, generator=g).repeat_interleave(16, 2).repeat_interleave(16, 3)
        frame = frame + 0.3 * weight * torch.randn(frame.shape, generator=g)
        out.append(frame)
    return out


def snapshot(emodel, how: str, tmp_path, rebuild):
    """The stream's copy: loaded into a model built the same way (``rebuild()``), or the model
    pickled, or deep-copied."""
    if how == "save_stream":
        emodel.save_stream(tmp_path / "stream.pt")
        twin = rebuild()
        twin.load_stream(tmp_path / "stream.pt")
        return twin
    if how == "pickle":
        return pickle.loads(pickle.dumps(emodel))
    return copy.deepcopy(emodel)


def check(vit, tmp_path, how, policies, data):
    model, x = vit
    name = data.draw(st.sampled_from(sorted(policies)), label="policy")
    k = data.draw(st.integers(1, 6), label="frames before the snapshot")
    seed = data.draw(st.integers(0, 1000), label="seed")
    clip = frames(x, k + 4, seed)
    emodel = evtrace.transform(model, x, policy=policies[name]())
    with torch.no_grad():
        for f in clip[:k]:
            emodel(f)
        twin = snapshot(emodel, how, tmp_path, lambda: evtrace.transform(model, x, policy=policies[name]()))
        for t, f in enumerate(clip[k:]):
            assert torch.equal(twin(f), emodel(f)), (name, k, t)


@pytest.mark.parametrize("how", ["save_stream", "pickle"])
@FUZZ
@given(data=st.data())
def test_a_snapshot_continues_the_stream_bit_for_bit(vit, tmp_path, how, data):
    check(vit, tmp_path, how, STATIC | STATEFUL, data)


@FUZZ
@given(data=st.data())
def test_a_deepcopy_continues_the_stream_under_a_static_policy(vit, tmp_path, data):
    check(vit, tmp_path, "deepcopy", STATIC, data)


@FUZZ
@given(data=st.data())
def test_a_deepcopy_continues_the_stream_under_a_stateful_policy(vit, tmp_path, data):
    check(vit, tmp_path, "deepcopy", STATEFUL, data)
