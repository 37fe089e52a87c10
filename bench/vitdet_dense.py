"""Dense ViTDet-B backbone, each attention variant side by side (and the paper's, optionally).

    python bench/vitdet_dense.py --sizes 672,1024 --frames 8
    python bench/vitdet_dense.py --sizes 672 --paper /path/to/eventful-transformer --profile

Every model gets the same weights (one model's state dict, copied) and the same real frames of
Big Buck Bunny (padded to a square as ViTDet does). Per frame the models run one after the other in
an order that rotates frame by frame, so a contention burst on this shared machine hits all of them;
the table gives the median, min and max per model and the ratio of medians to the fastest.

``--paper PATH`` adds the implementation of the Eventful Transformers paper
(github.com/WISION-Lab/eventful-transformer) from a checkout at PATH, imported at run time
(nothing of it is part of evtrace): its ``ViTBackbone`` with plain ``Block``s, windows and global
blocks as in ViTDet-B, relative position tables sized to our tables (so that it interpolates
nothing), fed by our patch embedding (a stride-16 convolution in both). Its output is compared with
ours. Its ``utils.image`` imports torchvision, which does not import here; if the import fails a
stand-in module with a padding helper is installed (windowed blocks pad at 1024 px).

``--profile`` prints each model's top ops by self CPU time over two profiled frames.
``--block-reps K`` also times one windowed block (block 0) and one global block (block 2) of each
model alone, K rounds interleaved on a random token grid: shorter calls, so medians and minima hold
up better than whole frames when the machine is busy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from evtrace.tools.video import frames
from models_zoo.vitdet import vitdet_b

WINDOW_BLOCKS = (0, 1, 3, 4, 6, 7, 9, 10)


def ours(size: int, attention: str, state: dict | None = None) -> torch.nn.Module:
    """Our dense backbone with ``attention`` in ("explicit", "sdpa"), loaded with ``state``."""
    model = vitdet_b(img_size=size, with_pyramid=False, use_sdpa=attention == "sdpa").eval()
    if state is not None:
        model.load_state_dict(state)
    return model


def _install_paper_image_stub() -> None:
    """A stand-in for the paper's ``utils.image`` (which needs torchvision): only the padding
    helper its blocks call, ``pad_to_size(x, size, pad_tensor)``, written here."""

    def pad_to_size(x: torch.Tensor, size, pad_tensor: torch.Tensor | None = None) -> torch.Tensor:
        size = tuple(size)
        if pad_tensor is None:
            pad_tensor = x.new_zeros((1,) * x.dim())
        for dim in range(1, len(size) + 1):
            missing = size[-dim] - x.shape[-dim]
            if missing > 0:
                shape = list(x.shape)
                shape[-dim] = missing
                x = torch.cat([x, pad_tensor.expand(shape)], dim=-dim)
        return x

    utils = sys.modules.get("utils") or types.ModuleType("utils")
    utils.__path__ = getattr(utils, "__path__", [])
    image = types.ModuleType("utils.image")
    image.pad_to_size = pad_to_size
    sys.modules["utils"], sys.modules["utils.image"] = utils, image


class PaperBackbone(torch.nn.Module):
    """Our patch embedding (+ nothing else of ours) followed by the paper's ``ViTBackbone``;
    returns (B, D, H/16, W/16) as our backbone does."""

    def __init__(self, patch_embed: torch.nn.Module, backbone: torch.nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.patch_embed = patch_embed
        self.backbone = backbone
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(1, 2)  # (B, N, D)
        out = self.backbone(tokens)
        return out.transpose(1, 2).reshape(out.shape[0], -1, *self.grid)


def paper(path: str, reference: torch.nn.Module) -> torch.nn.Module:
    """The paper's dense ViTDet-B backbone from the checkout at ``path``, with ``reference``'s weights."""
    root = str(Path(path).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import utils.image  # noqa: F401
    except Exception:  # torchvision (or matplotlib) missing or broken here
        for name in [m for m in sys.modules if m == "utils" or m.startswith("utils.")]:
            del sys.modules[name]
        _install_paper_image_stub()
    from eventful_transformer.backbones import ViTBackbone

    grid = tuple(reference.grid_size)
    D = reference.embed_dim
    backbone = ViTBackbone(
        block_config=dict(
            dim=D, heads=reference.num_heads, mlp_ratio=4, window_size=(14, 14), relative_embedding_size=grid
        ),
        depth=len(reference.blocks),
        position_encoding_size=grid,
        input_size=grid,
        window_indices=WINDOW_BLOCKS,
    ).eval()
    with torch.no_grad():
        backbone.position_encoding.encoding.copy_(reference.pos_embed.reshape(1, -1, D))
        for theirs, mine in zip(backbone.blocks, reference.blocks):
            pairs = [
                (theirs.input_layer_norm, mine.norm1),
                (theirs.qkv, mine.attn.qkv),
                (theirs.projection, mine.attn.proj),
                (theirs.mlp_layer_norm, mine.norm2),
                (theirs.mlp_1, mine.mlp.fc1),
                (theirs.mlp_2, mine.mlp.fc2),
            ]
            for a, b in pairs:
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
            theirs.relative_position.y_embedding.copy_(mine.attn.rel_pos_h)
            theirs.relative_position.x_embedding.copy_(mine.attn.rel_pos_w)
    return PaperBackbone(reference.patch_embed, backbone, grid).eval()


def profile(name: str, model: torch.nn.Module, clip: list[torch.Tensor], rows: int = 14) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in clip[:2]:
            model(x)
    print(f"\n## {name}: top ops by self CPU time over {min(2, len(clip))} frames")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def time_blocks(models: dict[str, torch.nn.Module], grid: tuple[int, int], reps: int) -> list[str]:
    """Median and min of block 0 (windowed) and block 2 (global) of every model, interleaved."""
    x = torch.randn(1, *grid, 768)
    cases = {}
    for i, kind in ((0, "windowed"), (2, "global")):
        for name, model in models.items():
            if isinstance(model, PaperBackbone):
                cases[(kind, name)] = (model.backbone.blocks[i], x.reshape(1, -1, 768))
            else:
                cases[(kind, name)] = (model.blocks[i], x)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for block, inp in cases.values():
            block(inp)
        for i in range(reps):
            keys = list(cases)
            for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
                block, inp = cases[key]
                t0 = time.perf_counter()
                block(inp)
                times[key].append(time.perf_counter() - t0)
    lines = []
    for kind in ("windowed", "global"):
        best = min(statistics.median(t) for (k, _), t in times.items() if k == kind)
        for (k, name), t in times.items():
            if k == kind:
                med = statistics.median(t)
                lines.append(
                    f"| {grid[0] * 16} | {kind} block, {name} | {med * 1e3:.1f} | "
                    f"{min(t) * 1e3:.1f} | {med / best:.2f} |"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="672,1024", help="comma-separated image sizes (default 672,1024)")
    parser.add_argument("--frames", type=int, default=8, help="timed frames per size (default 8)")
    parser.add_argument("--variants", default="explicit,sdpa", help="our attention variants")
    parser.add_argument("--paper", default=None, help="path to a checkout of WISION-Lab/eventful-transformer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print the top ops of every model")
    parser.add_argument(
        "--block-reps",
        type=int,
        default=0,
        help="also time block 0 (windowed) and block 2 (global) alone, this many rounds",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, backbone only")
    lines = [
        "| size | model | median s | min-max s | vs fastest | max abs diff vs first |",
        "|---|---|---|---|---|---|",
    ]
    block_lines = ["| size | block | median ms | min ms | vs fastest |", "|---|---|---|---|---|"]
    for size in (int(s) for s in args.sizes.split(",")):
        clip = list(frames("bigbuckbunny", size=size, patch_size=16, max_frames=args.frames + 1, fit="pad"))
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        first = ours(size, variants[0])
        state = first.state_dict()
        models = {f"evtrace {variants[0]}": first}
        for v in variants[1:]:
            models[f"evtrace {v}"] = ours(size, v, state)
        if args.paper:
            models["paper"] = paper(args.paper, first)
        names = list(models)
        with torch.no_grad():
            outs = {n: m(clip[0]) for n, m in models.items()}  # warm-up, and the agreement check
            diffs = {n: (outs[n] - outs[names[0]]).abs().max().item() for n in names}
            times: dict[str, list[float]] = {n: [] for n in names}
            for i, x in enumerate(clip[1:]):
                order = names[i % len(names) :] + names[: i % len(names)]
                for n in order:
                    t0 = time.perf_counter()
                    models[n](x)
                    times[n].append(time.perf_counter() - t0)
                print(f"{size} frame {i}: " + ", ".join(f"{n} {times[n][-1]:.3f}" for n in names), flush=True)
        medians = {n: statistics.median(t) for n, t in times.items()}
        best = min(medians.values())
        for n in names:
            lines.append(
                f"| {size} | {n} | {medians[n]:.3f} | {min(times[n]):.3f}-{max(times[n]):.3f} | "
                f"{medians[n] / best:.2f} | {diffs[n]:.1e} |"
            )
        if args.block_reps:
            block_lines += time_blocks(models, tuple(first.grid_size), args.block_reps)
        if args.profile:
            for n in names:
                profile(f"{size} {n}", models[n], clip[1:])
        del models, outs
    print("\n" + "\n".join(lines))
    if args.block_reps:
        print("\n" + "\n".join(block_lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
