"""A/B timings interleaved in one process (issue 17): two eventful configurations on the same
frames, stream by stream in turn, so that a shared machine's load hits both alike.

    python bench/interleaved.py hf-vs-zoo      # HF Dinov2Model against the zoo DINOv2-S, TopK(64)
    python bench/interleaved.py siblings       # HF q, k, v as one packed product, or three
    python bench/interleaved.py window-skip    # ViTDet-B: only the changed windows, or every one
    python bench/interleaved.py key-blocks     # ViTDet-B: the key update in 256-row blocks, or whole
    [--model vitdet_b_1024 --r 512] [--frames 12] [--repeats 3]

Prints the median steady-frame time of each side and their ratio (and, where the two sides
should compute the same thing, the largest output difference).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import evtrace
import passes.pack_linears as pack_linears
from evtrace.runtime.attention import ExactDeltaAttention, GroupedDeltaAttention
from evtrace.runtime.policies import TopK
from evtrace.tools.bench import MODELS, _clip_frames

#: A side: (model name, or "" for the experiment's model; a setup run before its transform and
#: before each of its streams).
Side = tuple[str, Callable[[], None]]


def _set(obj, name: str, value) -> Callable[[], None]:
    return lambda: setattr(obj, name, value)


def _nothing() -> None:
    pass


#: experiment -> (its model, its r, its two sides by label)
EXPERIMENTS: dict[str, tuple[str, int, dict[str, Side]]] = {
    "hf-vs-zoo": (
        "",
        64,
        {"zoo DINOv2-S": ("dinov2_s14", _nothing), "HF Dinov2Model": ("hf_dinov2_s14", _nothing)},
    ),
    "siblings": (
        "hf_dinov2_s14",
        64,
        {
            "q, k, v as one product": ("", _set(pack_linears, "GROUP_SIBLINGS", True)),
            "three products": ("", _set(pack_linears, "GROUP_SIBLINGS", False)),
        },
    ),
    "window-skip": (
        "vitdet_b",
        256,
        {
            "changed windows only": ("", _set(GroupedDeltaAttention, "skip_unchanged_groups", True)),
            "every window": ("", _set(GroupedDeltaAttention, "skip_unchanged_groups", False)),
        },
    ),
    "key-blocks": (
        "vitdet_b",
        256,
        {
            "blocks of 256 rows": ("", _set(ExactDeltaAttention, "key_chunk_rows", 256)),
            "one block": ("", _set(ExactDeltaAttention, "key_chunk_rows", 1 << 30)),
        },
    ),
}


def _output(y):
    return y.last_hidden_state if hasattr(y, "last_hidden_state") else y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--model", default=None, help="a model of evtrace.tools.bench.MODELS")
    p.add_argument("--r", type=int, default=None, help="TopK(r) at every gate")
    p.add_argument("--frames", type=int, default=12, help="steady frames per stream")
    p.add_argument("--repeats", type=int, default=3, help="streams per side, interleaved")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    default_model, default_r, sides = EXPERIMENTS[args.experiment]
    r = args.r or default_r
    built, frames, models = {}, {}, {}
    for label, (name, setup) in sides.items():
        name = name or args.model or default_model
        spec = MODELS[name]
        if name not in models:  # one model per name: random-weight zoo models differ per build
            models[name] = spec.build().eval()
        model = models[name]
        frames[label] = _clip_frames(spec, model, "bigbuckbunny", args.frames + 1)
        setup()
        built[label] = evtrace.transform(model, frames[label][0], policy=TopK(r))
    times: dict[str, list[float]] = {label: [] for label in sides}
    outputs: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for label, emodel in built.items():
                sides[label][1]()
                emodel.reset()
                outs = []
                for i, x in enumerate(frames[label]):
                    start = time.perf_counter()
                    y = emodel(x)
                    if i:
                        times[label].append(time.perf_counter() - start)
                    outs.append(_output(y).clone())
                outputs[label] = outs
    medians = {label: statistics.median(t) * 1000 for label, t in times.items()}
    (a, ta), (b, tb) = medians.items()
    print(f"{args.experiment}: TopK({r}), {args.frames} steady frames x {args.repeats} streams per side")
    for label, ms in medians.items():
        print(f"  {label:28s} {ms:8.1f} ms")
    print(f"  {b} / {a}: {tb / ta:.3f}")
    if args.experiment != "hf-vs-zoo":
        diff = max(float((x - y).abs().max()) for x, y in zip(outputs[a], outputs[b]))
        print(f"  largest output difference: {diff:.3g}")


if __name__ == "__main__":
    main()
