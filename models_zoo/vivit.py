"""ViViT model 2, the factorised encoder (Arnab et al., ICCV 2021).

A video (B, 3, T, H, W) is cut into tubelets by a Conv3d (kernel = stride = ``tubelet``), giving
T' = T / tubelet[0] time steps of h x w tokens. A spatial Transformer (class token, learned
position embedding, ``spatial_depth`` pre-norm blocks, final LayerNorm) runs on each time step
independently (batch B * T'); the T' spatial class tokens form a sequence to which a temporal
class token is prepended and a temporal position embedding added; a temporal Transformer
(``temporal_depth`` blocks, final LayerNorm) runs on it, and a linear classifier reads its class
token. Module names: ``patch_embed.proj``, ``spatial.{cls_token,pos_embed,blocks.{i},norm}``,
``temporal.{cls_token,pos_embed,blocks.{i},norm}``, ``head``.

All sizes are Python ints fixed at construction, so ``forward`` traces with
``torch.fx.symbolic_trace`` and ``torch.export.export(..., strict=False)``.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Block, resample_pos_embed

__all__ = ["ViViT", "TransformerEncoder", "TubeletEmbed", "vivit", "vivit_b"]


class TubeletEmbed(nn.Module):
    """Video (B, C, T, H, W) -> (B * T', h * w, D) tokens, one row of the batch per time step."""

    def __init__(
        self, tubelet: tuple[int, int, int], in_chans: int, embed_dim: int, grid: tuple[int, int, int]
    ):
        super().__init__()
        self.grid = grid  # (T', h, w), static
        self.embed_dim = embed_dim
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=tubelet, stride=tubelet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w = self.grid
        x = self.proj(x)  # (B, D, T', h, w)
        return x.permute(0, 2, 3, 4, 1).reshape(-1, h * w, self.embed_dim)


class TransformerEncoder(nn.Module):
    """Class token + learned position embedding + pre-norm blocks + final LayerNorm over (B, N, D).

    ``forward`` takes (B, N, D) tokens and returns the normalised (B, 1 + N, D) sequence, class
    token first. ``num_tokens`` (N, without the class token) is fixed at construction.
    """

    def __init__(
        self,
        num_tokens: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        use_sdpa: bool = False,
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + num_tokens, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, None, norm_eps, use_sdpa) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def _check_video_hook(module: ViViT, args: tuple) -> None:
    """Forward pre-hook: reject a video that is not (B, in_chans, num_frames, img_size, img_size).

    Runs in eager mode (and in non-strict ``torch.export``); symbolic tracing skips hooks.
    """
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return
    expected = (module.in_chans, module.num_frames, module.img_size, module.img_size)
    if x.dim() != 5 or tuple(int(s) for s in x.shape[1:]) != expected:
        raise ValueError(
            f"ViViT was built for videos of shape (B, {', '.join(map(str, expected))}) = (B, C, T, H, W) "
            f"and got {tuple(x.shape)}; sample num_frames={module.num_frames} frames, resize to "
            f"img_size={module.img_size}, or build the model for this input"
        )


class ViViT(nn.Module):
    """ViViT factorised encoder (model 2): tubelet embedding, spatial then temporal Transformer.

    ``forward(x)`` maps a (B, in_chans, num_frames, img_size, img_size) video to (B, num_classes)
    logits (or the (B, D) final temporal class token when ``num_classes == 0``).
    """

    def __init__(
        self,
        num_frames: int = 32,
        img_size: int = 224,
        num_classes: int = 400,
        tubelet: tuple[int, int, int] = (2, 16, 16),
        in_chans: int = 3,
        embed_dim: int = 768,
        spatial_depth: int = 12,
        temporal_depth: int = 4,
        num_heads: int = 12,
        temporal_num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        use_sdpa: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("num_frames", num_frames),
            ("img_size", img_size),
            ("in_chans", in_chans),
            ("embed_dim", embed_dim),
            ("spatial_depth", spatial_depth),
            ("temporal_depth", temporal_depth),
            ("num_heads", num_heads),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 0 (0: no classifier)")
        tubelet = tuple(tubelet)
        if len(tubelet) != 3 or any(not isinstance(t, int) or t < 1 for t in tubelet):
            raise ValueError(f"tubelet={tubelet} must be three positive ints (t, h, w)")
        if num_frames % tubelet[0]:
            raise ValueError(
                f"num_frames={num_frames} is not divisible by the tubelet length {tubelet[0]}; "
                f"sample a multiple of {tubelet[0]} frames"
            )
        if img_size % tubelet[1] or img_size % tubelet[2]:
            raise ValueError(
                f"img_size={img_size} is not divisible by the tubelet patch {tubelet[1:]}; "
                f"resize to a multiple of it"
            )
        temporal_num_heads = num_heads if temporal_num_heads is None else temporal_num_heads
        for name, heads in (("num_heads", num_heads), ("temporal_num_heads", temporal_num_heads)):
            if heads < 1 or embed_dim % heads:
                raise ValueError(f"embed_dim={embed_dim} is not divisible by {name}={heads}")
        self.num_frames = num_frames
        self.img_size = img_size
        self.in_chans = in_chans
        self.tubelet = tubelet
        self.embed_dim = embed_dim
        self.grid = (num_frames // tubelet[0], img_size // tubelet[1], img_size // tubelet[2])
        t, h, w = self.grid

        self.patch_embed = TubeletEmbed(tubelet, in_chans, embed_dim, self.grid)
        self.spatial = TransformerEncoder(
            h * w, embed_dim, spatial_depth, num_heads, mlp_ratio, qkv_bias, norm_eps, use_sdpa
        )
        self.temporal = TransformerEncoder(
            t, embed_dim, temporal_depth, temporal_num_heads, mlp_ratio, qkv_bias, norm_eps, use_sdpa
        )
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None
        self.register_forward_pre_hook(_check_video_hook)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Video -> (B, 1 + T', D) normalised temporal sequence (class token first)."""
        x = self.patch_embed(x)  # (B*T', h*w, D)
        x = self.spatial(x)  # (B*T', 1 + h*w, D)
        x = x[:, 0].reshape(-1, self.grid[0], self.embed_dim)  # (B, T', D) spatial class tokens
        return self.temporal(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) video -> (B, num_classes) logits."""
        x = self.forward_features(x)[:, 0]
        return x if self.head is None else self.head(x)

    @torch.no_grad()
    def load_pretrained_pos_embed(self, pos_embed: torch.Tensor) -> None:
        """Copy a spatial position embedding (1, 1 + h*w, D) trained on another image size,
        resampling its grid bicubically to this model's (keeps the class-token row)."""
        if pos_embed.dim() != 3 or pos_embed.shape[-1] != self.embed_dim:
            raise ValueError(
                f"pos_embed of shape {tuple(pos_embed.shape)} is not (1, 1 + h*w, {self.embed_dim})"
            )
        self.spatial.pos_embed.copy_(resample_pos_embed(pos_embed, self.grid[1:], 1))


def vivit(**kwargs) -> ViViT:
    """A ViViT factorised encoder with any configuration; see :class:`ViViT` for the arguments."""
    return ViViT(**kwargs)


def vivit_b(
    num_frames: int = 32,
    img_size: int = 224,
    num_classes: int = 400,
    tubelet: tuple[int, int, int] = (2, 16, 16),
    spatial_depth: int = 12,
    temporal_depth: int = 4,
    use_sdpa: bool = False,
    **kwargs,
) -> ViViT:
    """ViViT-B factorised encoder: D 768, 12 heads, MLP 3072, 12 spatial and 4 temporal blocks,
    2x16x16 tubelets. Keyword arguments (``embed_dim``, ``num_heads``, ...) override the width for
    small test configurations."""
    kwargs.setdefault("embed_dim", 768)
    kwargs.setdefault("num_heads", 12)
    return ViViT(
        num_frames=num_frames,
        img_size=img_size,
        num_classes=num_classes,
        tubelet=tubelet,
        spatial_depth=spatial_depth,
        temporal_depth=temporal_depth,
        use_sdpa=use_sdpa,
        **kwargs,
    )
