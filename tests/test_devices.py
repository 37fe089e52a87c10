"""Device-agnostic fast paths: nothing in the rewritten graphs needs a CPU-only kernel.

The ``meta`` device has no CPU kernels and no data: a frame there runs every op of the eventful
graph (gates, sparse regions, packed linears, delta attention) for its shapes and device only, so a
CPU-only kernel without a fallback (oneDNN packing, say) or a CPU tensor created inside a module
fails here. The CUDA test runs the same streams on a GPU against the original model; it skips on
machines without one (this project's CI), and bench/gpu.py is the prepared run for a lent GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_leaves

import evtrace
from evtrace.runtime.attention import ExactDeltaAttention
from tests.models import real_frames, small_vit, small_vitdet


def _models():
    torch.manual_seed(0)
    vit, _ = small_vit(img_size=128)  # 65 tokens: TopK(20) gathers enough rows for the packed kernels
    vitdet, _ = small_vitdet()
    return {"vit": (vit, 128, 16), "vitdet": (vitdet, 160, 16)}


@pytest.mark.parametrize("name", ["vit", "vitdet"])
def test_a_steady_frame_runs_on_the_meta_device(name):
    model, size, patch = _models()[name]
    frames = real_frames(size, count=3, patch_size=patch)
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(20), check_inputs=False, scene_cut=None)
    sites = [m for m in emodel.attention_modules().values() if isinstance(m, ExactDeltaAttention)]
    for m in sites:
        m.full_when_cheaper = False  # the delta update, not fused attention, must run there too
    with torch.no_grad():
        emodel(frames[0])
        want = tree_leaves(emodel(frames[1]))
        emodel.to("meta")
        got = tree_leaves(emodel(frames[2].to("meta")))
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(t.device.type == "meta" for t in got)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: bench/gpu.py runs this on a GPU"
)
def test_eventful_streams_on_cuda_equal_the_original_under_a_full_update():
    model, size, patch = _models()["vit"]
    frames = [x.cuda() for x in real_frames(size, count=4, patch_size=patch)]
    model = model.cuda()
    emodel = evtrace.transform(model, frames[0], policy=evtrace.All())
    with torch.no_grad():
        for x in frames:
            want, got = model(x), emodel(x)
            assert float((got - want).abs().max() / want.abs().max()) < 1e-4
