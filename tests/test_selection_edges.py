"""Edges of token selection that outputs alone do not show: a threshold takes errors strictly
above tau (an unchanged frame updates the forced tokens only), and a relative threshold divides
by the reference token's norm (the value last sent downstream), not the current one's."""

import pytest
import torch

import evtrace
from evtrace.graph.errors import BudgetError
from evtrace.runtime.gates import SparseRegion
from evtrace.runtime.policies import FixedCapacityThreshold, Threshold, TopFraction, TopK, check_budget
from tests.models import small_vit
from tests.reference import ReferenceStream, relative_error

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::evtrace.graph.errors.LowSavingsWarning"),
]


def test_threshold_takes_errors_strictly_above_tau():
    error = torch.tensor([[0.5, 0.7, 0.2, 0.5], [0.0, 0.0, 0.0, 0.0]])
    s = Threshold(0.5).select(error)
    assert s.index.shape == (2, 1) and s.index[0].tolist() == [1] and s.mask.tolist() == [[True], [False]]
    assert Threshold(0.0).select(torch.zeros(1, 6)).index.shape == (1, 0)
    s = FixedCapacityThreshold(0.5, capacity=2).select(error)
    assert sorted(s.index[0][s.mask[0]].tolist()) == [1] and not s.mask[1].any()


def _widths(emodel):
    """Per gate, the tokens it selected on the last frame (the index width; None: a dense frame)."""
    widths = {}

    def record(module, inputs, output):
        index = output[-1]
        widths[module.name] = None if index is None else int(index.shape[1])

    handles = [
        m.register_forward_hook(record) for m in emodel.graph_module.modules() if isinstance(m, SparseRegion)
    ]
    return widths, handles


class _RecordingThreshold(Threshold):
    """Threshold that keeps the width of every selection it makes (before any gate skip)."""

    def __init__(self, tau):
        super().__init__(tau)
        self.widths = []

    def select(self, error, reference_norm=None, forced=None):
        selection = super().select(error, reference_norm, forced)
        self.widths.append(int(selection.index.shape[1]))
        return selection


def test_an_unchanged_frame_selects_only_the_forced_tokens_and_the_first_region_skips():
    """The first gate reads the input: on a repeated frame every error there is exactly 0, and
    Threshold(0) selects the class token alone; the class token is unchanged too, so the gate
    then skips its region (width 0)."""
    torch.manual_seed(0)
    model, x = small_vit()
    policy = _RecordingThreshold(0.0)
    emodel = evtrace.transform(model, x, policy=policy, scene_cut=None)
    widths, handles = _widths(emodel)
    with torch.no_grad():
        emodel(x)
        policy.widths.clear()
        emodel(x.clone())
    for h in handles:
        h.remove()
    first = next(iter(emodel.regions()))
    assert policy.widths[0] == 1, policy.widths
    assert widths[first] == 0, widths


def test_relative_threshold_divides_by_the_reference_norm():
    """A patch that grows 5x has error 4 |p| (relative error 4 against its reference, 0.8
    against itself), one that shrinks to a fifth has 0.8 |p| (0.8 and 4): with tau = 1 the
    first is updated and the second is not. Compared with the independent simulator."""
    torch.manual_seed(0)
    model, x = small_vit()
    with torch.no_grad():
        model.pos_embed.zero_()  # the patch token is the patch's embedding: scaling it scales the token
    frames = [x]
    grow = x.clone()
    grow[..., :16, :16] *= 5.0
    shrink = grow.clone()
    shrink[..., 32:48, 32:48] *= 0.2
    frames += [grow, shrink, shrink.clone()]
    policy = Threshold(1.0, relative=True)
    emodel = evtrace.transform(model, x, policy=policy, scene_cut=None)
    sim = ReferenceStream(model, x, Threshold(1.0, relative=True))
    with torch.no_grad():
        for t, f in enumerate(frames):
            got, want = emodel(f), sim(f)
            assert relative_error(got, want) <= 1e-5, t
    first = sim.history[1][sim.regions()[0]][0]
    assert 1 in first  # the grown patch (token 1: after the class token)
    second = sim.history[2][sim.regions()[0]][0]
    assert 11 not in second  # the shrunk patch (row 2, column 2 of 4 x 4: token 1 + 10)


def test_top_fraction_counts_are_not_pushed_up_by_float_rounding():
    assert 0.55 * 100 > 55 and 0.14 * 50 > 7  # 55.00000000000001, 7.000000000000001 in floating point
    assert TopFraction(0.55).tokens_per_frame(100) == 55
    assert TopFraction(0.14).tokens_per_frame(50) == 7
    assert TopFraction(0.35).tokens_per_frame(10) == 4  # a true fraction still rounds up


def test_a_budget_larger_than_the_gate_is_refused_before_anything_runs():
    torch.manual_seed(0)
    model, x = small_vit()
    with pytest.raises(BudgetError, match=r"TopK\(r=40\) selects 40 tokens per frame at gate .* N=17"):
        check_budget(TopK(40), 17, "blocks.0.attn.qkv")
    with pytest.raises(BudgetError, match="N=17 tokens: choose a budget in"):
        evtrace.transform(model, x, policy=TopK(40))
    emodel = evtrace.transform(model, x, policy=TopK(4))
    with pytest.raises(BudgetError, match="choose a budget in"):
        emodel.set_policy(TopK(18))
    assert repr(emodel.policy) == "TopK(r=4)"
