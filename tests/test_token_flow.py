import pytest
import torch
from torch import nn

import evtrace
from evtrace.graph.meta import ROLE, TOKENS, Role
from passes.pipeline import analyze
from tests.models import small_dinov2, small_vit, small_vitdet, small_vivit


def _by_path(gm, suffix):
    return [
        n
        for n in gm.graph.nodes
        if n.meta.get("evtrace.module_path", "").endswith(suffix) and n.meta.get(TOKENS)
    ]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_vit_sequence_starts_at_class_token_concat(frontend):
    model, x = small_vit()
    analysis = analyze(model, torch.cat([x, x]), frontend=frontend)
    patches, sequence = analysis.spaces
    assert (patches.batch, patches.tokens, patches.prefix) == (2, 16, ())
    assert (sequence.batch, sequence.tokens, sequence.prefix) == (2, 17, (0,))
    qkv = _by_path(analysis.gm, "blocks.0.attn.qkv")[0].meta[TOKENS]
    assert qkv.space == sequence and qkv.canonical and qkv.row_major and qkv.token_dims == (0, 1)


def test_register_tokens_are_always_updated_prefix():
    model, x = small_dinov2()
    analysis = analyze(model, x)
    assert analysis.spaces[-1].prefix == (0, 1, 2)
    assert analysis.spaces[-1].tokens == 1 + 2 + 16


def test_head_split_is_not_row_major_but_heads_canonical():
    model, x = small_vit()
    analysis = analyze(model, x, frontend="fx")
    site = analysis.sites[0]
    layout = site.q.meta[TOKENS]
    assert not layout.row_major and layout.heads_canonical and layout.sequence_dim == 2


def test_vitdet_grid_and_windows():
    model, x = small_vitdet()
    analysis = analyze(model, x, frontend="fx")
    space = analysis.spaces[0]
    assert (space.tokens, space.prefix) == (100, ())
    windowed = analysis.sites[0]
    assert windowed.windowed and windowed.dense_reason == ""
    # delta-updated per window and head: 9 windows x 2 heads of 16 positions, padding without a token
    assert (
        tuple(windowed.group_ids.shape) == (18, 16)
        and int((windowed.group_ids == 0).sum()) == (144 - 100) * 2
    )
    # q of a windowed block: (windows x heads, window positions, d), the 10x10 grid padded to 12x12
    layout = windowed.q.meta[TOKENS]
    assert layout.row_ids.numel() == 9 * 2 * 16 and int((layout.row_ids == 0).sum()) == (144 - 100) * 2
    assert not layout.canonical and not layout.complete  # every token once per head


def test_vivit_has_spatial_and_temporal_sequences():
    model, x = small_vivit()
    analysis = analyze(model, x)
    spatial, temporal = analysis.spaces[-2], analysis.spaces[-1]
    assert (spatial.batch, spatial.tokens) == (2, 5)  # 2 time steps x (2x2 patches + class token)
    assert (temporal.batch, temporal.tokens, temporal.prefix) == (1, 3, (0,))


def test_readout_and_pooling_are_selecting():
    model, x = small_vit(class_token=False)
    analysis = analyze(model, x, frontend="fx")
    pooled = [n for n in analysis.gm.graph.nodes if n.meta[ROLE].role == Role.SELECTING]
    assert pooled and "pooling" in pooled[0].meta[ROLE].reason


class ResNetStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv1(x).mean(dim=(2, 3)))


def test_cnn_has_no_token_sequence_and_the_error_names_the_closest_candidate():
    with pytest.raises(evtrace.NoTokenSequenceError) as info:
        evtrace.inspect(ResNetStem().eval(), torch.randn(1, 3, 32, 32))
    message = str(info.value)
    assert "never forms a token sequence" in message
    assert "conv1" in message and "kernel (7, 7)" in message and "stride (2, 2)" in message


class MergeByReshape(nn.Module):
    """Patch merging as timm writes it: 2x2 neighbours into the channels by reshape, permute and
    flatten, then a LayerNorm over the merged channels and a linear. ``overlap`` puts each token
    in two merged rows instead (a shifted copy beside it): that mixes tokens."""

    def __init__(self, overlap: bool = False):
        super().__init__()
        self.overlap = overlap
        self.patch = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.norm = nn.LayerNorm(32 if not overlap else 16)
        self.reduction = nn.Linear(self.norm.normalized_shape[0], 16)

    def forward(self, x):
        t = self.patch(x).permute(0, 2, 3, 1)  # (B, 8, 8, C)
        if self.overlap:
            merged = torch.cat([t, t.roll(1, dims=2)], dim=-1)
        else:
            merged = t.reshape(1, 4, 2, 4, 2, 8).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(merged))


def test_patch_merging_by_reshape_opens_a_coarser_sequence():
    analysis = analyze(MergeByReshape().eval(), torch.randn(1, 3, 32, 32), frontend="fx")
    patches, merged = analysis.spaces
    assert (patches.tokens, merged.tokens) == (64, 16)
    norm = next(n for n in analysis.gm.graph.nodes if n.target == "norm")
    assert norm.meta[ROLE].role == Role.SOURCE and "patch merging" in norm.meta[ROLE].reason
    reduction = next(n for n in analysis.gm.graph.nodes if n.target == "reduction")
    assert reduction.meta[ROLE].role == Role.TOKENWISE and reduction.meta[TOKENS].space == merged


def test_overlapping_merge_and_a_norm_over_tokens_are_not_token_wise():
    analysis = analyze(MergeByReshape(overlap=True).eval(), torch.randn(1, 3, 32, 32), frontend="fx")
    assert len(analysis.spaces) == 1
    cat = next(n for n in analysis.gm.graph.nodes if n.name == "cat")
    assert cat.meta[ROLE].role == Role.MIXING and "overlapping" in cat.meta[ROLE].reason

    class NormOverTokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 8, kernel_size=4, stride=4)
            self.norm = nn.LayerNorm(64)

        def forward(self, x):
            return self.norm(self.patch(x).flatten(2))  # (B, C, N): normalised over the tokens

    analysis = analyze(NormOverTokens().eval(), torch.randn(1, 3, 32, 32), frontend="fx")
    norm = next(n for n in analysis.gm.graph.nodes if n.target == "norm")
    assert norm.meta[ROLE].role == Role.MIXING and norm.meta[ROLE].reason == "normalises over tokens"
