"""Conformance sweep over real timm: every transformer architecture ``timm.list_models()`` gives.

    python bench/sweep_timm.py                     # every architecture, writes docs/sweep_timm.md
    python bench/sweep_timm.py --only swin deit3   # architectures whose key contains a word, printed
    python bench/sweep_timm.py --list              # the architectures and their representatives
    python bench/sweep_timm.py --jobs 2            # cases in parallel (each in its own process)
    python bench/sweep_timm.py --shard 0/2 --json a.json --out a.md  # cases 0, 2, 4, ...; 1/2: 1, 3, ...
    python bench/sweep_timm.py --merge a.json b.json          # the table of both shards, docs/sweep_timm.md
    python bench/sweep_timm.py --resume a.json --json a.json  # go on after the cases a.json has

Model names are grouped into architectures: the name without its size word (tiny, small, base,
...), patch size, window size, resolution and stage numbers, within the timm module that defines
it (``swin_tiny_patch4_window7_224`` and ``swin_base_patch4_window12_384`` are one architecture).
One representative per architecture (the smallest), ``pretrained=False``, shrunk where its
constructor allows: the keyword arguments its entry point passes are captured (nothing is built),
then depth per stage at most 2 (the stage count kept) and widths divided by 4 (heads kept; never
below 192, see ``_sweep_common.shrink_width``), then by 2, then depth only, then the default;
the first that builds and runs is swept. Modules of convolutional and MLP families are not
listed (``CNN_MODULES``); a listed model with no attention module is shown as excluded.
Per architecture: see bench/_sweep_common.py.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sweep_common import ROOT, Case, shrink_width, sweep_main  # noqa: E402

from tests.timm_setup import import_timm  # noqa: E402

# timm modules whose models are convolutional or MLP networks (no attention anywhere).
CNN_MODULES = {
    "convmixer", "convnext", "cpubone", "cspnet", "cspnext", "densenet", "dla", "dpn", "efficientnet",
    "efficientvim", "fasternet", "focalnet", "ghostnet", "hardcorenas", "hgnet", "hrnet", "inception_next",
    "inception_resnet_v2", "inception_v3", "inception_v4", "lcnetv2", "mambaout", "mlp_mixer", "mobilenetv3",
    "nasnet", "nfnet", "pnasnet", "rdnet", "regnet", "repghost", "repvit", "res2net", "resnest", "resnet",
    "resnetv2", "rexnet", "selecsls", "senet", "sequencer", "sknet", "starnet", "tresnet", "vgg", "vovnet",
    "xception", "xception_aligned", "byobnet", "mobilenetv5",
}  # fmt: skip

SIZES = (
    "atto femto pico nano micro mini tiny xtiny xxsmall xsmall small little wee pwee dwee dpwee dlittle "
    "medium mediumd betwixt base plus large xlarge huge giant gigantic enormous"
).split()
_SIZE_RANK = {s: i for i, s in enumerate(SIZES)}
_SHORT_SIZES = {
    "s",
    "m",
    "l",
    "b",
    "t",
    "h",
    "g",
    "xs",
    "xxs",
    "xl",
    "xxl",
    "so150m",
    "so400m",
    "so150m2",
    "6b",
}
_NUMBERED = re.compile(
    r"\d+[a-z]?|\d+x\d+|p\d+|patch\d+|window\d+|w\d+|b\d+|d\d+|s\d+|m\d+|\d+s|\d+m|\d+[a-z]\d*|\d+b"
)

CAPTURED_OMIT = {
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "pretrained_filter_fn",
    "feature_cfg",
    "cache_dir",
}


def arch_key(name: str, module: str) -> str:
    tokens = []
    for token in name.split("_"):
        if token in _SIZE_RANK or token in _SHORT_SIZES or _NUMBERED.fullmatch(token):
            continue
        if re.fullmatch(r"(reg|rope|patch|window|depth|gap|sw|nf)\d+", token):
            token = re.sub(r"\d+$", "", token)
        tokens.append(token)
    return f"{module}:{'_'.join(tokens) or name}"


def _size_rank(name: str) -> tuple:
    ranks = [_SIZE_RANK[t] for t in name.split("_") if t in _SIZE_RANK]
    numbers = [int(n) for n in re.findall(r"\d+", name)]
    return (min(ranks) if ranks else 5, sum(numbers), len(name), name)


def architectures(timm) -> dict[str, list[str]]:
    from timm.models import _registry

    groups: dict[str, list[str]] = defaultdict(list)
    for name in timm.list_models():
        module = _registry._model_to_module.get(name, "?")
        if module in CNN_MODULES:
            continue
        groups[arch_key(name, module)].append(name)
    return {key: sorted(names, key=_size_rank) for key, names in sorted(groups.items())}


class _Captured(Exception):
    pass


def captured_kwargs(timm, name: str) -> dict:
    """The keyword arguments ``name``'s entry point passes to its model class (nothing is built)."""
    modules = [
        m
        for n, m in list(sys.modules.items())
        if n.startswith("timm.models.") and hasattr(m, "build_model_with_cfg")
    ]
    seen: dict = {}

    def capture(model_cls, variant, pretrained, **kwargs):
        seen.update(cls=model_cls, kwargs=kwargs)
        raise _Captured

    saved = {m: m.build_model_with_cfg for m in modules}
    try:
        for m in modules:
            m.build_model_with_cfg = capture
        try:
            timm.create_model(name, pretrained=False)
        except _Captured:
            pass
        except Exception:  # noqa: BLE001 - an entry point that does not use the builder
            return {}
    finally:
        for m, fn in saved.items():
            m.build_model_with_cfg = fn
    return {k: v for k, v in seen.get("kwargs", {}).items() if k not in CAPTURED_OMIT}


_DEPTH_KEYS = ("depth", "depths", "stages", "layers", "num_blocks")
_WIDTH_KEYS = ("embed_dim", "embed_dims", "dims", "dim", "widths", "hidden_dim", "hidden_size")


def _shrink_depth(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return min(value, 2)
    if isinstance(value, (list, tuple)):
        return type(value)(_shrink_depth(v) for v in value)
    return value


def _shrink_width(value, factor: int):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return shrink_width(value, factor)
    if isinstance(value, (list, tuple)):
        return type(value)(_shrink_width(v, factor) for v in value)
    return value


def shrunk(kwargs: dict, width_factor: int | None, depth: bool = True) -> dict:
    """Changed keyword arguments: depths at most 2 per stage, widths / ``width_factor``."""
    out = {}
    for key, value in kwargs.items():
        if depth and key in _DEPTH_KEYS:
            new = _shrink_depth(value)
        elif width_factor and key in _WIDTH_KEYS:
            new = _shrink_width(value, width_factor)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            changes = {}
            for f in dataclasses.fields(value):
                item = getattr(value, f.name)
                if depth and f.name in _DEPTH_KEYS:
                    changes[f.name] = _shrink_depth(item)
                elif width_factor and f.name in _WIDTH_KEYS:
                    changes[f.name] = _shrink_width(item, width_factor)
            new = dataclasses.replace(value, **changes) if changes else value
        else:
            continue
        if new != value:
            out[key] = new
    return out


def _describe(changes: dict) -> str:
    parts = []
    for k, v in changes.items():
        if dataclasses.is_dataclass(v):
            parts.append(f"{k}=<{type(v).__name__} shrunk>")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def build_timm(name: str, size: int | None = None):
    """The smallest configuration of ``name`` that builds and runs: (model, example, description).
    ``size``: the input size to try first (default: the model's, at most 224)."""
    import torch

    timm = import_timm()
    kwargs = captured_kwargs(timm, name)
    default_size = None
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        default_size = cfg.input_size if cfg is not None else None
    except Exception:  # noqa: BLE001
        pass
    img = {}
    if size is not None:
        img = {"img_size": size}
    elif default_size and max(default_size[1:]) > 256:
        img = {"img_size": 224}
    attempts = [
        ("depth<=2, width/4", shrunk(kwargs, 4) | img),
        ("depth<=2, width/2", shrunk(kwargs, 2) | img),
        ("depth<=2", shrunk(kwargs, None) | img),
        ("depth<=2, default size", shrunk(kwargs, None)),
        ("default", {}),
    ]
    errors = []
    tried = set()
    for label, changes in attempts:
        key = repr(changes)
        if key in tried:
            continue
        tried.add(key)
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, **changes).eval()
            data = timm.data.resolve_model_data_config(model)
            c, h, w = data["input_size"]
            if "img_size" in changes:  # the data config keeps the pretrained size
                h = w = changes["img_size"]
            example = torch.randn(1, c, h, w)
            with torch.no_grad():
                model(example)
            return model, example, f"{label}: {_describe(changes)}" if changes else label
        except Exception as error:  # noqa: BLE001 - try the next, less shrunk configuration
            errors.append(
                f"{label}: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
            )
    raise RuntimeError("no configuration builds and runs: " + " | ".join(errors[-2:]))


# Swept first (the families named by the issue), the rest after them in name order.
PRIORITY = (
    "vision_transformer", "deit", "eva", "beit", "swin_transformer", "swin_transformer_v2",
    "swin_transformer_v2_cr", "cait", "xcit", "levit", "pvt_v2", "mvitv2", "hiera", "twins", "crossvit",
    "volo", "tnt", "maxxvit", "efficientformer", "efficientformer_v2", "fastvit", "vision_transformer_relpos",
    "vision_transformer_hybrid", "vision_transformer_sam", "naflexvit",
)  # fmt: skip


def cases(only: list[str] | None = None) -> list[Case]:
    timm = import_timm()
    out = []
    rank = {m: i for i, m in enumerate(PRIORITY)}
    ordered = sorted(
        architectures(timm).items(), key=lambda kv: (rank.get(kv[0].split(":")[0], len(rank)), kv[0])
    )
    for key, names in ordered:
        if only and not any(word in key or any(word in n for n in names) for word in only):
            continue
        name = names[0]
        module = key.split(":", 1)[0]

        out.append(Case(module, key, name, lambda name=name: build_timm(name)))
    return out


TITLE = "Conformance sweep: real timm"
INTRO = """
Generated by `python bench/sweep_timm.py` (timm {version}, torch {torch}; CPU, one thread per case).
Every architecture `timm.list_models()` gives outside convolutional/MLP modules, grouped by the name
without size, patch, window and resolution words; one representative each, `pretrained=False`,
shrunk (config column: what was changed; "default": nothing could be). Random weights, real frames
(bigbuckbunny, resized to the model's input). Policy TopFraction(0.25), exact attention, no scene-cut
detection. Columns: full update = `verify(All())` max relative error over 4 frames (<= 1e-4);
partial vs reference = the eventful model against tests/reference.py's simulator on frame 0 and 3
partial frames (<= 1e-4); FLOP ratio = dense / eventful steady state, paper and fvcore conventions;
sites = attention sites delta-updated / found; warnings = evtrace warnings at transform.
Verdicts: "CRASH after transform" = transform succeeded, then a frame, `report()` or `count_flops`
raised; "wrong result" = an error above 1e-4; "warned < 2x" = below 2x with a warning saying so;
"quiet < 2x" = below 2x without one.
"""


def main() -> int:
    import torch

    timm = import_timm()
    import evtrace.cost.count  # noqa: F401 - imported once before the children fork
    import evtrace.verification  # noqa: F401
    import tests.reference  # noqa: F401

    def show():
        for key, names in architectures(timm).items():
            print(f"{key:50s} {names[0]:45s} ({len(names)} models)")

    rank = {case.arch: i for i, case in enumerate(cases())}
    intro = INTRO.format(version=timm.__version__, torch=torch.__version__)
    return sweep_main(
        __doc__,
        cases,
        show,
        TITLE,
        intro,
        ROOT / "docs" / "sweep_timm.md",
        order=lambda row: (rank.get(row.arch, len(rank)), row.arch),
    )


if __name__ == "__main__":
    sys.exit(main())
