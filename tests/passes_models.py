"""Tiny modules for the per-pass tests: each exercises one construct, nothing else."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TOKENS, WIDTH = 16, 8


class PatchTokens(nn.Module):
    """Image -> (1, TOKENS, WIDTH) tokens by a patch embedding (kernel == stride)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, WIDTH, kernel_size=4, stride=4)

    def forward(self, x):
        return self.patch(x).flatten(2).transpose(1, 2)


class TokenMLP(nn.Module):
    """Patch tokens, then a residual MLP: one token-wise region with two linears."""

    def __init__(self):
        super().__init__()
        self.embed = PatchTokens()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x):
        t = self.embed(x)
        return t + self.fc2(F.gelu(self.fc1(self.norm(t))))


class NoLinear(nn.Module):
    """Patch tokens through token-wise ops without any linear: nothing worth gating."""

    def __init__(self):
        super().__init__()
        self.embed = PatchTokens()
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x):
        return F.gelu(self.norm(self.embed(x))) * 2.0


class Attention(nn.Module):
    """Patch tokens, one fused-qkv attention block with an output projection."""

    def __init__(self, heads: int = 2, q_from_input: bool = False, fused: bool = False):
        super().__init__()
        self.embed = PatchTokens()
        self.heads = heads
        self.fused = fused
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.q_from_input = q_from_input
        self.scale = (WIDTH // heads) ** -0.5

    def forward(self, x):
        t = self.embed(x)
        b, n, c = t.shape
        qkv = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.q_from_input:  # queries straight from the patch embedding: no gated region makes them
            q = t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        else:
            y = (q * self.scale) @ k.transpose(-2, -1)
            y = y.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, n, c)
        return t + self.proj(y)


class ShapeReads(nn.Module):
    """Patch tokens reshaped with sizes read from the tensor (``B, N, C = x.shape``)."""

    def __init__(self):
        super().__init__()
        self.embed = PatchTokens()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        t = self.embed(x)
        b, n, c = t.shape
        return self.fc(t).reshape(b, n, 2, c // 2).sum(-1)


def image(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, 16, 16, generator=generator)
