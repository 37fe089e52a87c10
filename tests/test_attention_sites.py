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


class LayeredTerms(Attention):
    """Two constant logit terms entered at different points of the chain, as timm's shifted
    windows do: a bias, then the scale (which scales the bias too), then a mask added in a
    five-dim view of the logits, then the view back."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, 2, 16, 16))
        self.register_buffer(
            "mask", torch.zeros(1, 1, 1, 16, 16).masked_fill(torch.rand(16, 16) > 0.7, -100.0)
        )

    def forward(self, x):
        t = self.embed(x)
        q, k, v = self.qkv(t).reshape(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) + self.bias) * self.scale
        attn = (attn.view(1, 1, 2, 16, 16) + self.mask).view(1, 2, 16, 16)
        return t + self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(1, 16, WIDTH))


def test_constant_terms_through_views_and_scales_are_one_constant_term():
    import evtrace
    from tests.models import real_frames
    from tests.reference import ReferenceStream, relative_error

    model = LayeredTerms().eval()
    (site,) = sites_of(model)
    assert site.bias.kind == LogitTerm.CONSTANT and len(site.bias.recipe) == 2 and site.dense_reason == ""
    frames = real_frames(16, 4, patch_size=4)
    full = evtrace.transform(model, frames[0], policy=evtrace.All())
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(4))
    assert [m.site_name for m in emodel.attention_modules().values()] == [site.name]
    sim = ReferenceStream(model, frames[0], evtrace.TopK(4))
    with torch.no_grad():
        assert max(relative_error(full(f), model(f)) for f in frames) <= 1e-5
        assert max(relative_error(emodel(f), sim(f)) for f in frames) <= 1e-5
        emodel.reset()
        assert max(relative_error(emodel(f), model(f)) for f in frames) > 1e-3  # really partial


class SoftCapped(Attention):
    """Logits soft-capped by tanh before the softmax (a non-linear function of the logits)."""

    def forward(self, x):
        t = self.embed(x)
        q, k, v = self.qkv(t).reshape(1, 16, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.tanh((q * self.scale) @ k.transpose(-2, -1) / 5.0) * 5.0
        return t + self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(1, 16, WIDTH))


def test_a_non_linear_logit_function_is_no_site_and_says_why():
    from evtrace.graph.meta import SITE_MISSES

    ctx = analyze(SoftCapped().eval(), image(), frontend="fx", passes=UNTIL_SITES)
    assert ctx.sites == []
    (miss,) = ctx.get(SITE_MISSES)
    assert miss.pattern == "explicit" and "the elementwise function 'tanh'" in miss.reason


def test_inspect_explains_every_pairwise_matmul(monkeypatch):
    import evtrace

    text = str(evtrace.inspect(SoftCapped().eval(), image(), frontend="fx", explain=True))
    line = "matmul (-): not a site: pattern 'explicit' failed: the elementwise function 'tanh'"
    assert f"attention matches: \n  {line}" in text
    found = str(evtrace.inspect(Attention().eval(), image(), frontend="fx", explain=True))
    assert "site, pattern 'explicit', exact" in found
    assert "attention matches" not in str(evtrace.inspect(SoftCapped().eval(), image(), frontend="fx"))
    monkeypatch.setenv("EVTRACE_EXPLAIN", "1")
    assert "'tanh'" in str(evtrace.inspect(SoftCapped().eval(), image(), frontend="fx"))
