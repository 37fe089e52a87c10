"""Every model family of evtrace.tools.coverage: gated, exact, counted, and loud when it is not.

Per family (small configuration, real frames): a full update equals the original over 8 frames;
at TopFraction(0.25) the steady count is at most half the dense one (paper convention) unless
the report says why; the sympy formula equals the count; both conventions count the original
and the eventful model; exact delta attention equals dense attention on its buffered q, k, v;
the LowSavingsWarning fires on the families that cannot be gated and on no other.
"""

import warnings

import pytest
import torch

import evtrace
from evtrace.graph.errors import LowSavingsWarning
from evtrace.runtime.attention import dense_attention
from evtrace.tools.coverage import families, output_tensor

FAMILIES = families()

# Families some of whose attention stays dense, with the reason the report must give.
DENSE_ATTENTION = {
    # the spatial attention of divided space-time blocks reads the class token repeated per frame
    "hf_timesformer_eager": ("q, k or v is not produced by a gated region",),
}
# Families with windowed blocks: windows are delta-updated as groups, global blocks as usual.
WINDOWED = {"zoo_vitdet", "hf_vitdet_eager", "hf_swin_eager"}


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _quiet_transform(model, example, policy):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        emodel = evtrace.transform(model, example, policy=policy)
    return emodel, [w for w in caught if issubclass(w.category, LowSavingsWarning)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family(name):
    family = FAMILIES[name]
    model, example = family.build()
    frames = family.real_inputs(8)

    full, _ = _quiet_transform(model, example, evtrace.All())
    with torch.no_grad():
        errors = [_relative(output_tensor(full(x)), output_tensor(model(x))) for x in frames]
    assert max(errors) <= 1e-4, errors

    emodel, loud = _quiet_transform(model, example, evtrace.TopFraction(0.25))
    report = emodel.report()
    dense = evtrace.count_flops(model, example)
    count = evtrace.count_flops(emodel, example)
    assert count.steady == report.costs.steady()  # the sympy formula and the counted figure agree
    assert evtrace.count_flops(emodel, example, convention="fvcore").steady > 0
    assert evtrace.count_flops(model, example, convention="fvcore").total > 0

    delta = [s for s in report.sites if s.mode != "dense"]
    if name in DENSE_ATTENTION:  # partly delta-updated; the dense sites say why
        dense_sites = [s for s in report.sites if s.mode == "dense"]
        assert dense_sites and all(any(w in s.reason for w in DENSE_ATTENTION[name]) for s in dense_sites)
        # loud exactly when it saves under 1.2x or delta-updates fewer than half of its sites
        assert bool(loud) == (dense.total / count.steady < 1.2 or len(delta) < 0.5 * len(report.sites))
        return
    assert loud == [], [str(w.message) for w in loud]
    assert count.steady <= 0.5 * dense.total, (count.steady, dense.total)
    assert len(delta) == len(report.sites) > 0
    grouped = [s for s in report.sites if s.windowed]
    if name in WINDOWED:  # windowed blocks: delta attention inside each window, one row per window and head
        assert grouped and all(s.heads[1] == 1 and s.mode == "exact" for s in grouped)

    worst = 0.0

    def compare(module, args, out):
        nonlocal worst
        q, k, v, index_q, _, tables = args
        assert index_q is None or hasattr(module, "k_ref")  # the delta path ran (forced below)
        if hasattr(module, "grouped_tables"):
            tables = module.grouped_tables(tables, q.shape[0])
        tables = tuple(t.double() if t.is_floating_point() else t for t in tables)
        want = dense_attention(q.double(), k.double(), v.double(), module.scale, module.bias, tables)
        worst = max(worst, _relative(out.double(), want))

    for module in emodel.attention_modules().values():
        module.full_when_cheaper = False  # small sites: a full recompute is cheaper; test the delta math
        module.register_forward_hook(compare)
    with torch.no_grad():
        for x in frames[:4]:
            emodel(x)
    assert worst <= 1e-5
