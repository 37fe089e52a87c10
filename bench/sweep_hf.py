"""Conformance sweep over transformers: every model class whose config is a vision config.

    python bench/sweep_hf.py                        # every class, writes docs/sweep_hf.md
    python bench/sweep_hf.py --only swin dinov2     # classes whose model type or name contains a word
    python bench/sweep_hf.py --list                 # the classes and where they were found
    python bench/sweep_hf.py --jobs 2
    python bench/sweep_hf.py --shard 0/2 --json a.json --out a.md  # cases 0, 2, 4, ...; 1/2: 1, 3, ...
    python bench/sweep_hf.py --merge a.json b.json          # the table of both shards, docs/sweep_hf.md
    python bench/sweep_hf.py --resume a.json --json a.json  # go on after the cases a.json has

The classes come from the auto mappings: image classification, image feature extraction
(``AutoModel`` for vision configs), depth estimation, object detection, video classification,
and the vision towers of the image-text-to-text models (the class whose config is the vision
sub-config). One row per class. Configs are shrunk automatically: layers and per-stage depths at
most 2 (the stage count kept), widths (hidden sizes, embedding and intermediate sizes) divided by
4 with the head counts kept (never below 192, see ``_sweep_common.shrink_width``), then by 2,
then depths only, then the default; images at most 224 px; clips of 4 frames. The first
configuration that builds and runs is swept. Per class: see bench/_sweep_common.py.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sweep_common import ROOT, Case, shrink_width, sweep_main  # noqa: E402

MAPPINGS = {
    "image classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "image features": "MODEL_FOR_IMAGE_MAPPING_NAMES",
    "depth estimation": "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES",
    "object detection": "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",
    "video classification": "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES",
}
VLM_MAPPINGS = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES")
VIDEO = "video classification"
# Wrappers of other libraries' models (timm's), not architectures of their own.
SKIP_TYPES = {"timm_wrapper", "timm_backbone"}


def _names(value) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value if v]


def _config_class(model_type: str):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    name = CONFIG_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name) if name else None


def _vision_tower(model_type: str):
    """(class name, vision sub-config class name) of a VLM's vision tower, or None."""
    import transformers
    from transformers.models.auto import modeling_auto

    config_cls = _config_class(model_type)
    if config_cls is None:
        return None
    config = config_cls()
    vision = None
    for attr in ("vision_config", "vision_tower_config", "visual_config", "vision_encoder_config"):
        vision = getattr(config, attr, None)
        if vision is not None and not isinstance(vision, dict):
            break
        vision = None
    if vision is None:
        return None
    vtype = getattr(vision, "model_type", None)
    if vtype and vtype in modeling_auto.MODEL_MAPPING_NAMES:
        names = _names(modeling_auto.MODEL_MAPPING_NAMES[vtype])
        return names[0], type(vision).__name__
    # the class in the VLM's own modeling module whose config class is the vision sub-config
    module_name = config_cls.__module__.replace("configuration_", "modeling_")
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001
        return None
    pretrained = transformers.PreTrainedModel
    for name, obj in vars(module).items():
        if (
            inspect.isclass(obj)
            and issubclass(obj, pretrained)
            and getattr(obj, "config_class", None) is type(vision)
        ):
            if not name.endswith("PreTrainedModel"):
                return name, type(vision).__name__
    return None


def classes() -> list[tuple[str, str, str, str]]:
    """(task, model type, class name, config source) for every class to sweep, deduplicated."""
    from transformers.models.auto import modeling_auto

    seen, out = set(), []
    for task, mapping in MAPPINGS.items():
        for model_type, value in getattr(modeling_auto, mapping, {}).items():
            if model_type in SKIP_TYPES:
                continue
            for name in _names(value):
                if name not in seen:
                    seen.add(name)
                    out.append((task, model_type, name, ""))
    for mapping in VLM_MAPPINGS:
        for model_type in getattr(modeling_auto, mapping, {}):
            try:
                tower = _vision_tower(model_type)
            except Exception:  # noqa: BLE001 - a config that does not build by default
                tower = None
            if tower is None:
                continue
            name, config_name = tower
            if name not in seen and not name.startswith("TimmWrapper"):
                seen.add(name)
                out.append((f"VLM vision tower ({model_type})", model_type, name, config_name))
    return out


_DEPTH_KEYS = (
    "num_hidden_layers", "num_layers", "depth", "depths", "encoder_layers", "decoder_layers",
    "num_encoder_layers", "num_decoder_layers", "num_stages_layers", "stage_depths", "num_blocks",
)  # fmt: skip
_WIDTH_KEYS = (
    "hidden_size", "hidden_sizes", "intermediate_size", "embed_dim", "embed_dims", "d_model",
    "encoder_ffn_dim", "decoder_ffn_dim", "encoder_hidden_size", "hidden_dim", "dims", "mlp_dim",
    "out_hidden_size", "projection_dim", "encoder_hidden_dim", "neck_hidden_sizes", "fusion_hidden_size",
)  # fmt: skip
_SUBCONFIGS = ("vision_config", "backbone_config", "encoder_config")


def _shrink_value(value, fn):
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return fn(value)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return type(value)(fn(v) for v in value)
    return value


def shrink_config(
    config, width_factor: int | None, depth: bool = True, size: int | None = 224, frames: int = 4
):
    """A shrunk copy of ``config`` and a description of what changed."""
    config = copy.deepcopy(config)
    changes = []

    def visit(cfg, prefix=""):
        for key in _DEPTH_KEYS:
            value = getattr(cfg, key, None)
            if depth and value is not None:
                new = _shrink_value(value, lambda v: min(v, 2) if v > 0 else v)
                if new != value:
                    setattr(cfg, key, new)
                    changes.append(f"{prefix}{key}={new}")
        for key in _WIDTH_KEYS:
            value = getattr(cfg, key, None)
            if width_factor and value is not None:
                new = _shrink_value(value, lambda v: shrink_width(v, width_factor))
                if new != value:
                    setattr(cfg, key, new)
                    changes.append(f"{prefix}{key}={new}")
        heads = getattr(cfg, "num_attention_heads", None)
        hidden = getattr(cfg, "hidden_size", None)
        if (
            width_factor
            and isinstance(getattr(cfg, "head_dim", None), int)
            and isinstance(heads, int)
            and isinstance(hidden, int)
        ):
            cfg.head_dim = max(1, hidden // heads)
        if isinstance(getattr(cfg, "num_key_value_heads", None), int) and isinstance(heads, int):
            cfg.num_key_value_heads = heads
        image = getattr(cfg, "image_size", None)
        if size and isinstance(image, int) and image > size:
            cfg.image_size = size
            changes.append(f"{prefix}image_size={size}")
        elif size and isinstance(image, (list, tuple)) and len(image) == 2 and max(image) > size:
            cfg.image_size = [size, size]
            changes.append(f"{prefix}image_size={size}")
        if isinstance(getattr(cfg, "num_frames", None), int) and cfg.num_frames > frames:
            cfg.num_frames = frames
            changes.append(f"{prefix}num_frames={frames}")
        if hasattr(cfg, "use_pretrained_backbone"):
            cfg.use_pretrained_backbone = False
        for sub in _SUBCONFIGS:
            child = getattr(cfg, sub, None)
            if child is not None and not isinstance(child, dict) and hasattr(child, "to_dict"):
                visit(child, f"{prefix}{sub}.")

    visit(config)
    return config, ", ".join(changes)


def _example(config, video: bool):
    import torch

    channels = getattr(config, "num_channels", 3) or 3
    image = getattr(config, "image_size", 224) or 224
    h, w = (image, image) if isinstance(image, int) else tuple(image)[:2]
    if video or getattr(config, "model_type", "") in ("vivit", "videomae", "timesformer", "vjepa2"):
        frames = getattr(config, "num_frames", 4) or 4
        return torch.randn(1, frames, channels, h, w)
    return torch.randn(1, channels, h, w)


def build_hf(class_name: str, config_name: str, model_type: str, video: bool, size: int = 224):
    """The smallest configuration that builds and runs: (model, example, description). Images of
    at most ``size`` px."""
    import torch
    import transformers

    cls = getattr(transformers, class_name)
    config_cls = getattr(transformers, config_name) if config_name else _config_class(model_type)
    if config_cls is None:
        config_cls = cls.config_class
    base = config_cls()
    attempts = [
        ("depth<=2, width/4", dict(width_factor=4, size=size)),
        ("depth<=2, width/2", dict(width_factor=2, size=size)),
        ("depth<=2", dict(width_factor=None, size=size)),
        ("depth<=2, default size", dict(width_factor=None, size=None)),
        ("default", None),
    ]
    errors = []
    for label, options in attempts:
        try:
            if options is None:
                config, changes = copy.deepcopy(base), ""
            else:
                config, changes = shrink_config(base, **options)
            torch.manual_seed(0)
            model = cls(config).eval()
            example = _example(config, video)
            with torch.no_grad():
                model(example)
            return model, example, f"{label}: {changes}" if changes else label
        except Exception as error:  # noqa: BLE001 - try the next, less shrunk configuration
            text = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
            errors.append(f"{label}: {type(error).__name__}: {text}")
    raise RuntimeError("no configuration builds and runs: " + " | ".join(errors[-2:]))


def cases(only: list[str] | None = None) -> list[Case]:
    out = []
    for task, model_type, name, config_name in classes():
        if only and not any(word in model_type or word.lower() in name.lower() for word in only):
            continue
        video = task == VIDEO
        out.append(
            Case(
                task,
                f"{model_type}:{name}",
                name,
                lambda n=name, c=config_name, t=model_type, v=video: build_hf(n, c, t, v),
            )
        )
    return out


TITLE = "Conformance sweep: transformers vision models"
INTRO = """
Generated by `python bench/sweep_hf.py` (transformers {version}, torch {torch}; CPU, one thread per
case). Every class of the auto mappings for image classification, image features, depth estimation,
object detection and video classification, and the vision tower of every image-text-to-text
model; configs shrunk (config column: what changed; "default": nothing could be). Random weights,
real frames (bigbuckbunny, resized to the model's input; clips of consecutive frames). Policy
TopFraction(0.25), exact attention, no scene-cut detection. Columns: full update = `verify(All())`
max relative error over 4 frames (<= 1e-4); partial vs reference = the eventful model against
tests/reference.py's simulator on frame 0 and 3 partial frames (<= 1e-4); FLOP ratio = dense /
eventful steady state, paper and fvcore conventions; sites = attention sites delta-updated /
found; warnings = evtrace warnings at transform. Verdicts: "CRASH after transform" = transform
succeeded, then a frame, `report()` or `count_flops` raised; "wrong result" = an error above 1e-4;
"warned < 2x" = below 2x with a warning saying so; "quiet < 2x" = below 2x without one.
"""


def main() -> int:
    import torch
    import transformers

    from tests.timm_setup import declare_torchvision_ops

    declare_torchvision_ops()  # transformers imports torchvision where it is installed
    import evtrace.cost.count  # noqa: F401 - imported once before the children fork
    import evtrace.verification  # noqa: F401
    import tests.reference  # noqa: F401

    def show():
        for task, model_type, name, config in classes():
            print(f"{task:40s} {model_type:28s} {name} {config}")

    rank = {(t, n): i for i, (t, _, n, _) in enumerate(classes())}
    intro = INTRO.format(version=transformers.__version__, torch=torch.__version__)
    return sweep_main(
        __doc__,
        cases,
        show,
        TITLE,
        intro,
        ROOT / "docs" / "sweep_hf.md",
        order=lambda row: (rank.get((row.family, row.model), len(rank)), row.arch),
    )


if __name__ == "__main__":
    sys.exit(main())
