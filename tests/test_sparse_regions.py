"""passes.sparse_regions: gated regions become SparseRegion calls that recompute selected tokens.

The reference is independent of the gate: a token-wise model's output row depends on its own
input token only, so after a frame in which exactly k patches changed, TopK(k) must give the
original model's output, and TopK(k - 1) must leave exactly one changed token at its old value.
"""

import torch

import evtrace
from evtrace.runtime.gates import SparseRegion
from tests.passes_models import NoLinear, TokenMLP, image

CHANGED = (0, 5, 10)  # patches (tokens) that change between the two frames


def two_frames():
    first = image(1)
    second = first.clone()
    for token in CHANGED:
        row, col = divmod(token, 4)
        second[..., 4 * row : 4 * row + 4, 4 * col : 4 * col + 4] += 1.0
    return first, second


def test_the_region_becomes_one_sparse_call():
    model = TokenMLP().eval()
    emodel = evtrace.transform(model, image(), policy=evtrace.TopK(3))
    gm = emodel.graph_module
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert called == ["embed.patch", "evtrace_region_0"]  # the patch embedding stays dense, fc1 and fc2 go
    assert isinstance(gm.get_submodule("evtrace_region_0"), SparseRegion)
    assert list(emodel.regions()) == ["fc1..fc2"]


def test_exactly_the_changed_tokens_are_recomputed():
    model = TokenMLP().eval()
    first, second = two_frames()
    with torch.no_grad():
        want_first, want_second = model(first), model(second)
    emodel = evtrace.transform(model, first, policy=evtrace.TopK(len(CHANGED)))
    with torch.no_grad():
        assert torch.allclose(emodel(first), want_first, atol=1e-6)
        assert torch.allclose(emodel(second), want_second, atol=1e-6)
    short = evtrace.transform(model, first, policy=evtrace.TopK(len(CHANGED) - 1))
    with torch.no_grad():
        short(first)
        got = short(second)[0]
    stale = [t for t in range(16) if not torch.allclose(got[t], want_second[0, t], atol=1e-6)]
    assert len(stale) == 1 and stale[0] in CHANGED
    assert torch.allclose(got[stale[0]], want_first[0, stale[0]], atol=1e-6)  # the old value, kept


def test_a_region_without_a_linear_is_not_rewritten():
    model = NoLinear().eval()
    emodel = evtrace.transform(model, image(), policy=evtrace.TopK(3))
    assert emodel.regions() == {}
    (region,) = emodel.report().regions
    assert not region.gated and "no linear inside" in region.reason
    with torch.no_grad():
        assert torch.equal(emodel(image(2)), model(image(2)))
