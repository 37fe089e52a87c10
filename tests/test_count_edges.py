"""Exact paper-convention FLOPs of single ops whose rules no model test pins down: fused
attention with a mask (the mask add counts), index_add / scatter_add (one add per source
element, integer index arithmetic free)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evtrace.cost.count import count_flops


class Sdpa(nn.Module):
    def __init__(self, masked: bool):
        super().__init__()
        self.masked = masked

    def forward(self, q, k, v):
        mask = torch.zeros(q.shape[-2], k.shape[-2]) if self.masked else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_attention_counts_both_products_and_the_mask_add(masked):
    b, h, nq, nk, d, dv = 2, 3, 5, 7, 4, 6
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, dv)
    rows = b * h * nq
    expected = rows * nk * (d + dv) + (rows * nk if masked else 0)
    assert count_flops(Sdpa(masked), (q, k, v)).total == expected


class EfficientAttention(nn.Module):
    """The fused kernel that takes the mask as a positional bias (CUDA's memory-efficient attention),
    called directly: on this CPU F.scaled_dot_product_attention with a mask runs the math path."""

    def forward(self, q, k, v, bias):
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False)[0]


def test_a_fused_kernel_with_a_positional_bias_counts_the_bias_add():
    b, h, nq, nk, d = 1, 2, 5, 7, 4
    q, k, v = (torch.empty(b, h, n, d, device="meta") for n in (nq, nk, nk))
    bias = torch.empty(b, h, nq, nk, device="meta")
    rows = b * h * nq
    assert count_flops(EfficientAttention(), (q, k, v, bias)).total == rows * nk * 2 * d + rows * nk


class IndexAdd(nn.Module):
    def forward(self, x, index, src):
        return x.index_add(0, index, src) + 0  # the + 0: one add per output element


class ScatterAdd(nn.Module):
    def forward(self, x, index, src):
        return x.scatter_add(1, index, src)


def test_index_add_and_scatter_add_count_one_add_per_source_element():
    x, src = torch.randn(10, 4), torch.randn(3, 4)
    index = torch.tensor([1, 5, 7])
    assert count_flops(IndexAdd(), (x, index, src)).total == src.numel() + x.numel()
    x2, src2 = torch.randn(3, 8), torch.randn(3, 5)
    index2 = torch.randint(0, 8, (3, 5))
    assert count_flops(ScatterAdd(), (x2, index2, src2)).total == src2.numel()
    ints = torch.zeros(10, dtype=torch.long)
    assert count_flops(IndexAdd(), (ints, index, torch.ones(3, dtype=torch.long))).total == 0
