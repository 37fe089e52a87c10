"""A stratified sample of the conformance sweeps (bench/sweep_timm.py, bench/sweep_hf.py).

Each case runs the sweeps' own check (bench/_sweep_common.py ``check_case``: build the shrunk
configuration, transform at TopFraction(0.25), full update against the original and 3 partial
frames against the reference simulator on real video, both FLOP conventions) on an architecture
the sweep tables list. Architectures that work (a few per family) must stay at "ok >= 2x":
transform, exact results, no crash and at least 2x fewer FLOPs at N/4. One architecture per
failure class of the first tables, fixed since by a general mechanism, must stay at the issue's
bar ("ok >= 2x" or a true warning below 2x).
"""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = ("ok >= 2x",)
BAR = ("ok >= 2x", "warned < 2x")

# timm model name -> expected verdict list; None: works today
TIMM_WORKING = [
    "vit_tiny_patch16_224",  # class token, fused attention
    "deit_tiny_distilled_patch16_224",  # class + distillation tokens
    "eva02_tiny_patch14_224",  # rotary embeddings, SwiGLU
    "vit_small_patch14_reg4_dinov2",  # registers, layer scale
]
TIMM_FIXED = {  # the failure class each one stood for
    "swinv2_cr_tiny_224": "transform: an argument used before it is defined (window attention rewrite)",
    "cait_xxs24_224": "transform: class-attention stage (expanded size mismatch)",
    "levit_128s": "transform: no token sequence (conv stem, attention with strided queries)",
}
HF_WORKING = [
    ("image features", "vit", "ViTModel", "", False),
    ("image features", "dinov2", "Dinov2Model", "", False),
]
HF_FIXED = {  # the failure class each one stood for
    ("image classification", "data2vec-vision", "Data2VecVisionForImageClassification", "", False): (
        "partial frames: a view of a baked size inside a gated region"
    ),
    ("image classification", "cvt", "CvtForImageClassification", "", False): (
        "transform: no token sequence from an overlapping conv stem"
    ),
}


def _check(case):
    from bench._sweep_common import check_case

    row = check_case(case, step_limit=300)
    detail = f"{row.verdict}: {row.failed_step} {row.reason} steps {row.steps}"
    return row, detail


SIZE = 112  # smaller inputs than the sweeps' (224): the same checks, faster


def _timm_case(name, size=SIZE):
    from bench._sweep_common import Case
    from bench.sweep_timm import build_timm

    return Case("timm", name, name, lambda: build_timm(name, size))


def _hf_case(task, model_type, name, config, video, size=SIZE):
    from bench._sweep_common import Case
    from bench.sweep_hf import build_hf

    return Case(task, f"{model_type}:{name}", name, lambda: build_hf(name, config, model_type, video, size))


@pytest.mark.parametrize("name", TIMM_WORKING)
def test_timm_working_architectures_stay_working(timm, name):
    row, detail = _check(_timm_case(name))
    assert row.verdict in GOOD, detail
    assert row.full_error <= 1e-4 and row.partial_error <= 1e-4
    assert row.delta_sites == row.sites > 0


@pytest.mark.parametrize(
    "name",
    list(TIMM_FIXED),
)
def test_timm_fixed_failure_classes_stay_at_the_bar(timm, name):
    row, detail = _check(_timm_case(name))
    assert row.verdict in BAR, detail


@pytest.fixture(scope="module")
def transformers_available():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")


@pytest.mark.parametrize("entry", HF_WORKING, ids=[e[2] for e in HF_WORKING])
def test_hf_working_classes_stay_working(transformers_available, entry):
    row, detail = _check(_hf_case(*entry))
    assert row.verdict in GOOD, detail
    assert row.full_error <= 1e-4 and row.partial_error <= 1e-4
    assert row.sites > 0 and row.delta_sites > 0


@pytest.mark.parametrize(
    "entry",
    list(HF_FIXED),
    ids=[e[2] for e in HF_FIXED],
)
def test_hf_fixed_failure_classes_stay_at_the_bar(transformers_available, entry):
    row, detail = _check(_hf_case(*entry))
    assert row.verdict in BAR, detail
