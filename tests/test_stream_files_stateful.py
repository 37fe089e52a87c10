"""Stream files through the public API (``save_stream`` / ``load_stream``): a stream saved and
loaded into a model built the same way continues bit for bit under every stateful policy, and a
stream of another graph is refused."""

import pytest
import torch

import evtrace
from evtrace.runtime.policies import AdaptiveBudget, GateAllocation, Staleness, SteeredThreshold, TopK
from evtrace.runtime.selection import AttentionWeighted, BudgetedThreshold, Keyframes
from tests.models import small_vit

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::evtrace.graph.errors.LowSavingsWarning"),
]

STATEFUL = {
    "SteeredThreshold": lambda: SteeredThreshold(0.4, rate=0.2),
    "AdaptiveBudget": lambda: AdaptiveBudget(0.3),
    "Staleness": lambda: Staleness(TopK(4), k=3),
    "GateAllocation": lambda: GateAllocation(0.4),
    "BudgetedThreshold": lambda: BudgetedThreshold(0.4, rate=0.2),
    "Keyframes": lambda: Keyframes(SteeredThreshold(0.4, rate=0.2), k=3),
}


def clip(x: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """A picture whose patches change by different amounts each frame (the policies' state moves)."""
    g = torch.Generator().manual_seed(seed)
    frames, frame = [], x.clone()
    for _ in range(count):
        frame = frame + 0.3 * torch.randn(frame.shape, generator=g) * torch.rand(
            1, 1, 4, 4, generator=g
        ).repeat_interleave(16, 2).repeat_interleave(16, 3)
        frames.append(frame)
    return frames


@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_saved_stream_continues_bit_for_bit_under_a_stateful_policy(tmp_path, name):
    torch.manual_seed(0)
    model, x = small_vit()
    frames = clip(x, 10, seed=1)
    saved = evtrace.transform(model, x, policy=STATEFUL[name]())
    with torch.no_grad():
        for f in frames[:5]:
            saved(f)
    saved.save_stream(tmp_path / "stream.pt")
    loaded = evtrace.transform(model, x, policy=STATEFUL[name]())
    loaded.load_stream(tmp_path / "stream.pt")
    fresh = evtrace.transform(model, x, policy=STATEFUL[name]())  # the same frames, no saved state
    with torch.no_grad():
        fresh(frames[4])
        differs = False
        for f in frames[5:]:
            want = saved(f)
            assert torch.equal(loaded(f), want)
            differs |= not torch.equal(fresh(f), want)
    assert differs, "the policy state must matter for this stream (else the test shows nothing)"


def test_a_stream_of_another_graph_is_refused(tmp_path):
    """Same model class, same state tensors (names, shapes, dtypes), another graph (layer scale):
    its stream is not this model's, and loading it raises before anything changes."""
    torch.manual_seed(0)
    model, x = small_vit()
    other, _ = small_vit(layer_scale=0.5)
    a = evtrace.transform(other, x, policy=4)
    b = evtrace.transform(model, x, policy=4)
    frames = clip(x, 4, seed=2)
    with torch.no_grad():
        a(frames[0]), a(frames[1])
        b(frames[0])
        twin_out = b(frames[1])
    a.save_stream(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="graph"):
        b.load_stream(tmp_path / "other.pt")
    reference = evtrace.transform(model, x, policy=4)
    with torch.no_grad():
        reference(frames[0])
        assert torch.equal(reference(frames[1]), twin_out)
        for f in frames[2:]:
            assert torch.equal(b(f), reference(f))  # b's own stream went on untouched


def test_a_policy_whose_state_cannot_go_in_a_file_is_refused_before_anything_is_written(tmp_path):
    model, x = small_vit()
    emodel = evtrace.transform(model, x, policy=TopK(4))
    AttentionWeighted(TopK(4)).attach(emodel)
    with torch.no_grad():
        for frame in clip(x, 2, seed=3):
            emodel(frame)
    path = tmp_path / "s.pt"
    with pytest.raises(ValueError, match="cannot go into a stream file"):
        emodel.save_stream(path)
    assert not path.exists()
