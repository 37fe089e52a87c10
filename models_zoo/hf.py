"""Load Hugging Face (and timm) ViT weights into the zoo's :class:`VisionTransformer`.

No download and no dependency on ``transformers``: the functions take a state dict (a mapping of
names to tensors, as ``model.state_dict()`` or ``safetensors.torch.load_file`` return it) and the
model's configuration, either a ``transformers`` config object or a plain dict with the same field
names.

* :func:`vit_from_hf` / :func:`convert_hf_vit_state_dict`: ``ViTModel`` (also
  ``ViTForImageClassification``, whose backbone keys carry a ``vit.`` prefix; the classifier is
  dropped) and timm-style ViT keys (``blocks.{i}.attn.qkv`` ...), which already match ours.
  Both HF key layouts are accepted: the checkpoint one (hub files, transformers 4:
  ``encoder.layer.{i}.attention.attention.query`` ...) and the in-memory one of transformers 5
  (``layers.{i}.attention.q_proj``, ``mlp.fc1`` ...).
* :func:`dinov2_from_hf` / :func:`convert_hf_dinov2_state_dict`: ``Dinov2Model`` (layer scale,
  no SwiGLU).

Semantics checked against ``transformers`` 5: HF ViT uses exact (erf) GELU, like our ``Mlp``, and
``layer_norm_eps`` 1e-12 for every LayerNorm, which our ``norm_eps`` argument expresses (it is used
by ``norm1``, ``norm2`` and the final ``norm`` alike). Other activations that map onto a torch
module (tanh-approximated GELU, ReLU, SiLU) are installed by replacing ``blocks[i].mlp.act``;
anything else raises ``ValueError`` naming the config field. The returned models have no
classifier head (``num_classes=0``): ``model(x)`` is the final normalised token map, i.e. HF's
``last_hidden_state``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .layers import resample_pos_embed
from .vit import VisionTransformer

__all__ = [
    "vit_from_hf",
    "convert_hf_vit_state_dict",
    "vit_kwargs_from_hf_config",
    "dinov2_from_hf",
    "convert_hf_dinov2_state_dict",
    "dinov2_kwargs_from_hf_config",
]

_MISSING = object()

# HF ``hidden_act`` names -> a factory for the equivalent torch module.
_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_python": lambda: nn.GELU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
    "silu": lambda: nn.SiLU(),
    "swish": lambda: nn.SiLU(),
}


# ----------------------------------------------------------------------------------------------
# config helpers


def _get(config: Any, name: str, default: Any = _MISSING) -> Any:
    if isinstance(config, Mapping):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    if value is _MISSING:
        raise ValueError(f"config has no field {name!r}, which is required")
    return value


def _pair(value: Any, field: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    try:
        h, w = value
        return int(h), int(w)
    except (TypeError, ValueError):
        raise ValueError(f"config field {field!r} must be an int or an (h, w) pair, got {value!r}") from None


def _common_kwargs(config: Any) -> dict:
    hidden = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    if heads <= 0 or hidden % heads:
        raise ValueError(f"config field 'num_attention_heads'={heads} does not divide 'hidden_size'={hidden}")
    patch_h, patch_w = _pair(_get(config, "patch_size"), "patch_size")
    if patch_h != patch_w:
        raise ValueError(
            f"config field 'patch_size'={(patch_h, patch_w)} is not square; only square patches are supported"
        )
    img_size = _pair(_get(config, "image_size"), "image_size")
    if img_size[0] % patch_h or img_size[1] % patch_h:
        raise ValueError(f"config field 'image_size'={img_size} is not divisible by 'patch_size'={patch_h}")
    act = _get(config, "hidden_act", "gelu")
    if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise ValueError(
            f"config field 'hidden_act'={act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}"
        )
    return dict(
        img_size=img_size,
        patch_size=patch_h,
        in_chans=int(_get(config, "num_channels", 3)),
        num_classes=0,
        embed_dim=hidden,
        depth=int(_get(config, "num_hidden_layers")),
        num_heads=heads,
        qkv_bias=bool(_get(config, "qkv_bias", True)),
        class_token=True,
        norm_eps=float(_get(config, "layer_norm_eps")),
    )


def _mlp_ratio_for(hidden: int, intermediate: int) -> float:
    """A ratio r with ``int(hidden * r) == intermediate`` (what ``Block`` computes)."""
    ratio = intermediate / hidden
    if int(hidden * ratio) != intermediate:
        ratio = (intermediate + 0.5) / hidden
    assert int(hidden * ratio) == intermediate
    return ratio


def vit_kwargs_from_hf_config(config: Any) -> dict:
    """:class:`VisionTransformer` constructor arguments for a HF ``ViTConfig`` (object or dict)."""
    kwargs = _common_kwargs(config)
    intermediate = int(_get(config, "intermediate_size"))
    if intermediate <= 0:
        raise ValueError(f"config field 'intermediate_size'={intermediate} must be positive")
    kwargs["mlp_ratio"] = _mlp_ratio_for(kwargs["embed_dim"], intermediate)
    kwargs["layer_scale"] = None
    return kwargs


def dinov2_kwargs_from_hf_config(config: Any) -> dict:
    """:class:`VisionTransformer` constructor arguments for a HF ``Dinov2Config`` (object or dict)."""
    if _get(config, "use_swiglu_ffn", False):
        raise ValueError("config field 'use_swiglu_ffn'=True (SwiGLU MLP, ViT-g) is not supported")
    kwargs = _common_kwargs(config)
    kwargs["mlp_ratio"] = float(_get(config, "mlp_ratio", 4.0))
    kwargs["layer_scale"] = float(_get(config, "layerscale_value", 1.0))
    kwargs["num_register_tokens"] = int(_get(config, "num_register_tokens", 0) or 0)
    return kwargs


# ----------------------------------------------------------------------------------------------
# state dict conversion

# Per-layer sub-module names -> ours. Both HF layouts are accepted: the checkpoint layout (hub
# files, transformers 4, exported graphs: ``encoder.layer.{i}.attention.attention.query``,
# ``intermediate.dense`` ...) and the in-memory layout of transformers 5 (``layers.{i}`` for ViT,
# ``attention.q_proj`` ..., ``mlp.fc1``), which renames keys on load.
_LAYER_MAP = {
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1",  # ViT
    "layernorm_after": "norm2",
    "norm1": "norm1",  # DINOv2
    "norm2": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
}
_PARAM_MAP = {"weight": "weight", "bias": "bias", "lambda1": "gamma"}

_LAYER_RE = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_QKV_RE = re.compile(r"^attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)$")
_QKV_NAMES = {"q": "query", "k": "key", "v": "value"}


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the backbone keys of a HF state dict, without a wrapper prefix (``vit.``, ``dinov2.``)."""
    anchor = next((k for k in state_dict if k.endswith("embeddings.cls_token")), None)
    if anchor is None:
        raise ValueError("state dict has no '...embeddings.cls_token' key: not a HF ViT/DINOv2 state dict")
    prefix = anchor[: -len("embeddings.cls_token")]
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _convert_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = _strip_prefix(state_dict)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        value = torch.as_tensor(value)
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif key == "embeddings.register_tokens":
            out["register_tokens"] = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif key == "embeddings.mask_token" or key.startswith("pooler."):
            continue  # masked-image-modelling token and pooler: not part of the token map
        elif (m := _LAYER_RE.match(key)) is not None:
            idx, sub, kind = int(m.group(1)), m.group(2), m.group(3)
            if (q := _QKV_RE.match(sub)) is not None and kind != "lambda1":
                part = q.group(1) or _QKV_NAMES[q.group(2)]
                qkv.setdefault((idx, kind), {})[part] = value
            elif sub in _LAYER_MAP and (kind == "lambda1") == sub.startswith("layer_scale"):
                out[f"blocks.{idx}.{_LAYER_MAP[sub]}.{_PARAM_MAP[kind]}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (idx, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"layer {idx}: attention {kind} has only {sorted(parts)} of query/key/value")
        out[f"blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    if unknown:
        raise ValueError(
            f"state dict keys with no counterpart in VisionTransformer: {unknown[:8]}"
            + (" ..." if len(unknown) > 8 else "")
        )
    return out


_TIMM_DROP = ("head.", "head_drop.")


def _convert_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_TIMM_DROP):
            continue
        if key.startswith(("fc_norm.", "norm_pre.", "attn_pool.")) or key == "dist_token":
            raise ValueError(f"timm state dict key {key!r}: that ViT variant is not supported")
        out["register_tokens" if key == "reg_token" else key] = torch.as_tensor(value)
    return out


def _is_timm(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "blocks.0.attn.qkv.weight" in state_dict


def convert_hf_vit_state_dict(state_dict: Mapping[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Rename a HF ``ViTModel`` state dict (or a timm ViT one) to :class:`VisionTransformer` keys.

    Separate ``query``/``key``/``value`` linears are concatenated into the fused ``qkv``. The pooler,
    the mask token and any wrapper outside the backbone (``classifier.*`` next to ``vit.*``) are
    dropped; an unknown backbone key raises ``ValueError``. ``config`` checks the layer count.
    """
    out = _convert_timm(state_dict) if _is_timm(state_dict) else _convert_hf(state_dict)
    _check_depth(out, config)
    return out


def convert_hf_dinov2_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Any = None
) -> dict[str, torch.Tensor]:
    """Rename a HF ``Dinov2Model`` state dict to :class:`VisionTransformer` keys (layer scale
    ``layer_scaleN.lambda1`` -> ``lsN.gamma``)."""
    out = _convert_hf(state_dict)
    if config is not None:
        _check_depth(out, config)
    return out


def _check_depth(converted: Mapping[str, torch.Tensor], config: Any) -> None:
    depth = int(_get(config, "num_hidden_layers"))
    found = {int(k.split(".")[1]) for k in converted if k.startswith("blocks.")}
    if found != set(range(depth)):
        raise ValueError(
            f"config field 'num_hidden_layers'={depth} does not match the state dict, which has "
            f"{len(found)} layers"
        )


def _build(kwargs: dict, converted: dict[str, torch.Tensor], hidden_act: str, img_size) -> VisionTransformer:
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = VisionTransformer(**kwargs)
    if hidden_act not in ("gelu", "gelu_python"):
        for block in model.blocks:
            block.mlp.act = _ACTIVATIONS[hidden_act]()
    pos = converted.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        converted = dict(converted)
        grid_rows = pos.shape[1] - model.num_prefix_tokens
        root = int(round(grid_rows**0.5))
        if root * root != grid_rows:
            raise ValueError(
                f"position embedding of shape {tuple(pos.shape)} does not fit {model.num_prefix_tokens} "
                f"prefix token(s) plus a square grid"
            )
        converted["pos_embed"] = resample_pos_embed(pos, model.grid_size, model.num_prefix_tokens)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def vit_from_hf(
    state_dict: Mapping[str, torch.Tensor], config: Any, img_size: int | tuple[int, int] | None = None
) -> VisionTransformer:
    """A :class:`VisionTransformer` carrying the weights of a HF ``ViTModel`` (or timm ViT).

    ``model(x)`` equals ``ViTModel(config, add_pooling_layer=False)(x).last_hidden_state``.
    ``img_size`` (default: ``config.image_size``) builds the model for another resolution, the
    position embedding resampled bicubically.
    """
    kwargs = vit_kwargs_from_hf_config(config)
    converted = convert_hf_vit_state_dict(state_dict, config)
    if "blocks.0.ls1.gamma" in converted:  # timm with layer scale
        kwargs["layer_scale"] = 1.0
    if "register_tokens" in converted:
        kwargs["num_register_tokens"] = int(converted["register_tokens"].shape[1])
    return _build(kwargs, converted, _get(config, "hidden_act", "gelu"), img_size)


def dinov2_from_hf(
    state_dict: Mapping[str, torch.Tensor], config: Any, img_size: int | tuple[int, int] | None = None
) -> VisionTransformer:
    """A :class:`VisionTransformer` carrying the weights of a HF ``Dinov2Model``.

    At ``config.image_size`` ``model(x)`` equals ``Dinov2Model(config)(x).last_hidden_state``; at
    another ``img_size`` the position embedding is resampled once, as HF does on every call.
    """
    kwargs = dinov2_kwargs_from_hf_config(config)
    converted = convert_hf_dinov2_state_dict(state_dict, config)
    return _build(kwargs, converted, _get(config, "hidden_act", "gelu"), img_size)
