"""ViTDet-B (Li, Mao, Girshick, He 2022): the plain-ViT detection backbone as in detectron2.

Layout and naming follow ``detectron2/modeling/backbone/vit.py``:

* tokens stay in a (B, H, W, C) grid from the patch embedding to the last block;
* blocks listed in ``global_blocks`` attend over the whole grid, every other block attends inside
  non-overlapping ``window_size`` x ``window_size`` windows (the grid is padded to a multiple
  of the window size first, and cropped back afterwards). detectron2 zero-pads the normalised
  input of ``qkv``; here ``qkv`` runs on the real tokens and its output is padded with
  ``qkv(0) = qkv.bias``, which is the same computation (see :class:`RelPosAttention`);
* every block adds decomposed relative position terms to its attention logits;
* no class token and no final norm; the absolute position embedding is trained on a 224-px grid
  (detectron2 stores 1 + 14*14 rows with an unused class slot) and resampled to this model's grid.

Everything that depends on the image size (grid, padding, index tables of the relative position
tables) is a Python int or a registered buffer computed at construction, so ``forward`` has no
control flow on shapes: ``torch.fx.symbolic_trace`` and ``torch.export.export(..., strict=False)``
both capture it. The batch dimension is left free (reshapes use -1 for it).

``ViTDet`` adds the simple feature pyramid (deconvolutions / identity / max-pool, each followed
by 1x1 and 3x3 convolutions with channel LayerNorm) and the p6 max-pool top block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Mlp, resample_pos_embed

__all__ = [
    "ViTDet",
    "ViTDetBackbone",
    "ViTDetBlock",
    "RelPosAttention",
    "SimpleFeaturePyramid",
    "LayerNorm2d",
    "add_decomposed_rel_pos",
    "rel_pos_index",
    "resize_rel_pos",
    "pad_grid",
    "padding_mask",
    "window_partition",
    "window_unpartition",
    "pad_to_square",
    "vitdet",
    "vitdet_b",
]


# --------------------------------------------------------------------------------------------
# Relative position helpers
# --------------------------------------------------------------------------------------------


def rel_pos_index(q_size: int, k_size: int) -> torch.Tensor:
    """Index table (q_size, k_size) into a (2 * max(q_size, k_size) - 1, d) relative position table.

    Entry (i, j) is the row holding the embedding of the offset between query i and key j, as in
    detectron2's ``get_rel_pos`` (coordinates scaled when query and key sizes differ).
    """
    if q_size < 1 or k_size < 1:
        raise ValueError(f"q_size={q_size} and k_size={k_size} must both be >= 1")
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return relative.long()


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly resample a (L, d) relative position table to (length, d), as detectron2 does when a
    checkpoint was trained on another grid. Returns the input unchanged when L == length."""
    if rel_pos.dim() != 2:
        raise ValueError(f"rel_pos must be a (L, d) table, got shape {tuple(rel_pos.shape)}")
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.float().t()[None], size=length, mode="linear")
    return resized[0].t().to(rel_pos.dtype)


def add_decomposed_rel_pos(
    attn: torch.Tensor,
    q: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """Add decomposed relative position terms to attention logits (detectron2 / MViTv2).

    attn: (B*heads, qh*qw, kh*kw) logits; q: (B*heads, qh*qw, d) *unscaled* queries;
    rel_h: (qh, kh, d) and rel_w: (qw, kw, d) gathered relative position embeddings.
    Returns new logits of the same shape as ``attn`` (``attn`` itself is left as it is).
    """
    term_h, term_w = decomposed_rel_pos_terms(q, rel_h, rel_w, q_size, k_size)
    (qh, qw), (kh, kw) = q_size, k_size
    return (attn.view(-1, qh, qw, kh, kw) + term_h + term_w).view(-1, qh * qw, kh * kw)


def decomposed_rel_pos_terms(
    q: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of the decomposed relative position term, shaped to broadcast over the
    (B*heads, qh, qw, kh, kw) logits: ``term_h`` (B*heads, qh, qw, kh, 1) and ``term_w``
    (B*heads, qh, qw, 1, kw); their sum is :func:`decomposed_rel_pos_bias`.

    The einsums contract the unscaled queries, reshaped to (B*heads, qh, qw, d), against the
    (q, k, d) tables. Their outputs come out of ``bmm`` with the table's query axis outermost;
    flattening the query grid (a reshape, which copies these small tensors) makes them
    contiguous, so the broadcast adds on the N x N logits read them in order.
    """
    (qh, qw), (kh, kw) = q_size, k_size
    r_q = q.reshape(-1, qh, qw, q.shape[-1])
    term_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h).reshape(-1, qh * qw, kh)
    term_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w).reshape(-1, qh * qw, kw)
    return term_h.view(-1, qh, qw, kh, 1), term_w.view(-1, qh, qw, 1, kw)


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """The additive term of :func:`add_decomposed_rel_pos` alone, shaped (B*heads, qh, qw, kh, kw)
    and contiguous: ``term_h + term_w`` of :func:`decomposed_rel_pos_terms`, broadcast over (kh, kw).
    ``q`` may be (B*heads, qh*qw, d) or (B, heads, qh*qw, d)."""
    term_h, term_w = decomposed_rel_pos_terms(q, rel_h, rel_w, q_size, k_size)
    return term_h + term_w


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def pad_grid(
    x: torch.Tensor, pad_hw: tuple[int, int], fill: torch.Tensor, pad_mask: torch.Tensor
) -> torch.Tensor:
    """Pad a (B, H, W, C) grid at the bottom/right by ``pad_hw`` = (pad_h, pad_w) rows/columns whose
    value is the vector ``fill`` (C,).

    ``F.pad`` pads with zeros, then ``torch.where`` puts ``fill`` into the padded positions
    (``pad_mask``: (H + pad_h, W + pad_w, 1) bool, True on padding). Both are called even when the
    pad is zero (:class:`RelPosAttention` does not call this then). The pads are static ints.
    """
    pad_h, pad_w = pad_hw
    return torch.where(pad_mask, fill, F.pad(x, (0, 0, 0, pad_w, 0, pad_h)))


def padding_mask(grid_size: tuple[int, int], pad_hw: tuple[int, int]) -> torch.Tensor:
    """(H + pad_h, W + pad_w, 1) bool mask, True on the rows/columns :func:`pad_grid` adds."""
    (H, W), (pad_h, pad_w) = grid_size, pad_hw
    mask = torch.ones(H + pad_h, W + pad_w, 1, dtype=torch.bool)
    mask[:H, :W] = False
    return mask


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, Hp, Wp, C) grid (Hp, Wp multiples of ``window_size``) -> (B * nH * nW, ws, ws, C) windows,
    windows in row-major order per image (detectron2's layout)."""
    _, Hp, Wp, C = x.shape
    x = x.view(-1, Hp // window_size, window_size, Wp // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: windows -> (B, Hp, Wp, C) grid, cropped to (B, H, W, C).
    The crop is applied even when nothing was padded."""
    Hp, Wp = padded_hw
    H, W = hw
    C = windows.shape[-1]
    x = windows.view(-1, Hp // window_size, Wp // window_size, window_size, window_size, C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, Hp, Wp, C)
    return x[:, :H, :W, :]


# --------------------------------------------------------------------------------------------
# Attention and blocks
# --------------------------------------------------------------------------------------------


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token grid, global or windowed, with
    decomposed relative position.

    ``grid_size`` = (H, W) is the static grid. With ``window_size > 0`` attention runs inside
    non-overlapping ws x ws windows: the grid is padded at the bottom/right to a multiple of ws
    (pads fixed at construction), partitioned, attended, unpartitioned and cropped.

    The qkv and output projections are token-wise, so they run on the H x W real tokens only; the
    padding is applied to the qkv output with the value ``qkv(0) = qkv.bias``, which is exactly
    what detectron2 computes by zero-padding the normalised input before ``qkv`` (and cropping
    before ``proj`` equals cropping after it). This keeps the counted cost equal to the paper's
    (467.4 GFLOPs at 1024 px) and lets token-wise passes see every linear on the real grid.

    ``rel_pos_h`` / ``rel_pos_w`` are (2h-1, d) and (2w-1, d) tables for the attended size (h, w)
    (the window, or the grid for a global layer); the (h, h) and (w, w) index tables that gather
    them are non-persistent buffers. Explicit path: ``attn = (q * scale) @ k^T``, plus the
    rel-pos terms (from the unscaled q), softmax, ``@ v``. With ``use_sdpa=True`` the rel-pos
    terms are passed to ``F.scaled_dot_product_attention`` as an additive ``attn_mask``.

    Speed (CPU): the two rel-pos factors are made contiguous and, in eager mode, added in place
    on the fresh logits, so the explicit path holds one N x N tensor besides the probabilities
    (the paper's implementation does the same). The SDPA path hands (B', heads, n, d) views of
    the qkv output to the fused kernel, which never writes the logits: it is the faster one,
    most of all in the global blocks (1.4x per global block of ViTDet-B at 1024 px, measured
    with ``bench/vitdet_dense.py``; docs/speed.md). A grid that fills whole windows (672 px) is
    partitioned without the padding pass.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        window_size: int = 0,
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
        rel_pos_zero_init: bool = False,
        use_sdpa: bool = False,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"embed_dim={dim} must be a positive multiple of num_heads={num_heads}")
        if not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size={window_size!r} must be an int >= 0 (0 means global attention)")
        H, W = int(grid_size[0]), int(grid_size[1])
        if H < 1 or W < 1:
            raise ValueError(f"grid_size={grid_size} must be positive")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.grid_size = (H, W)
        self.window_size = window_size
        if window_size > 0:
            self.pad_hw = ((-H) % window_size, (-W) % window_size)
            self.padded_size = (H + self.pad_hw[0], W + self.pad_hw[1])
            self.input_size = (window_size, window_size)
        else:
            self.pad_hw = (0, 0)
            self.padded_size = (H, W)
            self.input_size = (H, W)
        self.use_rel_pos = use_rel_pos
        self.use_sdpa = use_sdpa
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if window_size > 0:
            self.register_buffer("pad_mask", padding_mask(self.grid_size, self.pad_hw), persistent=False)
            if not qkv_bias:
                self.register_buffer("pad_fill", torch.zeros(dim * 3), persistent=False)
        h, w = self.input_size
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * h - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * w - 1, self.head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)
            self.register_buffer("rel_pos_index_h", rel_pos_index(h, h), persistent=False)
            self.register_buffer("rel_pos_index_w", rel_pos_index(w, w), persistent=False)

    @property
    def num_windows(self) -> int:
        """Windows per image (1 for a global layer)."""
        return (self.padded_size[0] // self.input_size[0]) * (self.padded_size[1] // self.input_size[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) grid -> (B, H, W, C) grid."""
        qkv = self.qkv(x)  # (B, H, W, 3C), real tokens only
        if self.window_size > 0:  # static, fixed at construction
            if any(self.pad_hw):  # static too: a grid that fills whole windows is not copied twice
                fill = self.qkv.bias if self.qkv.bias is not None else self.pad_fill
                qkv = pad_grid(qkv, self.pad_hw, fill, self.pad_mask)
            qkv = window_partition(qkv, self.window_size)  # (B * windows, ws, ws, 3C)
        x = self.attend(qkv)  # (B', h, w, C)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, self.padded_size, self.grid_size)
        return self.proj(x)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention core on (B', h, w, 3C) projected tokens -> (B', h, w, C), before ``proj``."""
        h, w = self.input_size
        n = h * w
        heads, d = self.num_heads, self.head_dim
        qkv = qkv.reshape(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4)  # (3, B', heads, n, d), a view
        if self.use_rel_pos:
            rel_h = self.rel_pos_h[self.rel_pos_index_h]
            rel_w = self.rel_pos_w[self.rel_pos_index_w]
        if self.use_sdpa:
            # (B', heads, n, d) strided views: the fused CPU kernel reads them in place, takes a
            # contiguous (B', heads, n, n) mask, and writes its output in (B', n, heads, d) memory
            # order, which the head merge below then reads without a copy.
            q, k, v = qkv.unbind(0)
            mask = None
            if self.use_rel_pos:
                mask = decomposed_rel_pos_bias(q, rel_h, rel_w, (h, w), (h, w)).view(-1, heads, n, n)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            q, k, v = qkv.reshape(3, -1, n, d).unbind(0)  # each (B' * heads, n, d), contiguous
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if self.use_rel_pos:
                term_h, term_w = decomposed_rel_pos_terms(q, rel_h, rel_w, (h, w), (h, w))
                logits = attn.view(-1, h, w, h, w)
                if torch.compiler.is_exporting():
                    logits = logits + term_h + term_w  # an export graph keeps in-place ops: stay functional
                else:
                    # in place on the fresh logits: no other N x N temporary (fx's symbolic trace
                    # records these as two out-of-place adds, as in the export branch)
                    logits += term_h
                    logits += term_w
                attn = logits.view(-1, n, n)
            attn = attn.softmax(dim=-1)
            x = attn @ v
        return x.view(-1, heads, h, w, d).permute(0, 2, 3, 1, 4).reshape(-1, h, w, self.dim)


class ViTDetBlock(nn.Module):
    """Pre-norm block on a (B, H, W, C) grid: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``window_size > 0`` makes the attention windowed (see :class:`RelPosAttention`), 0 global.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: tuple[int, int],
        window_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        use_rel_pos: bool = True,
        rel_pos_zero_init: bool = False,
        use_sdpa: bool = False,
    ):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = RelPosAttention(
            dim,
            num_heads,
            grid_size,
            window_size,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            use_sdpa=use_sdpa,
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDetPatchEmbed(nn.Module):
    """Image (B, C, H, W) -> token grid (B, H/p, W/p, D) by a stride-p convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def _check_image_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: reject an image that is not (B, in_chans, img_size, img_size).

    Runs in eager mode (and in non-strict ``torch.export``, where shapes are ints); symbolic
    tracing does not run hooks, so the traced graph itself carries no shape checks.
    """
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return
    expected = (module.in_chans, module.img_size, module.img_size)
    if x.dim() != 4 or tuple(int(s) for s in x.shape[1:]) != expected:
        raise ValueError(
            f"{type(module).__name__} was built for images of shape (B, {expected[0]}, {expected[1]}, "
            f"{expected[2]}) and got {tuple(x.shape)}; resize and pad the image with "
            f"models_zoo.vitdet.pad_to_square(image, {module.img_size}) or build the model with "
            f"img_size={x.shape[-1] if x.dim() == 4 else '...'}"
        )


class ViTDetBackbone(nn.Module):
    """The ViTDet plain-ViT backbone (detectron2's ``ViT``): image -> (B, D, H/p, W/p) feature map.

    Arguments mirror detectron2's ``ViT``; ``global_blocks`` lists the blocks with global
    attention, every other block uses ``window_size`` windows (``window_size=0`` makes all blocks
    global). The position embedding parameter ``pos_embed`` has shape (1, H/p, W/p, D) for this
    model's grid; it is initialised by resampling a ``pretrain_img_size`` embedding and
    :meth:`load_pretrained_pos_embed` / :meth:`load_pretrained` resample checkpoints the same way.
    Relative position tables are 0-initialised in detectron2 (``rel_pos_zero_init=True``); here they
    default to small random values so that random-weight models exercise that path.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        window_size: int = 14,
        global_blocks: Iterable[int] = (2, 5, 8, 11),
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        rel_pos_zero_init: bool = False,
        pretrain_img_size: int = 224,
        use_sdpa: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("img_size", img_size),
            ("patch_size", patch_size),
            ("in_chans", in_chans),
            ("embed_dim", embed_dim),
            ("depth", depth),
            ("num_heads", num_heads),
            ("pretrain_img_size", pretrain_img_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size={window_size!r} must be an int >= 0 (0: all blocks global)")
        if img_size % patch_size:
            raise ValueError(
                f"img_size={img_size} is not divisible by patch_size={patch_size}; pick a multiple of "
                f"{patch_size} (pad_to_square pads images to it)"
            )
        if pretrain_img_size % patch_size:
            raise ValueError(
                f"pretrain_img_size={pretrain_img_size} is not divisible by patch_size={patch_size}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        global_blocks = tuple(int(i) for i in global_blocks)
        bad = [i for i in global_blocks if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_blocks={global_blocks} has indices {bad} outside range(depth={depth})")
        if len(set(global_blocks)) != len(global_blocks):
            raise ValueError(f"global_blocks={global_blocks} lists a block twice")

        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.pretrain_grid = (pretrain_img_size // patch_size, pretrain_img_size // patch_size)
        self.window_size = window_size
        self.global_blocks = tuple(sorted(global_blocks)) if window_size > 0 else tuple(range(depth))
        self.window_blocks = tuple(i for i in range(depth) if i not in self.global_blocks)

        self.patch_embed = ViTDetPatchEmbed(patch_size, in_chans, embed_dim)
        if use_abs_pos:
            pretrain = torch.zeros(1, 1 + self.pretrain_grid[0] * self.pretrain_grid[1], embed_dim)
            nn.init.trunc_normal_(pretrain, std=0.02)
            self.pos_embed = nn.Parameter(torch.zeros(1, *self.grid_size, embed_dim))
            self.load_pretrained_pos_embed(pretrain)
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList(
            ViTDetBlock(
                embed_dim,
                num_heads,
                self.grid_size,
                window_size=window_size if i in self.window_blocks else 0,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_eps=norm_eps,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                use_sdpa=use_sdpa,
            )
            for i in range(depth)
        )
        self.register_forward_pre_hook(_check_image_hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, img_size, img_size) image -> (B, embed_dim, H/p, W/p) last feature map."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)

    @torch.no_grad()
    def load_pretrained_pos_embed(self, pos_embed: torch.Tensor) -> None:
        """Copy an absolute position embedding trained on another grid into ``pos_embed``.

        Accepts detectron2/MAE layout (1, 1 + h*w, D) with a class slot (dropped), (1, h*w, D)
        without one, or a (1, h, w, D) grid; resamples bicubically (align_corners=False) as
        detectron2's ``get_abs_pos`` does.
        """
        if self.pos_embed is None:
            raise ValueError("this backbone was built with use_abs_pos=False; it has no pos_embed to load")
        D = self.embed_dim
        if pos_embed.dim() == 4:
            pos_embed = pos_embed.reshape(1, -1, D)
        if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[-1] != D:
            raise ValueError(f"pos_embed of shape {tuple(pos_embed.shape)} is not (1, [1 +] h*w, {D})")
        n = pos_embed.shape[1]
        side = math.isqrt(n)
        if side * side == n:
            prefix = 0
        elif math.isqrt(n - 1) ** 2 == n - 1:
            prefix = 1
        else:
            raise ValueError(f"pos_embed with {n} rows is neither h*w nor 1 + h*w for a square grid")
        grid = resample_pos_embed(pos_embed, self.grid_size, prefix)[:, prefix:]
        self.pos_embed.copy_(grid.reshape(1, *self.grid_size, D))

    @torch.no_grad()
    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load ViTDet (detectron2 ``backbone.net.*``) or MAE/timm ViT weights into this backbone.

        Key prefixes ``backbone.net.`` / ``net.`` / ``module.`` are stripped; the position
        embedding and relative position tables are resampled to this model's sizes. Keys this
        model lacks (class token, final norm, heads) are ignored. Returns (missing, unexpected).
        """
        own = self.state_dict()
        loaded: dict[str, torch.Tensor] = {}
        unexpected: list[str] = []
        for key, value in state_dict.items():
            for prefix in ("module.", "backbone.net.", "net."):
                if key.startswith(prefix):
                    key = key[len(prefix) :]
            if key == "pos_embed" and self.pos_embed is not None:
                self.load_pretrained_pos_embed(value)
                loaded[key] = self.pos_embed
                continue
            if key not in own:
                unexpected.append(key)
                continue
            if key.endswith(("rel_pos_h", "rel_pos_w")):
                value = resize_rel_pos(value, own[key].shape[0])
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"checkpoint entry {key} has shape {tuple(value.shape)}, "
                    f"this model expects {tuple(own[key].shape)}"
                )
            loaded[key] = value
        missing = [k for k in own if k not in loaded]
        self.load_state_dict({**own, **loaded})
        return missing, unexpected


# --------------------------------------------------------------------------------------------
# Simple feature pyramid
# --------------------------------------------------------------------------------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a (B, C, H, W) map (detectron2's ``LayerNorm``)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNorm(nn.Sequential):
    """Convolution (no bias) followed by :class:`LayerNorm2d`, named ``conv`` / ``norm``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = LayerNorm2d(out_channels)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on the last (B, D, h, w) map of a plain ViT.

    One stage per scale factor: 4 -> two 2x2 stride-2 deconvolutions (with channel LayerNorm and
    GELU between), 2 -> one deconvolution, 1 -> identity, 0.5 -> 2x2 max-pool; each stage then
    applies a 1x1 and a 3x3 convolution, each followed by channel LayerNorm. Stages are named
    ``simfp_{log2 stride}`` as in detectron2. The top block max-pools the last stage (kernel 1,
    stride 2) into one more level. ``forward`` returns ``{"p2": ..., ..., "p6": ...}``.
    """

    def __init__(
        self,
        in_channels: int = 768,
        out_channels: int = 256,
        patch_size: int = 16,
        scale_factors: Iterable[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: bool = True,
    ):
        super().__init__()
        scale_factors = tuple(float(s) for s in scale_factors)
        if not scale_factors:
            raise ValueError("scale_factors must not be empty")
        dim = in_channels
        self.stage_names: list[str] = []
        for scale in scale_factors:
            if scale == 4.0:
                if dim % 4:
                    raise ValueError(f"in_channels={dim} must be divisible by 4 for scale factor 4")
                layers = [
                    nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
                    LayerNorm2d(dim // 2),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
                ]
                out_dim = dim // 4
            elif scale == 2.0:
                if dim % 2:
                    raise ValueError(f"in_channels={dim} must be even for scale factor 2")
                layers = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)]
                out_dim = dim // 2
            elif scale == 1.0:
                layers, out_dim = [], dim
            elif scale == 0.5:
                layers, out_dim = [nn.MaxPool2d(kernel_size=2, stride=2)], dim
            else:
                raise ValueError(f"scale_factors={scale_factors}: {scale} is not one of 4, 2, 1, 0.5")
            layers += [ConvNorm(out_dim, out_channels, 1), ConvNorm(out_channels, out_channels, 3)]
            stride = patch_size / scale
            stage = int(round(math.log2(stride)))
            if 2**stage != stride:
                raise ValueError(f"patch_size={patch_size} / scale {scale} is not a power of two")
            name = f"simfp_{stage}"
            if name in self.stage_names:
                raise ValueError(f"scale_factors={scale_factors} lists scale {scale} twice")
            self.add_module(name, nn.Sequential(*layers))
            self.stage_names.append(name)
        self.top_block = top_block
        last = int(self.stage_names[-1].split("_")[1])
        self.out_names = [f"p{n.split('_')[1]}" for n in self.stage_names]
        if top_block:
            self.out_names.append(f"p{last + 1}")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.stage_names:
            out["p" + name.split("_")[1]] = getattr(self, name)(x)
        if self.top_block:
            last = out[self.out_names[-2]]
            out[self.out_names[-1]] = F.max_pool2d(last, kernel_size=1, stride=2, padding=0)
        return out


class ViTDet(nn.Module):
    """ViTDet: :class:`ViTDetBackbone` (``self.backbone``) plus the simple feature pyramid.

    ``forward(x)`` returns ``{"p2", "p3", "p4", "p5", "p6"}`` (strides 4 to 64, ``out_channels``
    each); ``self.backbone(x)`` returns the backbone's last (B, D, H/16, W/16) map. The pyramid is
    ``self.pyramid``, its stages ``pyramid.simfp_2`` ... ``pyramid.simfp_5`` (detectron2 names).
    """

    def __init__(
        self,
        backbone: ViTDetBackbone,
        out_channels: int = 256,
        scale_factors: Iterable[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.img_size = backbone.img_size
        self.in_chans = backbone.in_chans
        self.pyramid = SimpleFeaturePyramid(
            backbone.embed_dim, out_channels, backbone.patch_size, scale_factors, top_block
        )
        self.register_forward_pre_hook(_check_image_hook)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, img_size, img_size) image -> dict of pyramid levels."""
        return self.pyramid(self.backbone(x))

    @torch.no_grad()
    def load_pretrained(self, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        """Load a detectron2 ViTDet checkpoint (``backbone.net.*``, ``backbone.simfp_*``).

        Detection heads are ignored; see :meth:`ViTDetBackbone.load_pretrained` for the backbone.
        Returns (missing, unexpected) keys of this model.
        """
        net, fpn, unexpected = {}, {}, []
        for key, value in state_dict.items():
            if key.startswith("module."):
                key = key[len("module.") :]
            if key.startswith("backbone.net."):
                net[key] = value
            elif key.startswith("backbone.simfp_"):
                fpn[key[len("backbone.") :]] = value
            else:
                unexpected.append(key)
        missing, unexpected_net = self.backbone.load_pretrained(net)
        own = self.pyramid.state_dict()
        for key in list(fpn):
            # detectron2's Conv2d-with-norm keeps the conv weight at "<i>.weight", ours at "<i>.conv.weight"
            parts = key.split(".")
            alt = ".".join(parts[:2] + ["conv"] + parts[2:])
            if key not in own and alt in own:
                fpn[alt] = fpn.pop(key)
        bad = [k for k in fpn if k not in own]
        for k in bad:
            fpn.pop(k)
        self.pyramid.load_state_dict({**own, **fpn})
        missing = ["backbone." + k for k in missing] + ["pyramid." + k for k in own if k not in fpn]
        return missing, unexpected + ["backbone.net." + k for k in unexpected_net] + bad


# --------------------------------------------------------------------------------------------
# Preprocessing and constructors
# --------------------------------------------------------------------------------------------


def pad_to_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize an image so its longer side is ``size`` (keeping the aspect ratio), then zero-pad the
    bottom and right edges to ``size`` x ``size``, as ViTDet's square-pad preprocessing does.

    ``image``: float tensor (C, H, W) or (B, C, H, W). Normalise (subtract the pixel mean, divide by
    the std) *before* padding so that the padding equals the mean colour, as detectron2 does.
    Resizing is bilinear with antialiasing. Returns a tensor of the same rank, (..., size, size).
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size={size!r} must be a positive int (the model's img_size)")
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):
        raise ValueError("image must be a (C, H, W) or (B, C, H, W) tensor")
    if not image.is_floating_point():
        raise ValueError(f"image has dtype {image.dtype}; convert it to float (and normalise) first")
    batched = image.dim() == 4
    x = image if batched else image[None]
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = min(size, max(1, round(h * scale))), min(size, max(1, round(w * scale)))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    x = F.pad(x, (0, size - new_w, 0, size - new_h))
    return x if batched else x[0]


def vitdet(
    img_size: int = 1024,
    patch_size: int = 16,
    in_chans: int = 3,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    window_size: int = 14,
    global_blocks: Iterable[int] = (2, 5, 8, 11),
    out_channels: int = 256,
    scale_factors: Iterable[float] = (4.0, 2.0, 1.0, 0.5),
    with_pyramid: bool = True,
    use_sdpa: bool = False,
    **kwargs,
) -> ViTDet | ViTDetBackbone:
    """A ViTDet with any configuration: :class:`ViTDet` (backbone + pyramid), or the bare
    :class:`ViTDetBackbone` when ``with_pyramid=False``. Extra keyword arguments go to the backbone
    (``qkv_bias``, ``norm_eps``, ``use_abs_pos``, ``use_rel_pos``, ``rel_pos_zero_init``,
    ``pretrain_img_size``)."""
    backbone = ViTDetBackbone(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        window_size=window_size,
        global_blocks=global_blocks,
        use_sdpa=use_sdpa,
        **kwargs,
    )
    if not with_pyramid:
        return backbone
    return ViTDet(backbone, out_channels=out_channels, scale_factors=scale_factors)


def vitdet_b(
    img_size: int = 1024, use_sdpa: bool = False, with_pyramid: bool = True, **kwargs
) -> ViTDet | ViTDetBackbone:
    """ViTDet-B: patch 16, D 768, depth 12, 12 heads, MLP ratio 4, 14x14 windows in blocks
    0,1,3,4,6,7,9,10, global attention in 2,5,8,11, decomposed relative position everywhere, 256-channel
    simple feature pyramid. ``with_pyramid=False`` returns the bare backbone. Keyword arguments
    override any :func:`vitdet` argument (for small test configurations)."""
    config = dict(
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        window_size=14,
        global_blocks=(2, 5, 8, 11),
        out_channels=256,
    )
    config.update(kwargs)
    return vitdet(img_size=img_size, use_sdpa=use_sdpa, with_pyramid=with_pyramid, **config)
