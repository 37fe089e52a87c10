"""Many streams: batched StreamPool against the same streams one after another (issue 16).

    .venv/bin/python bench/streams.py [--streams 1 2 4 8 16] [--frames 10] [--model deit_tiny]
                                      [--r 49] [--ray] [--out out/streams]

S streams (bigbuckbunny at S different start frames, decoded beforehand), every stream a frame
per tick. Modes, per S:

* ``pool``: one ``evtrace.StreamPool`` of capacity S, one batched eventful forward per tick;
* ``sequential``: S eventful models (one per stream), called one after another each tick;
* ``dense batched``: the original model on the batch of S frames;
* ``dense sequential``: the original model per frame;
* ``ray 1`` / ``ray 2`` (``--ray``): ``RayStreamClient`` over 1 actor (2 threads) or 2 actors
  (1 thread each, capacity ceil(S/2)), ``submit_many`` per tick, on a local 2-CPU Ray cluster.

Throughput = frames / wall time over the steady ticks (the first two ticks, dense, are left
out). Latency of a frame = from the start of its tick (all S frames arrive together) to its
output: the tick time for the batched modes, the time until its turn is done for the
sequential ones. The four in-process modes run interleaved tick by tick (shared cores).
p50 / p99 over every steady frame. Also the idle-slot cost: a pool of capacity 8 with k
streams ticking (per idle mode), against a pool of capacity k. Writes ``streams.json`` and
``streams.png`` under ``--out`` and prints the markdown tables of docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evtrace  # noqa: E402
import models_zoo  # noqa: E402
from evtrace.graph.errors import LowSavingsWarning  # noqa: E402
from evtrace.tools.video import frames as decode  # noqa: E402

warnings.simplefilter("ignore", LowSavingsWarning)
WARMUP = 2


def clips(streams: int, frames: int, size: int) -> list[list[torch.Tensor]]:
    every = list(decode("bigbuckbunny", size=size, max_frames=min(132, 6 * streams + frames)))
    return [every[6 * s : 6 * s + frames] for s in range(streams)]


def summarise(name: str, streams: int, tick_times: list[float], latencies: list[float]) -> dict:
    steady_ticks = tick_times[WARMUP:]
    steady_lat = latencies[WARMUP * streams :]
    return {
        "mode": name,
        "streams": streams,
        "fps": streams * len(steady_ticks) / sum(steady_ticks),
        "p50_ms": 1e3 * float(np.percentile(steady_lat, 50)),
        "p99_ms": 1e3 * float(np.percentile(steady_lat, 99)),
    }


def batched(step):
    """A runner: one call for the tick's S frames; every frame's latency is the tick's."""

    def run(frames: dict) -> tuple[float, list[float]]:
        start = time.perf_counter()
        step(frames)
        dt = time.perf_counter() - start
        return dt, [dt] * len(frames)

    return run


def sequential(calls):
    """A runner: the S frames one after another; a frame's latency runs from the tick's start."""

    def run(frames: dict) -> tuple[float, list[float]]:
        start, lat = time.perf_counter(), []
        for call, frame in zip(calls, frames.values()):
            call(frame)
            lat.append(time.perf_counter() - start)
        return time.perf_counter() - start, lat

    return run


def interleaved(runners: dict, data) -> list[tuple[str, list[float], list[float]]]:
    """Every runner on tick t before any on tick t+1 (in a rotating order), so that the load of
    shared cores falls on all modes alike."""
    results = {name: ([], []) for name in runners}
    names = list(runners)
    for t in range(len(data[0])):
        frames = {s: data[s][t] for s in range(len(data))}
        for name in names[t % len(names) :] + names[: t % len(names)]:
            dt, lat = runners[name](frames)
            results[name][0].append(dt)
            results[name][1].extend(lat)
    return [(name, *results[name]) for name in names]


def bench_streams(model, x, policy, streams: int, data, use_ray: bool) -> list[dict]:
    rows = []
    with torch.no_grad():
        pool = evtrace.StreamPool(model, x, capacity=streams, policy=policy, scene_cut=False)
        for s in range(streams):
            pool.open(s)
        singles = [evtrace.transform(model, x, policy=policy, scene_cut=False) for _ in range(streams)]
        runners = {
            "pool": batched(pool.tick),
            "sequential": sequential(singles),
            "dense batched": batched(lambda frames: model(torch.cat(list(frames.values())))),
            "dense sequential": sequential([model] * streams),
        }
        for name, ticks, lat in interleaved(runners, data):
            rows.append(summarise(name, streams, ticks, lat))
        del pool, singles
    if use_ray:
        from evtrace.tools.ray_serving import RayStreamClient

        for actors in (1, 2):
            if actors > streams:
                continue
            capacity = math.ceil(streams / actors)
            threads = 2 // actors
            with RayStreamClient(
                model, x, actors=actors, capacity=capacity, policy=policy, threads=threads, scene_cut=False
            ) as client:
                for s in range(streams):
                    client.open(s)

                def step(frames, client=client):
                    futures = client.submit_many(frames)
                    for f in futures.values():
                        f.result(timeout=600)

                [(_, ticks, lat)] = interleaved({"ray": batched(step)}, data)
                rows.append(summarise(f"ray {actors}", streams, ticks, lat))
    return rows


def bench_idle(model, x, policy, data, capacity: int = 8) -> list[dict]:
    """Pools of ``capacity`` slots (one per idle mode) with k streams ticking and the others open
    and idle, against a pool of capacity k, interleaved tick by tick: median ms per tick."""
    rows = []
    with torch.no_grad():
        pools = {}
        for mode in ("mask", "restore", "none"):
            pools[mode] = evtrace.StreamPool(
                model, x, capacity=capacity, policy=policy, scene_cut=False, idle=mode
            )
        for k in (1, 2, 4, 8):
            if k > capacity:
                continue
            small = evtrace.StreamPool(model, x, capacity=k, policy=policy, scene_cut=False)
            for s in range(k):
                small.open(s)
            for pool in pools.values():
                for s in pool.streams:
                    pool.close(s)
                for s in range(capacity):  # every stream starts again (dense)
                    pool.open(s)
                pool.tick({s: data[s][0] for s in range(capacity)})
            small.tick({s: data[s][0] for s in range(k)})
            runners = {f"capacity {k}": batched(small.tick)}
            runners |= {mode: batched(pool.tick) for mode, pool in pools.items()}
            row = {"active": k}
            for name, ticks, _ in interleaved(runners, [d[1:] for d in data[:k]]):
                row[name] = 1e3 * float(np.median(ticks))
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["mode"], r["streams"]): r for r in rows}
    streams = sorted({r["streams"] for r in rows})
    modes = [
        m
        for m in ("pool", "sequential", "dense batched", "dense sequential", "ray 1", "ray 2")
        if any((m, s) in by for s in streams)
    ]
    lines = ["| mode | " + " | ".join(f"S={s} fps (p50 / p99 ms)" for s in streams) + " |"]
    lines.append("|---|" + "---|" * len(streams))
    for m in modes:
        cells = []
        for s in streams:
            r = by.get((m, s))
            cells.append("-" if r is None else f"{r['fps']:.1f} ({r['p50_ms']:.0f} / {r['p99_ms']:.0f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    ratio = []
    for s in streams:
        if ("pool", s) in by and ("sequential", s) in by:
            ratio.append(f"S={s}: {by[('pool', s)]['fps'] / by[('sequential', s)]['fps']:.2f}x")
    lines.append("")
    lines.append("batched / sequential eventful throughput: " + ", ".join(ratio))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("pool", "sequential", "dense batched", "dense sequential", "ray 1", "ray 2"):
        pts = sorted((r["streams"], r["fps"], r["p99_ms"]) for r in rows if r["mode"] == mode)
        if not pts:
            continue
        s, fps, p99 = zip(*pts)
        axes[0].plot(s, fps, marker="o", label=mode)
        axes[1].plot(s, p99, marker="o", label=mode)
    for ax, label in zip(axes, ("throughput (frames/s)", "p99 latency per frame (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("streams")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("StreamPool: batched against one after another (CPU, 2 threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--model", default="deit_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--r", type=int, default=49)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ray", action="store_true")
    parser.add_argument("--no-idle", action="store_true")
    parser.add_argument("--out", default="out/streams")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(models_zoo, args.model)(img_size=args.size).eval()
    data_all = clips(max(*args.streams, 8), args.frames, args.size)
    x = data_all[0][0]
    policy = evtrace.TopK(args.r)
    em = evtrace.transform(model, x, policy=policy, scene_cut=False)
    dense_g, steady_g = evtrace.count_flops(model, x).gflops, evtrace.count_flops(em, x).gflops
    del em
    if args.ray:
        import ray

        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=200 * 1024**2,
            log_to_driver=False,
        )
    rows = []
    try:
        for s in args.streams:
            rows += bench_streams(model, x, policy, s, data_all[:s], args.ray)
            print(*(f"{r['mode']} S={s}: {r['fps']:.1f} fps" for r in rows if r["streams"] == s), flush=True)
    finally:
        if args.ray:
            import ray

            ray.shutdown()
    idle = [] if args.no_idle else bench_idle(model, x, policy, data_all[:8])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "model": args.model,
        "size": args.size,
        "r": args.r,
        "threads": args.threads,
        "frames": args.frames,
        "gflops dense": dense_g,
        "gflops eventful steady": steady_g,
        "rows": rows,
        "idle": idle,
    }
    (out / "streams.json").write_text(json.dumps(summary, indent=1))
    plot(rows, out / "streams.png")
    print(f"\n{args.model} {args.size} px, TopK({args.r}), FLOP ratio {dense_g / steady_g:.2f}x\n")
    print(table(rows))
    by = {(r["mode"], r["streams"]): r for r in rows}
    for s in args.streams:
        if ("pool", s) in by and ("dense batched", s) in by:
            speed = by[("pool", s)]["fps"] / by[("dense batched", s)]["fps"]
            print(
                f"S={s}: batched eventful / batched dense {speed:.2f}x = {speed / (dense_g / steady_g):.2f} "
                "of the FLOP ratio"
            )
    if idle:
        print("\n| streams ticking | pool of capacity k | capacity 8, idle='mask' | 'restore' | 'none' |")
        print("|---|---|---|---|---|")
        for r in idle:
            k = r["active"]
            print(
                f"| {k} | {r[f'capacity {k}']:.1f} | {r['mask']:.1f} | {r['restore']:.1f} | {r['none']:.1f} |"
            )


if __name__ == "__main__":
    main()
