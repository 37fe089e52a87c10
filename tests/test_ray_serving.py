"""Streams over Ray actors (evtrace.tools.ray_serving, issue 16), on a local Ray cluster that
this file starts (2 CPUs, loopback, no dashboard) and shuts down at the end. Skipped with the
reason when Ray is not installed (``pip install 'evtrace[ray]'``).

Every result is compared with the stream run alone through its own ``evtrace.transform``;
after an actor is killed, its streams restart densely on another actor at their next lost
frame (flagged), and from there equal a fresh single run started at that frame.
"""

import sys
import time

import pytest
import torch

import evtrace
from evtrace.graph.errors import InputMismatchError, NonFiniteInputError
from evtrace.serving import ClosedStreamError, UnknownStreamError
from evtrace.tools.video import CLIPS, frames
from tests.models import small_vit

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'evtrace[ray]'")

from evtrace.tools import ray_serving  # noqa: E402  (after the skip)

TOL = 1e-5
LIMIT_S = 240  # the whole file, cluster start included

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::evtrace.graph.errors.LowSavingsWarning"),
]


@pytest.fixture(scope="module")
def cluster():
    start = time.monotonic()
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=100 * 1024**2,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
    assert time.monotonic() - start < LIMIT_S


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return small_vit()


def clip(seed: int, n: int, x: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    frame = torch.randn(x.shape, generator=g)
    out = [frame]
    for _ in range(n - 1):
        frame = frame + 0.3 * torch.randn(x.shape, generator=g) * (torch.rand(x.shape, generator=g) < 0.2)
        out.append(frame)
    return out


def alone(model, x, stream: list[torch.Tensor], policy=4, start: int = 0) -> list[torch.Tensor]:
    """The stream run alone from frame ``start`` (a fresh transform: its first frame dense)."""
    em = evtrace.transform(model, x, policy=policy)
    return [em(f) for f in stream[start:]]


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_streams_over_two_actors_equal_single_runs(cluster, vit):
    model, x = vit
    streams = {s: clip(s, 5, x) for s in range(4)}
    own = {1: evtrace.Threshold(0.3, relative=True), 2: evtrace.FixedCapacityThreshold(0.2, 6, relative=True)}
    with ray_serving.RayStreamClient(model, x, actors=2, capacity=2, policy=4) as client:
        for s in streams:
            client.open(s, policy=own.get(s))
        assert sorted(client.actor_of(s) for s in streams) == [0, 0, 1, 1]  # least loaded, sticky
        got = {s: [] for s in streams}
        for t in range(5):
            if t == 2:  # single-stream submits too
                futures = {s: client.submit(s, streams[s][t]) for s in streams}
            else:
                futures = client.submit_many({s: streams[s][t] for s in streams})
            for s, future in futures.items():
                result = future.result(timeout=60)
                assert result.index == t and not result.restarted and result.dense == (t == 0)
                got[s].append(result.output)
        for s, stream in streams.items():
            for t, expected in enumerate(alone(model, x, stream, policy=own.get(s, 4))):
                assert rel(got[s][t], expected) <= TOL, (s, t)
        # bad input: a clear error, nothing sent, the other streams go on
        with pytest.raises(UnknownStreamError):
            client.submit("nope", x)
        with pytest.raises(InputMismatchError, match="nothing was sent"):
            client.submit(0, x[..., :32, :32])
        with pytest.raises(NonFiniteInputError):
            client.submit(0, torch.full_like(x, float("nan")))
        client.close(3)
        with pytest.raises(ClosedStreamError):
            client.submit(3, x)
        assert client.submit(0, streams[0][4]).result(timeout=60).output.shape == got[0][0].shape


def test_killed_actor_restarts_its_streams_never_a_wrong_frame(cluster, vit):
    model, x = vit
    n = 7
    streams = {s: clip(10 + s, n, x) for s in range(4)}
    with ray_serving.RayStreamClient(model, x, actors=2, capacity=2, policy=4) as client:
        for s in streams:
            client.open(s)
        victim = client.actors[0]
        moved = [s for s in streams if client.actor_of(s) == 0]
        results = {s: [] for s in streams}
        for t in range(n):
            futures = client.submit_many({s: streams[s][t] for s in streams})
            if t == 3:
                ray.kill(victim)  # mid-stream, frame 3 possibly still running
            for s, future in futures.items():
                results[s].append(future.result(timeout=120))
        assert client.live_actors and 0 not in client.live_actors
        for s, stream in streams.items():
            flags = [r.restarted for r in results[s]]
            if s not in moved:
                assert not any(flags) and client.restarts(s) == 0
                for r, expected in zip(results[s], alone(model, x, stream)):
                    assert rel(r.output, expected) <= TOL
                continue
            assert sum(flags) == 1 and client.restarts(s) == 1, flags
            k = flags.index(True)
            assert k in (3, 4) and results[s][k].dense
            before, after = alone(model, x, stream)[:k], alone(model, x, stream, start=k)
            for r, expected in zip(results[s], before + after):
                assert rel(r.output, expected) <= TOL, (s, r.index, k)


def test_archive_matches_per_clip_runs(cluster, vit, tmp_path):
    model, x = vit
    names = ["carphone", "carphone_distorted", "bikes"]
    assert all(name in CLIPS for name in names)
    results = ray_serving.process_archive(
        model, names, tmp_path, size=64, max_frames=4, actors=2, capacity=2, policy=4
    )
    assert [r.frames for r in results] == [4, 4, 4]
    for name, result in zip(names, results):
        saved = torch.load(result.out, weights_only=False)
        assert saved["restarted"] == [] and len(saved["outputs"]) == 4
        expected = alone(model, x, list(frames(name, size=64, max_frames=4)))
        for got, want in zip(saved["outputs"], expected):
            assert rel(got, want) <= TOL, name


def test_archive_queues_files_beyond_capacity(cluster, vit, tmp_path):
    model, x = vit
    names = ["carphone", "bikes", "carphone_distorted"]
    results = ray_serving.process_archive(
        model, names, tmp_path, size=64, max_frames=2, actors=1, capacity=2, policy=4
    )
    assert [r.frames for r in results] == [2, 2, 2]


def test_ray_missing_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'evtrace\[ray\]'") as info:
        ray_serving.RayStreamClient(torch.nn.Identity(), torch.zeros(1, 3, 8, 8))
    assert "\n" not in str(info.value)
