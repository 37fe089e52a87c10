"""A configurable plain ViT (ViT/DeiT/DINOv2 family) and its presets."""

from __future__ import annotations

import torch
from torch import nn

from .layers import Block, PatchEmbed, resample_pos_embed


class VisionTransformer(nn.Module):
    """Plain ViT: patch embedding, optional class and register tokens, pre-norm blocks.

    ``forward`` returns classifier logits (class token) when ``num_classes > 0``, otherwise the
    final normalised token map (B, prefix + N, D). ``forward_features`` always returns the map.
    Register tokens (DINOv2-reg) follow the class token and get no position embedding.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        num_register_tokens: int = 0,
        layer_scale: float | None = None,
        norm_eps: float = 1e-6,
        use_sdpa: bool = False,
    ):
        super().__init__()
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        if img_h % patch_size or img_w % patch_size:
            raise ValueError(
                f"image size {img_h}x{img_w} is not divisible by patch_size={patch_size}; "
                f"pick a multiple of {patch_size}"
            )
        self.img_size = (img_h, img_w)
        self.patch_size = patch_size
        self.grid_size = (img_h // patch_size, img_w // patch_size)
        self.num_prefix_tokens = int(class_token)
        self.num_register_tokens = num_register_tokens
        self.embed_dim = embed_dim
        self.num_heads = num_heads

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        num_pos = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.randn(1, num_pos, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, layer_scale, norm_eps, use_sdpa)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    @property
    def num_tokens(self) -> int:
        """Length of the token sequence the blocks see."""
        return self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens + self.num_register_tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, : self.num_prefix_tokens], regs, x[:, self.num_prefix_tokens :]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if self.head is None:
            return x
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))

    def load_pretrained_pos_embed(self, pos_embed: torch.Tensor) -> None:
        """Copy a position embedding trained on another grid, resampling it to this model's grid."""
        resized = resample_pos_embed(pos_embed, self.grid_size, self.num_prefix_tokens)
        with torch.no_grad():
            self.pos_embed.copy_(resized)


def vit(**kwargs) -> VisionTransformer:
    """A ViT with any configuration; see :class:`VisionTransformer` for the arguments."""
    return VisionTransformer(**kwargs)


def vit_b16(img_size: int = 224, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """ViT-B/16 (Dosovitskiy et al.): D 768, depth 12, 12 heads; 86.57 M parameters with the
    1000-class head. Keyword arguments override the preset (e.g. ``depth=2`` for tests)."""
    config = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12) | kwargs
    return VisionTransformer(img_size=img_size, num_classes=num_classes, **config)


def vit_s14_dinov2(img_size: int = 224, num_classes: int = 0, **kwargs) -> VisionTransformer:
    """DINOv2 ViT-S/14: D 384, depth 12, 6 heads, layer scale, LayerNorm eps 1e-6, no head
    by default (22.06 M parameters with the 518-px position embedding, fewer at 224)."""
    config = dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, layer_scale=1.0) | kwargs
    return VisionTransformer(img_size=img_size, num_classes=num_classes, **config)


def deit_tiny(img_size: int = 224, num_classes: int = 1000, **kwargs) -> VisionTransformer:
    """DeiT-Ti/16: D 192, depth 12, 3 heads; 5.72 M parameters with the 1000-class head."""
    config = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3) | kwargs
    return VisionTransformer(img_size=img_size, num_classes=num_classes, **config)
