"""Small configurations of every zoo model and of HF transformers models, shared by the tests."""

from __future__ import annotations

import torch

import models_zoo
from models_zoo.vitdet import vitdet
from models_zoo.vivit import vivit_b


def small_vit(**kw):
    config = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=10) | kw
    return models_zoo.vit(**config).eval(), torch.randn(1, 3, config["img_size"], config["img_size"])


def small_dinov2(**kw):
    config = dict(img_size=56, embed_dim=48, depth=2, num_heads=3, num_register_tokens=2) | kw
    model = models_zoo.vit_s14_dinov2(**config).eval()
    return model, torch.randn(1, 3, config["img_size"], config["img_size"])


def small_vitdet(**kw):
    config = (
        dict(
            img_size=160,
            embed_dim=64,
            depth=3,
            num_heads=2,
            window_size=4,
            global_blocks=(2,),
            out_channels=32,
        )
        | kw
    )
    return vitdet(**config).eval(), torch.randn(1, 3, config["img_size"], config["img_size"])


def small_vivit(**kw):
    config = (
        dict(
            num_frames=4,
            img_size=32,
            spatial_depth=2,
            temporal_depth=1,
            embed_dim=64,
            num_heads=4,
            num_classes=7,
            temporal_num_heads=4,
        )
        | kw
    )
    return vivit_b(**config).eval(), torch.randn(1, 3, 4, 32, 32)


ZOO = {
    "vit": small_vit,
    "vit_sdpa": lambda: small_vit(use_sdpa=True),
    "dinov2_registers": small_dinov2,
    "vitdet": small_vitdet,
    "vitdet_sdpa": lambda: small_vitdet(use_sdpa=True),
    "vivit": small_vivit,
}

# attention sites per model: one per layer
ZOO_SITES = {"vit": 2, "vit_sdpa": 2, "dinov2_registers": 2, "vitdet": 3, "vitdet_sdpa": 3, "vivit": 3}


def hf_models():
    """HF transformers models built offline from configs (random weights)."""
    import transformers as tf

    return {
        "hf_vit": (
            lambda: tf.ViTModel(
                tf.ViTConfig(
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=128,
                    image_size=32,
                    patch_size=8,
                ),
                add_pooling_layer=False,
            ).eval(),
            torch.randn(1, 3, 32, 32),
            2,
        ),
        "hf_vivit": (
            lambda: tf.VivitModel(
                tf.VivitConfig(
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    intermediate_size=128,
                    image_size=32,
                    num_frames=4,
                    tubelet_size=[2, 8, 8],
                ),
                add_pooling_layer=False,
            ).eval(),
            torch.randn(1, 4, 3, 32, 32),
            2,
        ),
        "hf_vitdet": (
            lambda: tf.VitDetModel(
                tf.VitDetConfig(
                    hidden_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    image_size=64,
                    patch_size=8,
                    window_size=4,
                    window_block_indices=[0],
                    pretrain_image_size=64,
                    use_relative_position_embeddings=True,
                )
            ).eval(),
            torch.randn(1, 3, 64, 64),
            2,
        ),
        "hf_dinov2": (
            lambda: tf.Dinov2Model(
                tf.Dinov2Config(
                    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7
                )
            ).eval(),
            torch.randn(1, 3, 28, 28),
            2,
        ),
    }


def real_frames(size: int, count: int = 8, patch_size: int = 16, clip: str = "bigbuckbunny", start: int = 40):
    """``count`` consecutive real frames of a shipped clip, (1, 3, size, size) each."""
    from evtrace.tools.video import frames

    return list(frames(clip, size=size, patch_size=patch_size, max_frames=count, start=start))


def real_clips(size: int, count: int, frames_per_clip: int, layout: str = "BCTHW"):
    """Sliding windows of consecutive real frames: video inputs for ViViT-style models."""
    single = real_frames(size, count + frames_per_clip - 1)
    clips = []
    for i in range(count):
        stack = torch.stack([f[0] for f in single[i : i + frames_per_clip]])  # (T, 3, H, W)
        clips.append(stack.permute(1, 0, 2, 3)[None] if layout == "BCTHW" else stack[None])
    return clips
