"""Real timm models, where ``import timm`` works on the machine.

On the project's machines it does not (timm is not a dependency; where installed it imports
torchvision, whose PyPI wheel is a CUDA build that fails beside the CPU torch), so these skip
with the reason; ``models_zoo/timm_style.py`` carries timm's constructs into the suite instead
(tests/test_families.py, tests/test_fuzz_constructs.py).
"""

import pytest
import torch

import evtrace

try:
    import timm
except Exception as error:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
    pytest.skip(f"timm does not import here ({type(error).__name__}: {error})", allow_module_level=True)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_timm_models_are_gated_and_exact(name):
    model = timm.create_model(name, pretrained=False, img_size=64, num_classes=0).eval()
    x = torch.randn(1, 3, 64, 64)
    frames = [x, x + 0.1 * torch.randn_like(x), x + 0.2 * torch.randn_like(x)]
    full = evtrace.transform(model, x, policy=evtrace.All())
    with torch.no_grad():
        for frame in frames:
            got, want = full(frame), model(frame)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    report = evtrace.transform(model, x, policy=evtrace.TopFraction(0.25)).report()
    assert report.sites and all(s.mode == "exact" for s in report.sites)
