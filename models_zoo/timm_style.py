"""timm-style vision Transformers, written here because timm itself does not import on the
project's machines (it imports torchvision, whose PyPI wheel is a CUDA build).

The constructs follow timm's own modules, so that what evtrace does to them is what it does to
``timm.create_model(...)``:

* ``Attention.forward(x, attn_mask=None)`` with a fused ``qkv`` linear, optional q/k norms and
  ``F.scaled_dot_product_attention`` (timm's ``fused_attn``) or the explicit form;
* ``Block`` with optional layer scale (``ls1``/``ls2``) and pre-norms;
* register tokens after the class token (timm's ``reg_tokens``);
* an EVA-02-style variant: rotary position embedding on the patch tokens of q and k
  (per-position sin/cos tables, the prefix tokens left alone) and a SwiGLU MLP
  (``fc1_g``, ``fc1_x``, ``silu(g) * x``, ``fc2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import LayerScale, Mlp

__all__ = ["TimmStyleViT", "timm_vit", "eva02_style", "rope_tables"]


def rope_tables(grid: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, head_dim) sin and cos tables of a 2-D rotary embedding over a grid x grid patch layout:
    half the channels rotate with the row, half with the column (EVA-02's layout)."""
    quarter = head_dim // 4
    freqs = 1.0 / base ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=1)  # (N, head_dim/2)
    angles = angles.repeat_interleave(2, dim=1)
    return angles.sin(), angles.cos()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_norm: bool = False,
        fused_attn: bool = True,
        rope: bool = False,
        prefix: int = 1,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.prefix = prefix

    def _rotate(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        head, patches = x[:, :, : self.prefix], x[:, :, self.prefix :]
        return torch.cat([head, patches * cos + rotate_half(patches) * sin], dim=2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, *rope), self._rotate(k, *rope)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                attn = attn + attn_mask
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1_g(x)) * self.fc1_x(x))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        init_values: float | None = None,
        swiglu: bool = False,
        **attention,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, **attention)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLU(dim, hidden) if swiglu else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmStyleViT(nn.Module):
    """A timm-style ViT returning the final token map (B, 1 + registers + N, D)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        reg_tokens: int = 0,
        init_values: float | None = None,
        qk_norm: bool = False,
        fused_attn: bool = True,
        rope: bool = False,
        swiglu: bool = False,
    ):
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, embed_dim) * 0.02)
        prefix = 1 + reg_tokens
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                init_values=init_values,
                swiglu=swiglu,
                qk_norm=qk_norm,
                fused_attn=fused_attn,
                rope=rope,
                prefix=prefix,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if rope:
            sin, cos = rope_tables(grid, embed_dim // num_heads)
            self.register_buffer("rope_sin", sin, persistent=False)
            self.register_buffer("rope_cos", cos, persistent=False)
        self.rope = rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        rope = (self.rope_sin, self.rope_cos) if self.rope else None
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.norm(x)


def timm_vit(**kw) -> TimmStyleViT:
    """timm's ``vit_*_reg`` layout: fused qkv, SDPA, layer scale, registers."""
    config = (
        dict(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, reg_tokens=4, init_values=1e-5)
        | kw
    )
    return TimmStyleViT(**config)


def eva02_style(**kw) -> TimmStyleViT:
    """EVA-02's constructs: rotary position embedding on q and k, SwiGLU MLP, q/k norms off."""
    config = dict(img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, rope=True, swiglu=True) | kw
    return TimmStyleViT(**config)
