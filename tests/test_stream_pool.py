"""evtrace.StreamPool: many streams in the slots of one batched eventful model (issue 16).

The property: whatever the interleaving of opens, closes, ticks over any subset of the open
streams and per-stream policy changes, every stream's outputs equal that stream run alone
through its own ``evtrace.transform`` (<= 1e-5 relative). Plus idle slots, per-stream refresh,
scene cuts and policies, and the bad inputs (each a clear error, no stream changed).
"""

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import evtrace
from evtrace.graph.errors import InputMismatchError, NonFiniteInputError, NonFiniteStateError
from evtrace.runtime.policies import AdaptiveBudget, FixedCapacityThreshold, Threshold, TopK
from evtrace.serving import ClosedStreamError, PoolFullError, StreamPolicies, UnknownStreamError
from tests.models import small_vit

TOL = 1e-5
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::evtrace.graph.errors.LowSavingsWarning"),
]


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return small_vit()


def clip(seed: int, frames: int, x: torch.Tensor) -> list[torch.Tensor]:
    """A stream: a random picture, then per frame a few patches move and a little noise."""
    g = torch.Generator().manual_seed(seed)
    frame = torch.randn(x.shape, generator=g)
    out = [frame.clone()]
    for _ in range(frames - 1):
        frame = frame.clone()
        for _ in range(3):
            i, j = (int(v) * 16 for v in torch.randint(0, x.shape[-1] // 16, (2,), generator=g))
            frame[..., i : i + 16, j : j + 16] += torch.randn(1, 3, 16, 16, generator=g)
        frame += 0.02 * torch.randn(x.shape, generator=g)
        out.append(frame)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


class Alone:
    """A stream run alone: its own transform, fed the same frames, the same policy changes."""

    def __init__(self, model, x, policy, **options):
        self.model = evtrace.transform(model, x, policy=policy, **options)

    def __call__(self, frame):
        return self.model(frame)


POLICIES = [
    TopK(4),
    TopK(8),
    TopK(17),
    Threshold(0.5),
    Threshold(0.3, relative=True),
    FixedCapacityThreshold(0.2, capacity=6, relative=True),
]


@st.composite
def scripts(draw):
    """Opens, closes, ticks (any subset of the open streams) and policy changes."""
    steps = []
    for _ in range(draw(st.integers(6, 16))):
        kind = draw(st.sampled_from(["open", "open", "tick", "tick", "tick", "tick", "close", "policy"]))
        steps.append((kind, draw(st.integers(0, 3)), draw(st.lists(st.integers(0, 3), max_size=4))))
        if kind == "policy":
            steps[-1] = (kind, steps[-1][1], draw(st.integers(0, len(POLICIES) - 1)))
    refresh = draw(st.sampled_from([None, None, 3]))
    scene_cut = draw(st.booleans())
    default = draw(st.integers(0, len(POLICIES) - 1))
    return steps, refresh, scene_cut, default


@pytest.mark.parametrize("idle", ["mask", "restore"])
@FUZZ
@given(script=scripts())
def test_any_interleaving_equals_each_stream_alone(vit, idle, script):
    model, x = vit
    steps, refresh, scene_cut, default = script
    options = dict(refresh_every=refresh, scene_cut=scene_cut)
    pool = evtrace.StreamPool(model, x, capacity=3, policy=POLICIES[default], idle=idle, **options)
    alone: dict[int, Alone] = {}
    frames: dict[int, list] = {}
    lives = 0
    for kind, sid, arg in steps:
        if kind == "open" and sid not in alone and len(alone) < 3:
            pool.open(sid)
            lives += 1
            frames[sid] = clip(100 * lives + sid, 12, x)
            alone[sid] = Alone(model, x, POLICIES[default], **options)
        elif kind == "close" and sid in alone:
            pool.close(sid)
            del alone[sid]
        elif kind == "policy" and sid in alone:
            pool.set_policy(sid, POLICIES[arg])
            alone[sid].model.set_policy(POLICIES[arg])
        elif kind == "tick":
            chosen = sorted({s for s in arg if s in alone and frames[s]})
            out = pool.tick({s: frames[s][0] for s in chosen})
            assert sorted(out) == chosen
            for s in chosen:
                expected = alone[s](frames[s].pop(0))
                assert rel(out[s], expected) <= TOL, (s, kind, steps)
    # the open streams that are left run one more tick together
    live = [s for s in alone if frames[s]]
    out = pool.tick({s: frames[s][0] for s in live})
    for s in live:
        assert rel(out[s], alone[s](frames[s].pop(0))) <= TOL


@pytest.mark.parametrize("idle", ["mask", "restore"])
def test_idle_slots_keep_their_state(vit, idle):
    model, x = vit
    a, b = clip(1, 8, x), clip(2, 8, x)
    ref_a = Alone(model, x, 6)
    ref_b = Alone(model, x, 6)
    pool = evtrace.StreamPool(model, x, capacity=2, policy=6, idle=idle)
    pool.open("a")
    pool.open("b")
    for t in range(8):
        frames = {"a": a[t]} if t % 3 else {"a": a[t], "b": b[t // 3]}
        out = pool.tick(frames)
        assert rel(out["a"], ref_a(a[t])) <= TOL
        if "b" in out:
            assert rel(out["b"], ref_b(b[t // 3])) <= TOL


def test_without_mask_or_restore_idle_streams_drift(vit):
    """Masking or restoring is what keeps idle slots right: fed its last frame again, a TopK gate updates
    the tokens that were still stale, and the stream no longer equals its single run."""
    model, x = vit
    a = clip(3, 6, x)
    worst = 0.0
    pool = evtrace.StreamPool(model, x, capacity=2, policy=4, idle="none", scene_cut=False)
    ref = Alone(model, x, 4, scene_cut=False)
    pool.open("a")
    pool.open("b")
    pool.tick({"a": a[0], "b": a[0]})
    ref(a[0])
    for t in range(1, 6):
        pool.tick({"b": a[t]})  # "a" idle: fed its last frame
        worst = max(worst, rel(pool.tick({"a": a[t]})["a"], ref(a[t])))
    assert worst > 1e-3


def test_open_close_reuse_slot_first_frame_dense(vit):
    model, x = vit
    pool = evtrace.StreamPool(model, x, capacity=2, policy=4)
    a, c = clip(4, 5, x), clip(5, 3, x)
    ref_a = Alone(model, x, 4)
    pool.open("a")
    pool.open("b")
    pool.tick({"a": a[0], "b": a[0]})
    ref_a(a[0])
    pool.close("b")
    pool.open("c")  # takes b's slot: its first frame is dense, "a" continues
    out = pool.tick({"a": a[1], "c": c[0]})
    assert pool.info("c").last_dense and not pool.info("a").last_dense
    with torch.no_grad():
        assert rel(out["c"], model(c[0])) <= TOL  # the first frame is the original model's
    assert rel(out["a"], ref_a(a[1])) <= TOL


def test_per_stream_policies(vit):
    model, x = vit
    a, b = clip(6, 5, x), clip(7, 5, x)
    ref_a, ref_b = Alone(model, x, 4), Alone(model, x, Threshold(0.5))
    pool = evtrace.StreamPool(model, x, capacity=3, policy=4)
    pool.open("a")
    pool.open("b", policy=Threshold(0.5))
    assert isinstance(pool.model.policy, StreamPolicies)
    for t in range(5):
        out = pool.tick({"a": a[t], "b": b[t]})
        assert rel(out["a"], ref_a(a[t])) <= TOL
        assert rel(out["b"], ref_b(b[t])) <= TOL
    pool.set_policy("b", None)
    assert isinstance(pool.model.policy, TopK)  # back to the plain batched policy


def test_per_stream_refresh(vit):
    model, x = vit
    a = clip(8, 7, x)
    pool = evtrace.StreamPool(model, x, capacity=2, policy=4, refresh_every=3)
    pool.open("a")
    dense = []
    for t in range(7):
        pool.tick({"a": a[t]})
        dense.append(pool.info("a").last_dense)
    assert dense == [True, False, False, True, False, False, True]
    assert pool.info("a").refreshes == 2


def test_scene_cut_per_stream(vit):
    model, x = vit
    a, b = clip(9, 12, x), clip(10, 12, x)
    cut = clip(11, 1, x)[0] * 3
    pool = evtrace.StreamPool(model, x, capacity=2, policy=4)
    pool.open("a")
    pool.open("b")
    for t in range(11):
        pool.tick({"a": a[t], "b": b[t]})
    pool.tick({"a": cut, "b": b[11]})
    assert pool.info("a").scene_cuts == 1 and pool.info("a").last_dense
    assert pool.info("b").scene_cuts == 0 and not pool.info("b").last_dense


def test_bad_input_changes_no_stream(vit):
    model, x = vit
    a = clip(12, 4, x)
    ref = Alone(model, x, 4)
    pool = evtrace.StreamPool(model, x, capacity=2, policy=4)
    pool.open("a")
    pool.tick({"a": a[0]})
    ref(a[0])
    with pytest.raises(UnknownStreamError, match="unknown stream 'zz'"):
        pool.tick({"a": a[1], "zz": a[1]})
    with pytest.raises(InputMismatchError, match="pool serves frames of"):
        pool.tick({"a": a[1][..., :32, :32]})
    with pytest.raises(InputMismatchError, match="dtype"):
        pool.tick({"a": a[1].double()})
    with pytest.raises(NonFiniteInputError, match="NaN"):
        pool.tick({"a": torch.full_like(a[1], float("nan"))})
    with pytest.raises(TypeError, match="dict"):
        pool.tick([a[1]])
    pool.open("b")
    with pytest.raises(PoolFullError, match="all 2 slots"):
        pool.open("c")
    pool.close("b")
    with pytest.raises(ClosedStreamError, match="was closed"):
        pool.tick({"b": a[1]})
    with pytest.raises(ValueError, match="already open"):
        pool.open("a")
    with pytest.raises(TypeError, match="stateful policies"):
        pool.open("d", policy=AdaptiveBudget(0.25))
    with pytest.raises(ValueError, match="budget"):
        pool.open("d", policy=TopK(500))
    assert pool.streams == ["a"]
    for t in range(1, 4):  # nothing above touched stream a
        assert rel(pool.tick({"a": a[t]})["a"], ref(a[t])) <= TOL


def test_capacity_and_example_checks(vit):
    model, x = vit
    with pytest.raises(ValueError, match="capacity"):
        evtrace.StreamPool(model, x, capacity=0)
    with pytest.raises(TypeError, match="on_input_change"):
        evtrace.StreamPool(model, x, capacity=2, on_input_change="reset")
    pool = evtrace.StreamPool(model, x[0], capacity=2, policy=4)  # (C, H, W) example too
    assert pool.frame_shape == tuple(x.shape[1:])
    assert pool.state_bytes_per_stream() >= 0
    assert "capacity=2" in repr(pool)


def test_overflow_resets_that_stream_alone(vit):
    model, x = vit
    a, b = clip(13, 4, x), clip(14, 4, x)
    ref_b = Alone(model, x, 4)
    pool = evtrace.StreamPool(model, x, capacity=2, policy=4)
    pool.open("a")
    pool.open("b")
    out = pool.tick({"a": a[0], "b": b[0]})
    ref_b(b[0])
    bad = a[1].clone()
    bad[..., :16, :16] = 3e38
    with pytest.raises(NonFiniteStateError, match=r"streams \['a'\] were reset") as info:
        pool.tick({"a": bad, "b": b[1]})
    assert info.value.stream_ids == ["a"] and set(info.value.outputs) == {"b"}
    assert rel(info.value.outputs["b"], ref_b(b[1])) <= TOL
    out = pool.tick({"a": a[2], "b": b[2]})  # a restarts dense, b goes on
    assert pool.info("a").last_dense
    with torch.no_grad():
        assert rel(out["a"], model(a[2])) <= TOL
    assert rel(out["b"], ref_b(b[2])) <= TOL


@pytest.mark.parametrize(
    "default, own",
    [
        (Threshold(0.3, relative=True), None),
        (TopK(4), Threshold(0.3, relative=True)),
        (TopK(4), FixedCapacityThreshold(0.2, capacity=6, relative=True)),
        (FixedCapacityThreshold(0.2, capacity=6, relative=True), TopK(8)),
    ],
    ids=[
        "relative-default",
        "relative-own",
        "relative-fixed-capacity-own",
        "relative-fixed-capacity-default",
    ],
)
def test_relative_policies_in_a_pool_with_an_idle_slot(vit, default, own):
    """Relative thresholds need the reference norms: a pool with one (as the default or one
    stream's own), a free slot and a stream that skips ticks equals each stream alone."""
    model, x = vit
    a, b = clip(21, 8, x), clip(22, 8, x)
    ref_a, ref_b = Alone(model, x, default), Alone(model, x, own or default)
    pool = evtrace.StreamPool(model, x, capacity=3, policy=default)
    pool.open("a")
    pool.open("b", policy=own)
    fed_b = 0
    for t in range(8):
        frames = {"a": a[t]} if t in (3, 4) else {"a": a[t], "b": b[fed_b]}
        out = pool.tick(frames)
        assert not pool.info("a").last_dense or t == 0
        assert rel(out["a"], ref_a(a[t])) <= TOL, t
        if "b" in out:
            assert rel(out["b"], ref_b(b[fed_b])) <= TOL, t
            fed_b += 1
    assert pool.info("a").frames == 8 and pool.info("b").frames == 6


def test_idle_rows_stay_masked_when_the_streams_policies_differ(vit):
    """Different policies per stream go through one StreamPolicies selection: an idle row must
    select nothing there too (fed its last frame again, TopK would update its stale tokens)."""
    model, x = vit
    a, b = clip(23, 7, x), clip(24, 7, x)
    ref_a, ref_b = Alone(model, x, 4, scene_cut=False), Alone(model, x, Threshold(0.5), scene_cut=False)
    pool = evtrace.StreamPool(model, x, capacity=2, policy=4, scene_cut=False)
    pool.open("a")
    pool.open("b", policy=Threshold(0.5))
    pool.tick({"a": a[0], "b": b[0]})
    ref_a(a[0]), ref_b(b[0])
    for t in range(1, 7):
        out = pool.tick({"b": b[t]})  # "a" idle: its row holds a[t - 1] again
        assert rel(out["b"], ref_b(b[t])) <= TOL, t
        assert rel(pool.tick({"a": a[t]})["a"], ref_a(a[t])) <= TOL, t


def test_the_readme_pool_example_runs_and_equals_each_stream_alone():
    """The README's own example (its code block, as written), then steady ticks."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Serving many streams", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    model, frame = small_vit(img_size=112)  # 50 tokens: room for the example's TopK(49)
    x3, x7 = clip(31, 6, frame), clip(32, 6, frame)
    names = {"evtrace": evtrace, "model": model, "frame": frame, "x3": x3[0], "x7": x7[0]}
    exec(code, names)
    pool = names["pool"]
    assert pool.streams == ["cam-7"]
    ref = Alone(model, frame, Threshold(0.12, relative=True))
    ref(x7[0])
    for t in range(1, 6):
        out = pool.tick({"cam-7": x7[t]})
        assert not pool.info("cam-7").last_dense
        assert rel(out["cam-7"], ref(x7[t])) <= TOL, t
