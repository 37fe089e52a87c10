"""passes.delta_attention: planned sites become delta attention modules, equal to dense attention."""

import pytest
import torch

import evtrace
from evtrace.runtime.attention import ExactDeltaAttention, PaperDeltaAttention, dense_attention
from tests.passes_models import Attention, image


def frames(count=5):
    base = image(3)
    out = [base]
    for i in range(1, count):
        nxt = out[-1].clone()
        nxt[..., 4 * (i % 4) : 4 * (i % 4) + 4, :4] += 0.5  # one patch column changes per frame
        out.append(nxt)
    return out


@pytest.mark.parametrize("mode, kind", [("exact", ExactDeltaAttention), ("paper", PaperDeltaAttention)])
def test_the_site_becomes_one_attention_module(mode, kind):
    emodel = evtrace.transform(Attention().eval(), image(), policy=evtrace.TopK(4), attention=mode)
    modules = emodel.attention_modules()
    assert [type(m) for m in modules.values()] == [kind]
    assert [m.site_name for m in modules.values()] == [emodel.report().sites[0].name]


def test_exact_delta_attention_equals_dense_attention_on_its_buffers():
    model = Attention().eval()
    emodel = evtrace.transform(model, image(), policy=evtrace.TopK(4), attention="exact")
    (module,) = emodel.attention_modules().values()
    module.full_when_cheaper = False  # a tiny site: force the delta path
    deltas, errors = [], []

    def compare(_module, args, out):  # now: q, k, v are state buffers the next frame overwrites
        q, k, v, index_q = args[:4]
        deltas.append(index_q is not None)
        want = dense_attention(q.double(), k.double(), v.double(), module.scale)
        errors.append(float((out.double() - want).abs().max() / want.abs().max()))

    module.register_forward_hook(compare)
    with torch.no_grad():
        for frame in frames():
            emodel(frame)
    assert deltas == [False] + [True] * 4  # the first frame initialises, every later one is a delta update
    assert max(errors) <= 1e-5


def test_attention_dense_or_ungated_queries_keep_the_original_ops():
    dense = evtrace.transform(Attention().eval(), image(), policy=evtrace.TopK(4), attention="dense")
    assert dense.attention_modules() == {}
    assert dense.report().sites[0].mode == "dense"
    model = Attention(q_from_input=True).eval()
    ungated = evtrace.transform(model, image(), policy=evtrace.All())
    assert ungated.attention_modules() == {}
    assert ungated.report().sites[0].reason == "q, k or v is not produced by a gated region"
    with torch.no_grad():
        for frame in frames(3):
            assert torch.allclose(ungated(frame), model(frame), atol=1e-6)
