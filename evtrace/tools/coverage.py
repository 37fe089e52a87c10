"""Coverage: the model families users bring, and what evtrace does with each.

``FAMILIES`` builds small configurations (random weights, offline) of the zoo models, of HF
transformers models (SDPA and eager attention) and of timm-style modules; ``check_family``
transforms one and measures what the conformance table shows; ``bench/coverage.py`` (or
``evtrace coverage``) prints the table for all of them.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import evtrace
from evtrace.tools.video import frames as video_frames

HIDDEN = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)


@dataclass(frozen=True)
class Family:
    """One model family in a small configuration: how to build it and feed it real frames."""

    name: str
    source: str  # "zoo", "hf" or "timm-style"
    build_model: Callable[[], nn.Module]
    size: int
    patch: int
    layout: str = "image"  # "image" (B, 3, H, W), "BCTHW" or "BTCHW" (video clips)
    time_steps: int = 4

    def example(self) -> torch.Tensor:
        if self.layout == "image":
            return torch.randn(1, 3, self.size, self.size)
        if self.layout == "BCTHW":
            return torch.randn(1, 3, self.time_steps, self.size, self.size)
        return torch.randn(1, self.time_steps, 3, self.size, self.size)

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        return self.build_model().eval(), self.example()

    def real_inputs(self, count: int, clip: str = "bigbuckbunny", start: int = 40) -> list[torch.Tensor]:
        """``count`` consecutive inputs of real video, shaped like :meth:`example`."""
        steps = 1 if self.layout == "image" else self.time_steps
        single = list(
            video_frames(
                clip, size=self.size, patch_size=self.patch, max_frames=count + steps - 1, start=start
            )
        )
        if self.layout == "image":
            return single
        clips = []
        for i in range(count):
            stack = torch.stack([f[0] for f in single[i : i + steps]])  # (T, 3, H, W)
            clips.append(stack.permute(1, 0, 2, 3)[None] if self.layout == "BCTHW" else stack[None])
        return clips


def output_tensor(out) -> torch.Tensor:
    """The token map of a model output: a tensor, ``last_hidden_state``, or a dict's first entry."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"cannot find the token map in a {type(out).__name__}")


def _hf(
    name: str, model: str, config: str, size: int, patch: int, attention: str, layout: str = "image", **kw
) -> Family:
    def build():
        import transformers

        settings = dict(HIDDEN, image_size=size, patch_size=patch, attn_implementation=attention) | kw
        settings = {key: value for key, value in settings.items() if value is not None}
        extra = settings.pop("_model_kwargs", {})
        return getattr(transformers, model)(getattr(transformers, config)(**settings), **extra)

    suffix = "" if attention == "sdpa" else "_eager"
    return Family(f"hf_{name}{suffix}", "hf", build, size, patch, layout)


def _hf_families() -> list[Family]:
    families = []
    for attention in ("sdpa", "eager"):
        families += [
            _hf(
                "vit", "ViTModel", "ViTConfig", 64, 16, attention, _model_kwargs={"add_pooling_layer": False}
            ),
            _hf(
                "deit",
                "DeiTModel",
                "DeiTConfig",
                64,
                16,
                attention,
                _model_kwargs={"add_pooling_layer": False},
            ),
            _hf("clip", "CLIPVisionModel", "CLIPVisionConfig", 64, 16, attention),
            _hf("siglip", "SiglipVisionModel", "SiglipVisionConfig", 64, 16, attention),
            _hf("dinov2", "Dinov2Model", "Dinov2Config", 56, 14, attention),
            _hf(
                "dinov2_registers",
                "Dinov2WithRegistersModel",
                "Dinov2WithRegistersConfig",
                56,
                14,
                attention,
                num_register_tokens=2,
            ),
            _hf(
                "beit",
                "BeitModel",
                "BeitConfig",
                64,
                16,
                attention,
                use_relative_position_bias=True,
                _model_kwargs={"add_pooling_layer": False},
            ),
            _hf(
                "videomae",
                "VideoMAEModel",
                "VideoMAEConfig",
                32,
                16,
                attention,
                "BTCHW",
                num_frames=4,
                tubelet_size=2,
            ),
            _mae(attention),
            _hf(
                "vivit",
                "VivitModel",
                "VivitConfig",
                32,
                8,
                attention,
                "BTCHW",
                num_frames=4,
                tubelet_size=[2, 8, 8],
                _model_kwargs={"add_pooling_layer": False},
            ),
        ]
    families += [
        _hf("timesformer", "TimesformerModel", "TimesformerConfig", 32, 16, "eager", "BTCHW", num_frames=4),
        _hf(
            "swin",
            "SwinModel",
            "SwinConfig",
            64,
            4,
            "eager",
            embed_dim=32,
            depths=[2, 2],
            num_heads=[2, 4],
            window_size=4,
            hidden_size=None,
            num_hidden_layers=None,
            num_attention_heads=None,
            intermediate_size=None,
        ),
        _hf(
            "vitdet",
            "VitDetModel",
            "VitDetConfig",
            64,
            8,
            "eager",
            window_size=4,
            window_block_indices=[0],
            pretrain_image_size=64,
            use_relative_position_embeddings=True,
        ),
    ]
    return families


class FixedNoiseMAE(nn.Module):
    """HF ViTMAE with its shuffling noise fixed (a buffer): the token permutation and the kept
    tokens are then the same every frame, as in a deployed encoder."""

    def __init__(self, mae: nn.Module, tokens: int):
        super().__init__()
        self.mae = mae
        self.register_buffer("noise", torch.rand(1, tokens, generator=torch.Generator().manual_seed(0)))

    def forward(self, pixel_values):
        return self.mae(pixel_values, noise=self.noise)


def _mae(attention: str) -> Family:
    def build():
        import transformers

        config = transformers.ViTMAEConfig(
            **HIDDEN, image_size=64, patch_size=16, mask_ratio=0.25, attn_implementation=attention
        )
        return FixedNoiseMAE(transformers.ViTMAEModel(config), 16)

    return Family("hf_vitmae" + ("" if attention == "sdpa" else "_eager"), "hf", build, 64, 16)


def _zoo_families() -> list[Family]:
    import models_zoo
    from models_zoo.timm_style import eva02_style, timm_vit

    return [
        Family(
            "zoo_vit",
            "zoo",
            lambda: models_zoo.vit(
                img_size=64, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=10
            ),
            64,
            16,
        ),
        Family(
            "zoo_dinov2_registers",
            "zoo",
            lambda: models_zoo.vit_s14_dinov2(
                img_size=56, embed_dim=48, depth=3, num_heads=3, num_register_tokens=2
            ),
            56,
            14,
        ),
        Family(
            "zoo_vitdet",
            "zoo",
            lambda: models_zoo.vitdet(
                img_size=160,
                embed_dim=64,
                depth=3,
                num_heads=2,
                window_size=4,
                global_blocks=(2,),
                out_channels=32,
            ),
            160,
            16,
        ),
        Family(
            "zoo_vivit",
            "zoo",
            lambda: models_zoo.vivit_b(
                num_frames=4,
                img_size=32,
                spatial_depth=2,
                temporal_depth=1,
                embed_dim=64,
                num_heads=4,
                num_classes=7,
                temporal_num_heads=4,
            ),
            32,
            16,
            "BCTHW",
        ),
        Family("timm_vit_reg", "timm-style", timm_vit, 64, 16),
        Family("timm_vit_explicit", "timm-style", lambda: timm_vit(fused_attn=False, qk_norm=True), 64, 16),
        Family("eva02_style", "timm-style", eva02_style, 64, 16),
    ]


def families() -> dict[str, Family]:
    return {f.name: f for f in _zoo_families() + _hf_families()}


@dataclass
class CoverageRow:
    """What evtrace does with one family (see ``docs/coverage.md`` for the columns)."""

    family: str
    source: str
    frontend: str = "-"
    layers: int = 0
    sites: int = 0
    delta_sites: int = 0
    gated_linears: int = 0
    dense_linears: int = 0
    ratio_paper: float = float("nan")
    ratio_fvcore: float = float("nan")
    full_update_error: float = float("nan")
    exact_vs_dense: float = float("nan")
    compiles: str = "-"
    reasons: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _exact_vs_dense(
    family: Family, model: nn.Module, example: torch.Tensor, inputs: list[torch.Tensor]
) -> float:
    """Worst error of exact delta attention against dense attention on its own buffered q, k, v,
    under TopFraction(0.25) with the delta path forced (at small N a full recompute is cheaper)."""
    from evtrace.runtime.attention import dense_attention

    emodel = evtrace.transform(model, example, policy=evtrace.TopFraction(0.25))
    worst = 0.0

    def compare(module, args, out):
        nonlocal worst
        q, k, v, _, _, tables = args
        if hasattr(module, "grouped_tables"):
            tables = module.grouped_tables(tables, q.shape[0])
        tables = tuple(t.double() if t.is_floating_point() else t for t in tables)
        want = dense_attention(q.double(), k.double(), v.double(), module.scale, module.bias, tables)
        worst = max(worst, _relative(out.double(), want))

    handles = []
    for module in emodel.attention_modules().values():
        if hasattr(module, "full_when_cheaper"):
            module.full_when_cheaper = False
        handles.append(module.register_forward_hook(compare))
    if not handles:
        return float("nan")
    with torch.no_grad():
        for x in inputs:
            emodel(x)
    return worst


def _compiles(model: nn.Module, example: torch.Tensor) -> str:
    emodel = evtrace.transform(model, example, policy=evtrace.TopFraction(0.25))
    try:
        compiled = torch.compile(emodel, fullgraph=True)
        with torch.no_grad():
            compiled(example)
            compiled(example + 0.01)
    except Exception as error:  # noqa: BLE001 - the table records why it does not compile
        return f"no ({type(error).__name__})"
    finally:
        torch._dynamo.reset()
    return "fullgraph"


def check_family(family: Family, frames: int = 4, compile_check: bool = False) -> CoverageRow:
    """Transform one family and measure every column of the conformance table."""
    start = time.perf_counter()
    row = CoverageRow(family.name, family.source)
    model, example = family.build()
    try:
        report = evtrace.inspect(model, example)
        row.frontend = report.frontend
        row.sites = len(report.sites)
        row.delta_sites = sum(s.mode != "dense" for s in report.sites)
        row.layers = row.sites
        row.gated_linears = len(report.sparse_linears)
        row.dense_linears = len(report.linears) - row.gated_linears
        row.reasons = sorted(
            {s.reason for s in report.sites if s.reason}
            | {f"{x.module or x.node}: {x.reason}" for x in report.linears if x.reason}
            | {f"{f.op}: {f.reason}" for f in report.fallbacks}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            emodel = evtrace.transform(model, example, policy=evtrace.TopFraction(0.25))
            dense = evtrace.count_flops(model, example).total
            row.ratio_paper = dense / evtrace.count_flops(emodel, example).steady
            try:
                fv_dense = evtrace.count_flops(model, example, convention="fvcore").total
                row.ratio_fvcore = fv_dense / evtrace.count_flops(emodel, example, convention="fvcore").steady
            except Exception as error:  # noqa: BLE001
                row.error = f"fvcore: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            inputs = family.real_inputs(frames)
            full = evtrace.transform(model, example, policy=evtrace.All())
            with torch.no_grad():
                row.full_update_error = max(
                    _relative(output_tensor(full(x)), output_tensor(model(x))) for x in inputs
                )
            if row.delta_sites:
                row.exact_vs_dense = _exact_vs_dense(family, model, example, inputs)
            if compile_check:
                row.compiles = _compiles(model, example)
    except Exception as error:  # noqa: BLE001 - the table records where a family fails
        row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    row.seconds = time.perf_counter() - start
    return row


def _fmt(value: float, digits: str = ".2f") -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else format(value, digits)


def markdown_table(rows: list[CoverageRow]) -> str:
    head = (
        "| family | source | front end | attention sites | delta-updated | gated / dense linears "
        "| steady FLOP ratio at N/4 (paper / fvcore) | full update max error | exact vs dense attention "
        "| torch.compile | notes |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        notes = r.error or "; ".join(r.reasons[:3])
        lines.append(
            f"| {r.family} | {r.source} | {r.frontend} | {r.sites} | {r.delta_sites} "
            f"| {r.gated_linears} / {r.dense_linears} | {_fmt(r.ratio_paper)}x / {_fmt(r.ratio_fvcore)}x "
            f"| {_fmt(r.full_update_error, '.1e')} | {_fmt(r.exact_vs_dense, '.1e')} | {r.compiles} "
            f"| {notes} |"
        )
    return "\n".join(lines)
