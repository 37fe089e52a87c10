"""Tests of the reference models in ``models_zoo``: presets, parameter counts, traceability
(``torch.fx.symbolic_trace`` and non-strict ``torch.export``), explicit attention vs SDPA, and
the ViTDet details (windows, padding, decomposed relative position, weight loading).

Small configurations keep every forward pass fast; full-size models are built on the meta device
for parameter counts, and only the cheap full-size forwards (224-px ViTs) are run.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from models_zoo import (
    ViTDet,
    ViTDetBackbone,
    ViViT,
    deit_tiny,
    pad_to_square,
    vit_b16,
    vit_s14_dinov2,
    vitdet,
    vitdet_b,
    vivit,
    vivit_b,
)
from models_zoo.vitdet import add_decomposed_rel_pos, rel_pos_index

ATOL = 1e-5


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(fn, *args, **kwargs):
    with torch.device("meta"):
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Parameter counts, by hand
# ---------------------------------------------------------------------------------------------

D = 768
# One pre-norm block of width 768, MLP 3072: norm1 (2D) + qkv (D*3D + 3D) + proj (D*D + D)
# + norm2 (2D) + fc1 (D*4D + 4D) + fc2 (4D*D + D).
BLOCK_768 = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)
assert BLOCK_768 == 7_087_872
PATCH16_RGB = 3 * 16 * 16 * D + D  # 16x16 RGB patch conv + bias


def vitdet_b_backbone_params(img_size: int) -> int:
    """ViTDet-B backbone: patch embed, absolute position embedding on the (img/16)^2 grid (the
    224-px pretraining table is resampled at construction, so the stored table has grid rows, no
    class slot), 12 blocks, decomposed relative position tables (2*size-1 rows of head width 64 for
    h and w): 14x14 windows in 8 blocks, the whole grid in the 4 global blocks. No final norm."""
    grid = img_size // 16
    head = D // 12
    rel_window = 2 * (2 * 14 - 1) * head
    rel_global = 2 * (2 * grid - 1) * head
    return PATCH16_RGB + grid * grid * D + 12 * BLOCK_768 + 8 * rel_window + 4 * rel_global


def simple_pyramid_params(dim: int = 768, out: int = 256) -> int:
    """Simple feature pyramid: per stage the upsampling part, then 1x1 conv (no bias) + channel LN and
    3x3 conv (no bias) + channel LN. p6 (max-pool) has no parameters."""
    tail = lambda c: c * out + 2 * out + out * out * 9 + 2 * out  # noqa: E731
    p2 = (dim * (dim // 2) * 4 + dim // 2) + dim + ((dim // 2) * (dim // 4) * 4 + dim // 4) + tail(dim // 4)
    p3 = (dim * (dim // 2) * 4 + dim // 2) + tail(dim // 2)
    p4 = tail(dim)
    p5 = tail(dim)
    return p2 + p3 + p4 + p5


def vivit_b_params(num_frames=32, img_size=224, num_classes=400) -> int:
    """ViViT-B factorised encoder: tubelet Conv3d (2x16x16x3 -> 768, bias); spatial encoder: class
    token, position embedding (1 + h*w rows), 12 blocks, final LayerNorm; temporal encoder: class
    token, position embedding (1 + T/2 rows), 4 blocks, final LayerNorm; linear head."""
    tubelet = 2 * 16 * 16 * 3 * D + D
    hw = (img_size // 16) ** 2
    t = num_frames // 2
    spatial = D + (1 + hw) * D + 12 * BLOCK_768 + 2 * D
    temporal = D + (1 + t) * D + 4 * BLOCK_768 + 2 * D
    return tubelet + spatial + temporal + D * num_classes + num_classes


def test_hand_counts_are_the_expected_numbers():
    assert vitdet_b_backbone_params(672) == 87_069_952
    assert vitdet_b_backbone_params(1024) == 88_883_456
    assert simple_pyramid_params() == 5_560_000
    assert vivit_b_params() == 115_062_928


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: vit_b16(), 86_567_656),  # ViT-B/16 with the 1000-class head: 86.57 M
        (lambda: deit_tiny(), 5_717_416),  # DeiT-Ti: 5.72 M
        (lambda: vit_s14_dinov2(img_size=518), 22_056_192),  # DINOv2 ViT-S/14, 37x37 grid: 22.06 M
        (lambda: vitdet_b(img_size=672, with_pyramid=False), vitdet_b_backbone_params(672)),
        (lambda: vitdet_b(img_size=1024, with_pyramid=False), vitdet_b_backbone_params(1024)),
        (lambda: vitdet_b(img_size=672), vitdet_b_backbone_params(672) + simple_pyramid_params()),
        (lambda: vitdet_b(img_size=1024), vitdet_b_backbone_params(1024) + simple_pyramid_params()),
        (lambda: vivit_b(), vivit_b_params()),
        (lambda: vivit_b(num_frames=32, img_size=320, num_classes=300), vivit_b_params(32, 320, 300)),
    ],
    ids=[
        "vit_b16",
        "deit_tiny",
        "vit_s14_dinov2",
        "vitdet_b_672_backbone",
        "vitdet_b_1024_backbone",
        "vitdet_b_672",
        "vitdet_b_1024",
        "vivit_b",
        "vivit_b_epic_320",
    ],
)
def test_preset_parameter_counts(build, expected):
    assert n_params(on_meta(build)) == expected


def test_presets_build_for_real():
    # the other presets are built (on the meta device) by test_preset_parameter_counts
    model = vitdet_b(img_size=672)
    assert isinstance(model, ViTDet) and isinstance(model.backbone, ViTDetBackbone)
    assert n_params(model) == vitdet_b_backbone_params(672) + simple_pyramid_params()
    assert torch.isfinite(model.backbone.pos_embed).all() and model.backbone.pos_embed.std() > 0.01
    assert isinstance(on_meta(vivit_b), ViViT)


def matmul_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of linears, matmuls and einsums (run on the meta device: no compute).
    torch's counter reports 2 FLOPs per MAC and leaves out bias adds; the patch conv is excluded."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return sum(v for k, v in counts.items() if k in ("aten.addmm", "aten.mm", "aten.bmm")) // 2


@pytest.mark.parametrize("img_size, published", [(672, 174.5), (1024, 467.4)])
def test_vitdet_b_paper_flops(img_size, published):
    # Paper convention: 1 MAC = 1 FLOP; linears, matmuls, rel-pos einsums, bias and
    # elementwise adds; not the patch conv, LayerNorm, softmax, GELU. qkv and proj run on the real
    # tokens, the attention core on the padded windows (1024 px: 64x64 grid padded to 70x70).
    with torch.device("meta"):
        model = vitdet_b(img_size=img_size, with_pyramid=False).eval()
        x = torch.empty(1, 3, img_size, img_size)
    n = (img_size // 16) ** 2
    windows = (-(-(img_size // 16) // 14)) ** 2
    adds = n * D  # absolute position embedding
    adds += 12 * n * (3 * D + D + 4 * D + D)  # biases of qkv, proj, fc1, fc2
    adds += 12 * 2 * n * D  # residual adds
    adds += 8 * 12 * windows * (14 * 14) ** 2 * 2 + 4 * 12 * n * n * 2  # two rel-pos adds per logit
    total = matmul_macs(model, x) + adds
    assert abs(total / 1e9 - published) < 0.05, total / 1e9


def test_vivit_b_epic_kitchens_flops():
    # 320 px, 32 frames, 12 views: 7.12 TFLOPs per video in the same convention (tubelet conv excluded).
    with torch.device("meta"):
        model = vivit_b(num_frames=32, img_size=320, num_classes=300).eval()
        x = torch.empty(1, 3, 32, 320, 320)
    spatial_tokens, temporal_tokens = 16 * (1 + 400), 1 + 16
    adds = (spatial_tokens * 12 + temporal_tokens * 4) * (9 * D + 2 * D)  # biases + residuals per block
    adds += (spatial_tokens + temporal_tokens) * D + 300  # position embeddings, head bias
    per_view = matmul_macs(model, x) + adds
    assert abs(per_view / 1e9 - 593.4) < 0.5, per_view / 1e9
    assert round(12 * per_view / 1e12, 2) == 7.12


@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: deit_tiny(), (1, 1000)),
        (lambda: vit_s14_dinov2(), (1, 257, 384)),
        (lambda: vit_b16(), (1, 1000)),
    ],
)
def test_full_size_vit_forward(build, shape):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == shape and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# ViTDet structure
# ---------------------------------------------------------------------------------------------


def test_vitdet_b_layout():
    for img_size, padded, pad in ((1024, (70, 70), (6, 6)), (672, (42, 42), (0, 0))):
        model = on_meta(vitdet_b, img_size=img_size)
        bb = model.backbone
        grid = img_size // 16
        assert bb.grid_size == (grid, grid)
        assert bb.window_blocks == (0, 1, 3, 4, 6, 7, 9, 10) and bb.global_blocks == (2, 5, 8, 11)
        assert bb.pos_embed.shape == (1, grid, grid, 768)
        for i, block in enumerate(bb.blocks):
            attn = block.attn
            if i in bb.window_blocks:
                assert block.window_size == 14 and attn.input_size == (14, 14)
                assert attn.padded_size == padded and attn.pad_hw == pad
                assert attn.rel_pos_h.shape == (27, 64) and attn.rel_pos_w.shape == (27, 64)
                assert attn.rel_pos_index_h.shape == (14, 14)
            else:
                assert block.window_size == 0 and attn.input_size == (grid, grid)
                assert attn.rel_pos_h.shape == (2 * grid - 1, 64)
        names = dict(model.named_parameters())
        for key in (
            "backbone.blocks.0.norm1.weight",
            "backbone.blocks.0.attn.qkv.weight",
            "backbone.blocks.0.attn.proj.bias",
            "backbone.blocks.0.norm2.bias",
            "backbone.blocks.11.mlp.fc1.weight",
            "backbone.blocks.11.mlp.fc2.weight",
            "backbone.blocks.2.attn.rel_pos_h",
            "backbone.patch_embed.proj.weight",
            "pyramid.simfp_2.0.weight",
            "pyramid.simfp_2.5.norm.weight",
            "pyramid.simfp_5.2.conv.weight",
        ):
            assert key in names, key
    # buffers (index tables, padding masks) are not part of the state dict
    assert not any("index" in k or "mask" in k for k in model.state_dict())


def small_vitdet(**kw):
    cfg = dict(
        img_size=224, embed_dim=32, depth=3, num_heads=2, window_size=4, global_blocks=(1,), out_channels=16
    )
    cfg.update(kw)
    return vitdet(**cfg)


def test_rel_pos_index_matches_offsets():
    idx = rel_pos_index(5, 5)
    i, j = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    assert torch.equal(idx, i - j + 4)


def test_add_decomposed_rel_pos_brute_force():
    torch.manual_seed(0)
    h, w, d, bh = 3, 4, 5, 2
    q = torch.randn(bh, h * w, d)
    attn = torch.randn(bh, h * w, h * w)
    table_h, table_w = torch.randn(2 * h - 1, d), torch.randn(2 * w - 1, d)
    out = add_decomposed_rel_pos(
        attn, q, table_h[rel_pos_index(h, h)], table_w[rel_pos_index(w, w)], (h, w), (h, w)
    )
    ref = attn.clone()
    for b in range(bh):
        for qi in range(h * w):
            for ki in range(h * w):
                (qy, qx), (ky, kx) = divmod(qi, w), divmod(ki, w)
                ref[b, qi, ki] += q[b, qi] @ table_h[qy - ky + h - 1] + q[b, qi] @ table_w[qx - kx + w - 1]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def detectron2_backbone_reference(bb: ViTDetBackbone, x: torch.Tensor) -> torch.Tensor:
    """detectron2's ViT forward written out literally with ``bb``'s weights: zero-pad the normalised
    tokens before qkv, qkv/attention/proj per window (on the padded windows), unpartition, crop."""
    x = bb.patch_embed(x) + bb.pos_embed
    for blk in bb.blocks:
        attn = blk.attn
        shortcut = x
        x = blk.norm1(x)
        H, W = x.shape[1], x.shape[2]
        ws = blk.window_size
        if ws > 0:
            ph, pw = (ws - H % ws) % ws, (ws - W % ws) % ws
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
            Hp, Wp = H + ph, W + pw
            x = x.view(x.shape[0], Hp // ws, ws, Wp // ws, ws, -1).permute(0, 1, 3, 2, 4, 5)
            x = x.reshape(-1, ws, ws, x.shape[-1])
        B, h, w, C = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(B, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * heads, h * w, -1).unbind(0)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        idx_h = torch.arange(h)[:, None] - torch.arange(h)[None, :] + h - 1
        idx_w = torch.arange(w)[:, None] - torch.arange(w)[None, :] + w - 1
        r_q = q.reshape(B * heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, attn.rel_pos_h[idx_h])
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, attn.rel_pos_w[idx_w])
        logits = (
            logits.view(B * heads, h, w, h, w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
        ).view(B * heads, h * w, h * w)
        y = (logits.softmax(-1) @ v).view(B, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(B, h, w, -1)
        y = attn.proj(y)
        if ws > 0:
            y = y.view(-1, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)
            y = y[:, :H, :W, :]
        x = shortcut + y
        x = x + blk.mlp(blk.norm2(x))
    return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("window_size", [4, 7])  # 14x14 grid: padded to 16 (4) / no padding (7)
def test_vitdet_matches_detectron2_order(window_size):
    torch.manual_seed(0)
    bb = small_vitdet(window_size=window_size, with_pyramid=False).eval()
    for p in bb.parameters():  # non-trivial biases, so that the padded tokens matter
        torch.nn.init.normal_(p, std=0.2) if p.dim() == 1 else None
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), detectron2_backbone_reference(bb, x), atol=ATOL, rtol=1e-4)


def test_vitdet_pyramid_shapes():
    torch.manual_seed(0)
    model = small_vitdet().eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        last = model.backbone(x)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    assert last.shape == (1, 32, 14, 14)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p2": (1, 16, 56, 56),
        "p3": (1, 16, 28, 28),
        "p4": (1, 16, 14, 14),
        "p5": (1, 16, 7, 7),
        "p6": (1, 16, 4, 4),
    }
    torch.testing.assert_close(out["p6"], out["p5"][:, :, ::2, ::2])


# ---------------------------------------------------------------------------------------------
# Traceability and SDPA
# ---------------------------------------------------------------------------------------------


def assert_outputs_close(a, b):
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


CASES = {
    "vitdet_pad": (lambda sdpa: small_vitdet(use_sdpa=sdpa), (2, 3, 224, 224)),
    "vitdet_nopad": (lambda sdpa: small_vitdet(window_size=7, use_sdpa=sdpa), (1, 3, 224, 224)),
    "vitdet_backbone": (lambda sdpa: small_vitdet(use_sdpa=sdpa, with_pyramid=False), (1, 3, 224, 224)),
    "vitdet_b_small": (
        lambda sdpa: vitdet_b(
            img_size=224,
            embed_dim=48,
            depth=4,
            num_heads=3,
            global_blocks=(3,),
            out_channels=16,
            use_sdpa=sdpa,
        ),
        (1, 3, 224, 224),
    ),
    "vivit": (
        lambda sdpa: vivit_b(
            num_frames=4,
            img_size=64,
            num_classes=10,
            embed_dim=32,
            num_heads=2,
            spatial_depth=2,
            temporal_depth=2,
            use_sdpa=sdpa,
        ),
        (2, 3, 4, 64, 64),
    ),
}


@pytest.mark.parametrize("sdpa", [False, True], ids=["explicit", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_fx_and_export_match_eager(case, sdpa):
    build, shape = CASES[case]
    torch.manual_seed(0)
    model = build(sdpa).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
        gm = torch.fx.symbolic_trace(model)
        assert_outputs_close(gm(x), ref)
    ep = torch.export.export(model, (x,), strict=False)
    with torch.no_grad():
        assert_outputs_close(ep.module()(x), ref)
    ops = {str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    if sdpa:
        assert any("scaled_dot_product_attention" in o for o in ops)
    else:
        assert "softmax" in ops and not any("scaled_dot_product_attention" in o for o in ops)


@pytest.mark.parametrize("case", list(CASES))
def test_explicit_and_sdpa_attention_agree(case):
    build, shape = CASES[case]
    torch.manual_seed(0)
    explicit = build(False).eval()
    sdpa = build(True).eval()
    sdpa.load_state_dict(explicit.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        assert_outputs_close(sdpa(x), explicit(x))


def test_vitdet_traced_graph_names():
    gm = torch.fx.symbolic_trace(small_vitdet(with_pyramid=False))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for name in (
        "blocks.0.norm1",
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.norm2",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.attn.qkv",
    ):
        assert name in targets, name
    fns = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert fns.count(F.pad) == 2  # the two windowed blocks pad, the global one does not
    assert fns.count(torch.einsum) == 6  # two rel-pos einsums per block


def test_vivit_structure_and_batch_independence():
    torch.manual_seed(0)
    model = vivit(
        num_frames=4,
        img_size=64,
        num_classes=10,
        embed_dim=32,
        num_heads=2,
        spatial_depth=2,
        temporal_depth=1,
    ).eval()
    names = dict(model.named_parameters())
    for key in (
        "patch_embed.proj.weight",
        "spatial.cls_token",
        "spatial.pos_embed",
        "spatial.blocks.1.attn.qkv.weight",
        "spatial.blocks.0.mlp.fc2.bias",
        "temporal.cls_token",
        "temporal.pos_embed",
        "temporal.blocks.0.norm1.weight",
        "head.weight",
    ):
        assert key in names, key
    assert model.spatial.pos_embed.shape == (1, 1 + 16, 32)
    assert model.temporal.pos_embed.shape == (1, 1 + 2, 32)
    x = torch.randn(3, 3, 4, 64, 64)
    with torch.no_grad():
        full = model(x)
        one = model(x[1:2])
    torch.testing.assert_close(full[1:2], one, atol=ATOL, rtol=0)
    assert model.forward_features(x).shape == (3, 3, 32)


# ---------------------------------------------------------------------------------------------
# Preprocessing, loading, argument checks
# ---------------------------------------------------------------------------------------------


def test_pad_to_square():
    img = torch.rand(3, 100, 50) + 1.0  # strictly positive, so the padding is visible
    out = pad_to_square(img, 64)
    assert out.shape == (3, 64, 64)
    assert (out[:, :, 32:] == 0).all() and (out[:, :, :32] > 0).all()
    batch = pad_to_square(torch.rand(2, 3, 30, 60) + 1.0, 60)  # no resize needed
    assert batch.shape == (2, 3, 60, 60) and (batch[:, :, 30:] == 0).all() and (batch[:, :, :30] > 0).all()
    with pytest.raises(ValueError, match="size"):
        pad_to_square(img, 0)
    with pytest.raises(ValueError, match="float"):
        pad_to_square(torch.zeros(3, 8, 8, dtype=torch.uint8), 8)


def test_vitdet_load_detectron2_checkpoint():
    torch.manual_seed(0)
    src = small_vitdet(img_size=256)  # 16x16 grid: other pos-embed grid and global rel-pos length
    dst = small_vitdet(img_size=224)
    sd = {}
    for k, v in src.backbone.state_dict().items():
        sd["backbone.net." + k] = v
    pretrain = torch.randn(1, 1 + 14 * 14, 32)  # detectron2/MAE layout with the class slot
    sd["backbone.net.pos_embed"] = pretrain
    for k, v in src.pyramid.state_dict().items():
        sd["backbone." + k.replace(".conv.", ".")] = v  # detectron2's Conv2d(norm=...) naming
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(2, 2)
    missing, unexpected = dst.load_pretrained(sd)
    assert missing == [] and unexpected == ["roi_heads.box_predictor.cls_score.weight"]
    torch.testing.assert_close(dst.backbone.pos_embed, pretrain[:, 1:].reshape(1, 14, 14, 32))  # same grid
    torch.testing.assert_close(dst.backbone.blocks[0].attn.qkv.weight, src.backbone.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(dst.backbone.blocks[0].attn.rel_pos_h, src.backbone.blocks[0].attn.rel_pos_h)
    assert dst.backbone.blocks[1].attn.rel_pos_h.shape == (27, 16)  # global: 31 rows resampled to 27
    torch.testing.assert_close(dst.pyramid.simfp_2[4].conv.weight, src.pyramid.simfp_2[4].conv.weight)
    torch.testing.assert_close(dst.pyramid.simfp_5[2].norm.bias, src.pyramid.simfp_5[2].norm.bias)
    # the 224-px table goes to the 16x16 grid of a 256-px model by bicubic resampling
    src.backbone.load_pretrained_pos_embed(pretrain)
    ref = F.interpolate(
        pretrain[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2),
        size=(16, 16),
        mode="bicubic",
        align_corners=False,
    ).permute(0, 2, 3, 1)
    torch.testing.assert_close(src.backbone.pos_embed, ref)


def test_vitdet_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = small_vitdet().eval(), small_vitdet().eval()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_outputs_close(a(x), b(x))


def test_wrong_input_size_raises():
    model = small_vitdet()
    with pytest.raises(ValueError, match="pad_to_square"):
        model(torch.randn(1, 3, 160, 224))
    with pytest.raises(ValueError, match="img_size"):
        model.backbone(torch.randn(1, 3, 192, 192))
    v = vivit(
        num_frames=4, img_size=32, num_classes=3, embed_dim=16, num_heads=2, spatial_depth=1, temporal_depth=1
    )
    with pytest.raises(ValueError, match="num_frames=4"):
        v(torch.randn(1, 3, 6, 32, 32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=200), "img_size"),
        (dict(global_blocks=(5,)), "global_blocks"),
        (dict(global_blocks=(1, 1)), "global_blocks"),
        (dict(num_heads=3), "num_heads"),
        (dict(window_size=-1), "window_size"),
        (dict(depth=0), "depth"),
        (dict(scale_factors=(3.0,)), "scale_factors"),
    ],
)
def test_vitdet_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_vitdet(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_frames=5), "num_frames"),
        (dict(img_size=60), "img_size"),
        (dict(tubelet=(2, 16)), "tubelet"),
        (dict(num_heads=5), "num_heads"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_vivit_bad_arguments(kwargs, match):
    cfg = dict(
        num_frames=4,
        img_size=64,
        num_classes=10,
        embed_dim=32,
        num_heads=2,
        spatial_depth=1,
        temporal_depth=1,
    )
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=match):
        vivit(**cfg)
