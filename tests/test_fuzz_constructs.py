"""Random compositions of the constructs users' ViTs are made of (hypothesis).

Each drawn model is either gated and exact (a full update equals the original; attention
delta-updated) or dense with a reason in the report, never silently wrong: fused or explicit
attention, q/k norms, layer scale, register tokens, rotary position embedding, SwiGLU, a token
shuffle by a constant index (MAE with fixed noise), and dynamic token selection (an index
computed from the frame), which must stay dense and say so.
"""

import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import evtrace
from models_zoo.timm_style import TimmStyleViT

SIZE, PATCH = 32, 8


class Shuffled(nn.Module):
    """Tokens permuted by a fixed index before the blocks (MAE's shuffle with fixed noise)."""

    def __init__(self, vit: TimmStyleViT):
        super().__init__()
        self.vit = vit
        tokens = (SIZE // PATCH) ** 2
        self.register_buffer("order", torch.randperm(tokens, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        vit = self.vit
        t = vit.patch_embed(x).flatten(2).transpose(1, 2) + vit.pos_embed
        t = torch.gather(t, 1, self.order[None, :, None].expand(t.shape[0], -1, t.shape[2]))
        t = torch.cat([vit.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        for block in vit.blocks:
            t = block(t)
        return vit.norm(t)


class DynamicDrop(nn.Module):
    """Keeps the tokens with the largest norm this frame (data-dependent token selection)."""

    def __init__(self, vit: TimmStyleViT, keep: int):
        super().__init__()
        self.vit = vit
        self.keep = keep

    def forward(self, x):
        vit = self.vit
        t = vit.patch_embed(x).flatten(2).transpose(1, 2) + vit.pos_embed
        index = t.norm(dim=-1).topk(self.keep, dim=1).indices
        t = torch.gather(t, 1, index[..., None].expand(-1, -1, t.shape[2]))
        for block in vit.blocks:
            t = block(t)
        return vit.norm(t)


@st.composite
def models(draw):
    rope = draw(st.booleans())
    vit = TimmStyleViT(
        img_size=SIZE,
        patch_size=PATCH,
        embed_dim=32,
        depth=draw(st.integers(1, 2)),
        num_heads=2,
        reg_tokens=0 if rope else draw(st.integers(0, 2)),
        init_values=draw(st.sampled_from([None, 1e-3])),
        qk_norm=draw(st.booleans()),
        fused_attn=draw(st.booleans()),
        rope=rope,
        swiglu=draw(st.booleans()),
    )
    wrapper = draw(st.sampled_from(["plain", "plain", "shuffled", "dynamic"]))
    if wrapper == "shuffled" and not rope:
        return Shuffled(vit).eval(), "gated"
    if wrapper == "dynamic" and not rope:
        return DynamicDrop(vit, keep=draw(st.integers(4, 15))).eval(), "dense"
    return vit.eval(), "gated"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), st.integers(0, 2**16))
def test_every_composition_is_exact_or_dense_with_a_reason(drawn, seed):
    model, expect = drawn
    generator = torch.Generator().manual_seed(seed)
    frames = [torch.randn(1, 3, SIZE, SIZE, generator=generator)]
    for _ in range(2):
        frames.append(frames[-1] + 0.3 * torch.randn(1, 3, SIZE, SIZE, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = evtrace.transform(model, frames[0], policy=evtrace.All())
    report = full.report()
    with torch.no_grad():
        for x in frames:
            got, want = full(x), model(x)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    if expect == "gated":
        assert report.sites and all(s.mode == "exact" for s in report.sites), [s.reason for s in report.sites]
        assert all(r.gated for r in report.regions if r.linears)
    else:
        assert not any(s.mode == "exact" for s in report.sites)
        assert any("dynamic token selection" in f.reason for f in report.fallbacks), report.fallbacks
