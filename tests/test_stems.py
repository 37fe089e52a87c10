"""Token sequences from any stem: overlapping and padded conv stems, hybrid conv stems with
eval-mode batch norm, linear patch embeddings of pre-patchified input, and spatial-reduction
attention (SegFormer, PVTv2), where the main sequence is gated and the reduced K/V sequence is
its own. Each: the rewrite happened (counts), a full update equals the original, partial frames
equal the reference simulator (tests/reference.py); negative cases stay dense with the reason.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import evtrace
from evtrace.graph.meta import ROLE, Role
from passes.pipeline import analyze
from tests.models import real_frames
from tests.reference import ReferenceStream, relative_error
from tests.test_hierarchical import _declare_torchvision_ops

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 32


class Block(nn.Module):
    """A pre-norm Transformer block with explicit attention (2 heads)."""

    def __init__(self, c: int = WIDTH):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * (c // 2) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ConvStemViT(nn.Module):
    """Two blocks on the output of a stem: ``overlapping`` (7x7 stride 4 padding 3, as SegFormer
    and PVT), ``padded`` (a patch conv 8x8 stride 8 with padding 2) or ``hybrid`` (3x3 stride 2
    convolutions with batch norm and ReLU, then a 1x1 projection)."""

    def __init__(self, stem: str):
        super().__init__()
        if stem == "overlapping":
            self.stem = nn.Conv2d(3, WIDTH, 7, stride=4, padding=3)
        elif stem == "padded":
            self.stem = nn.Conv2d(3, WIDTH, 8, stride=8, padding=2)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, stride=2, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, WIDTH, 1),
            )
            for m in self.stem:
                if isinstance(m, nn.BatchNorm2d):  # running statistics other than the identity
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.blocks(self.stem(x).flatten(2).transpose(1, 2))


class LinearEmbedViT(nn.Module):
    """Pre-patchified input (B, N, 8*8*3) embedded by a linear (no convolution at all)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8 * 8 * 3, WIDTH)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, patches):
        return self.blocks(self.embed(patches))


def _patchify(frame: torch.Tensor, p: int = 8) -> torch.Tensor:
    b, c, h, w = frame.shape
    return frame.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)


def check_gated(model, frames, policy, sites_exact: int, sites_dense: int = 0):
    """Transform at All() (exact) and at ``policy`` (equal to the reference, partial); returns
    the report. Every region is gated and every linear of the blocks is sparse."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = evtrace.transform(model, frames[0], policy=evtrace.All())
        emodel = evtrace.transform(model, frames[0], policy=policy)
    report = emodel.report()
    with_linears = [r for r in report.regions if r.linears]
    assert with_linears and all(r.gated for r in with_linears), [
        (r.name, r.reason) for r in with_linears if not r.gated
    ]
    modes = [s.mode for s in report.sites]
    assert modes.count("exact") == sites_exact and modes.count("dense") == sites_dense, modes
    sim = ReferenceStream(model, frames[0], policy)
    with torch.no_grad():
        assert max(relative_error(full(f), model(f)) for f in frames) <= 1e-4
        errors = [relative_error(emodel(f), sim(f)) for f in frames]
        emodel.reset()
        partial = max(relative_error(emodel(f), model(f)) for f in frames)
    assert max(errors) <= 1e-5, errors
    assert partial > 1e-3, "the policy updated everything: the comparison proves nothing"
    return report


@pytest.mark.parametrize("stem", ["overlapping", "padded", "hybrid"])
def test_a_sequence_starts_at_the_output_of_any_conv_stem(stem):
    torch.manual_seed(0)
    model = ConvStemViT(stem).eval()
    frames = real_frames(64, 4, patch_size=8)
    report = check_gated(model, frames, evtrace.TopK(16), sites_exact=2)
    tokens = {"overlapping": [256], "padded": [64], "hybrid": [1024, 256]}[stem]
    assert [space["tokens"] for space in report.spaces] == tokens
    assert {x.module for x in report.sparse_linears} == {
        f"blocks.{i}.{m}" for i in (0, 1) for m in ("qkv", "proj", "fc1", "fc2")
    }
    nodes = {n.name: n for n in analyze(model, frames[0]).gm.graph.nodes}
    first = nodes[report.spaces[0]["source"]].meta[ROLE]
    assert first.role == Role.SOURCE and first.reason == "convolution stem (runs dense): its output positions"
    if stem == "hybrid":  # the stride-2 conv of the first positions: a new grid, a new sequence
        second = nodes[report.spaces[1]["source"]].meta[ROLE]
        assert second.reason == "convolution of the tokens to a new grid (runs dense): a new sequence"


def test_a_linear_patch_embedding_of_pre_patchified_input_starts_a_sequence():
    torch.manual_seed(0)
    model = LinearEmbedViT().eval()
    frames = [_patchify(f) for f in real_frames(64, 4, patch_size=8)]
    report = check_gated(model, frames, evtrace.TopK(16), sites_exact=2)
    (space,) = report.spaces
    assert space["tokens"] == 64 and space["source"] == "embed"


def test_batch_norm_is_token_wise_only_with_running_statistics():
    torch.manual_seed(0)
    model = ConvStemViT("hybrid").eval()
    image = torch.randn(1, 3, 64, 64)
    nodes = {n.target: n for n in analyze(model, image, frontend="fx").gm.graph.nodes}
    assert nodes["stem.1"].meta[ROLE].role == Role.TOKENWISE
    model.stem[1].train()  # batch statistics: every position enters every output
    nodes = {n.target: n for n in analyze(model, image, frontend="fx").gm.graph.nodes}
    record = nodes["stem.1"].meta[ROLE]
    assert record.role == Role.MIXING and "training mode" in record.reason


def test_a_convolution_model_without_attention_or_linears_says_what_it_found():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)
    ).eval()
    with pytest.raises(evtrace.NoTokenSequenceError) as info:
        evtrace.inspect(model, torch.randn(1, 3, 32, 32))
    message = str(info.value)
    assert "kernel (7, 7), stride (2, 2), padding (3, 3)" in message and "256 positions" in message
    assert "no attention and no linear reads them" in message
    assert "CNN" not in message and "overlap" not in message


def hf_segformer():
    _declare_torchvision_ops()
    import transformers

    config = transformers.SegformerConfig(
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 48, 64],
        num_attention_heads=[1, 2, 3, 4],
        decoder_hidden_size=32,
    )
    return transformers.SegformerModel(config).eval()


def hf_pvt_v2():
    _declare_torchvision_ops()
    import transformers

    config = transformers.PvtV2Config(
        depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 3, 4], image_size=128
    )
    return transformers.PvtV2Model(config).eval()


@pytest.mark.parametrize("build", [hf_segformer, hf_pvt_v2], ids=["segformer", "pvt_v2"])
def test_spatial_reduction_attention_gates_the_main_sequence(build):
    """Overlapping 7x7 stride-4 stems, K and V from a strided conv of the tokens, a depthwise
    conv inside the MLP: every region is gated (main and reduced sequences), the last stage
    (no reduction) is delta-updated, the reduced ones are dense with the reason."""
    torch.manual_seed(0)
    model = build()
    frames = real_frames(128, 4, patch_size=32)
    report = check_gated(model, frames, evtrace.TopFraction(0.25), sites_exact=1, sites_dense=3)
    assert [s["tokens"] for s in report.spaces] == [1024, 16, 256, 16, 64, 16, 16]
    assert not [x for x in report.linears if x.status != "sparse"]
    for site in report.sites[:3]:
        assert "spatial-reduction attention" in site.reason and "keys and values from tokens" in site.reason
    reduced = {report.spaces[i]["name"] for i in (1, 3, 5)}
    assert sum(r.gated and r.space in reduced for r in report.regions) == 3  # K, V of the reduced sequences
