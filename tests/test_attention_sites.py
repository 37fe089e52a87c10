"""passes.attention_sites: explicit and fused attention matched into one record; other products not."""

import torch
import torch.nn.functional as F
from torch import nn

from evtrace.graph.plan import LogitTerm
from passes.pipeline import PIPELINE, analyze
from tests.passes_models import WIDTH, Attention, PatchTokens, TokenMLP, image

UNTIL_SITES = PIPELINE[: [p.name for p in PIPELINE].index("attention_sites") + 1]


def sites_of(model, frontend="fx"):
    return analyze(model.eval(), image(), frontend=frontend, passes=UNTIL_SITES).sites


def test_explicit_and_fused_attention_give_the_same_record():
    for fused in (False, True):
        for frontend in ("fx", "export"):
            (site,) = sites_of(Attention(fused=fused), frontend)
            assert site.form == ("fused" if fused else "explicit")
            assert site.heads_shape == (1, 2, 16, WIDTH // 2)
            assert abs(site.scale - (WIDTH // 2) ** -0.5) < 1e-12
            assert site.bias is None and site.dense_reason == ""


class Masked(Attention):
    """Explicit attention with a constant additive mask on the logits."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.zeros(16, 16).masked_fill(torch.eye(16, dtype=torch.bool), -1.0))

    def forward(self, x):
        t = self.embed(x)
        q, k, v = self.qkv(t).reshape(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.mask
        return t + self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(1, 16, WIDTH))


def test_a_constant_logit_term_is_recorded():
    (site,) = sites_of(Masked())
    assert site.bias is not None and site.bias.kind == LogitTerm.CONSTANT and site.dense_reason == ""


class ProbabilitiesReused(Attention):
    """The attention probabilities also leave the block (an attention map output)."""

    def forward(self, x):
        t = self.embed(x)
        q, k, v = self.qkv(t).reshape(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        probs = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)
        return t + self.proj((probs @ v).transpose(1, 2).reshape(1, 16, WIDTH)), probs.mean()


def test_probabilities_used_elsewhere_keep_the_site_dense_with_the_reason():
    (site,) = sites_of(ProbabilitiesReused())
    assert "are also used outside the attention" in site.dense_reason


class TokenMixer(nn.Module):
    """A learned token-mixing matmul (MLP-Mixer): a product over tokens that is no attention."""

    def __init__(self):
        super().__init__()
        self.embed = PatchTokens()
        self.mix = nn.Parameter(torch.randn(16, 16) * 0.1)

    def forward(self, x):
        t = self.embed(x)
        return F.gelu(self.mix @ t)


def test_products_that_are_not_attention_are_not_sites():
    assert sites_of(TokenMixer()) == []
    assert sites_of(TokenMLP()) == []
