"""State safety: rejected frames leave the state bit-identical, a frame that raises midway never
leaves a half-updated state behind, copies and threads never share state, weights are shared
with the original model (unless copied on request) and round-trip through state_dict."""

import copy
import threading

import pytest
import torch

import evtrace
from tests.models import real_frames, small_vit

FRAMES = real_frames(64, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(emodel) -> dict:
    """Every state buffer (cloned) and the Python-side stream counters."""
    state = {name: b.clone() for name, b in emodel.named_buffers()}
    state["frames_since_refresh"] = emodel.frames_since_refresh
    state["refreshes"] = emodel.refreshes
    state["previous"] = None if emodel._previous is None else [p.clone() for p in emodel._previous]
    state["fresh"] = [r.fresh for r in emodel.regions().values()]
    return state


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[name]), name  # bit-identical
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            assert all(torch.equal(a, b) for a, b in zip(value, after[name])), name
        else:
            assert value == after[name], name


def _run(emodel, frames):
    with torch.no_grad():
        return [emodel(f) for f in frames]


@pytest.fixture
def model():
    return small_vit()[0]


@pytest.fixture
def stream(model):
    """A stream three frames in, with scene-cut detection and periodic refresh on (their state
    is part of what must stay unchanged)."""
    emodel = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5), scene_cut=5.0, refresh_every=50)
    _run(emodel, FRAMES[:3])
    return emodel


# ----------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("batch", [1, 2])
def test_non_finite_frames_are_rejected_before_any_state_changes(model, bad, batch):
    first = torch.cat([FRAMES[0]] * batch)
    emodel = evtrace.transform(model, first, policy=evtrace.TopK(5), scene_cut=5.0)
    _run(emodel, [torch.cat([f] * batch) for f in FRAMES[:3]])
    twin = copy.deepcopy(emodel)  # the same stream, never shown the bad frame
    before = _snapshot(emodel)
    frame = torch.cat([FRAMES[3]] * batch)
    frame[batch - 1, 1, 10, 20] = bad  # one value, in the last stream only
    with pytest.raises(
        evtrace.NonFiniteInputError,
        match=r"input 0 holds NaN or Inf values; the frame was "
        r"rejected and the stream state is unchanged",
    ):
        emodel(frame)
    _assert_same(before, _snapshot(emodel))
    # the stream goes on exactly as if the frame had never been sent
    rest = [torch.cat([f] * batch) for f in FRAMES[3:6]]
    for got, want in zip(_run(emodel, rest), _run(twin, rest)):
        assert torch.equal(got, want)


def test_a_frame_of_another_size_is_rejected_before_any_state_changes(model):
    emodel = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5), on_input_change="raise")
    _run(emodel, FRAMES[:3])
    before = _snapshot(emodel)
    with pytest.raises(evtrace.InputMismatchError, match="differs from the one the state was built for"):
        emodel(torch.zeros(1, 3, 80, 80))
    with pytest.raises(evtrace.InputMismatchError, match="differs from the one the state was built for"):
        emodel(FRAMES[3].double())
    _assert_same(before, _snapshot(emodel))


# ----------------------------------------------------------------------------- exceptions mid-frame


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [_Boom, KeyboardInterrupt])
def test_an_exception_mid_frame_never_leaves_a_half_updated_state(model, stream, error):
    # the hook fails in the last attention site: the earlier regions have already updated
    # their references and buffers for this frame when it raises
    last = list(stream.attention_modules().values())[-1]
    before = _snapshot(stream)
    handle = last.register_forward_hook(lambda *args: (_ for _ in ()).throw(error("user hook failed")))
    with pytest.raises(error, match="user hook failed"):
        stream(FRAMES[3])
    handle.remove()
    after = {k: v for k, v in _snapshot(stream).items() if isinstance(v, torch.Tensor)}
    assert any(not torch.equal(before[k], v) for k, v in after.items())  # it was half-updated...
    assert all(stream.regions()[name].fresh for name in stream.regions())  # ...and refused
    assert all(m._needs_init for m in stream.attention_modules().values())
    # the next frame is a dense first frame: equal to the original, then a fresh stream's frames
    fresh = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5), scene_cut=5.0, refresh_every=50)
    got, want = _run(stream, FRAMES[3:7]), _run(fresh, FRAMES[3:7])
    with torch.no_grad():
        torch.testing.assert_close(got[0], model(FRAMES[3]), atol=1e-5, rtol=1e-4)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_reset_after_an_exception_gives_a_usable_stream(model, stream):
    region = list(stream.regions().values())[1]
    handle = region.register_forward_pre_hook(lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        stream(FRAMES[3])
    handle.remove()
    stream.reset()
    fresh = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5), scene_cut=5.0, refresh_every=50)
    for g, w in zip(_run(stream, FRAMES[2:6]), _run(fresh, FRAMES[2:6])):
        assert torch.equal(g, w)


# ----------------------------------------------------------------------------- copies and threads


def _buffer_storage(emodel) -> set[int]:
    return {b.untyped_storage().data_ptr() for b in emodel.buffers() if b.numel()}


def test_two_transforms_of_one_model_share_weights_but_never_state(model):
    a = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5))
    b = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5))
    assert not _buffer_storage(a) & _buffer_storage(b)
    assert (
        {id(p) for p in a.parameters()}
        == {id(p) for p in b.parameters()}
        == {id(p) for p in model.parameters()}
    )
    flipped = [f.flip(-1) for f in FRAMES]
    interleaved_a, interleaved_b = [], []
    with torch.no_grad():
        for x, y in zip(FRAMES, flipped):
            interleaved_a.append(a(x))
            interleaved_b.append(b(y))
    alone_a = _run(evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5)), FRAMES)
    alone_b = _run(evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5)), flipped)
    for got, want in zip(interleaved_a + interleaved_b, alone_a + alone_b):
        assert torch.equal(got, want)


def test_deepcopy_continues_the_stream_then_runs_independently(model, stream):
    twin = copy.deepcopy(stream)
    assert not _buffer_storage(twin) & _buffer_storage(stream)
    assert not {p.data_ptr() for p in twin.parameters()} & {p.data_ptr() for p in model.parameters()}
    with torch.no_grad():
        assert torch.equal(twin(FRAMES[3]), stream(FRAMES[3]))  # the state was copied
        twin(FRAMES[7].flip(-1))  # the copy diverges...
        twin.set_policy(2)
    reference = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5), scene_cut=5.0, refresh_every=50)
    # ...and the original stream goes on as if the copy did not exist
    for got, want in zip(_run(stream, FRAMES[4:8]), _run(reference, FRAMES[:8])[4:]):
        assert torch.equal(got, want)
    assert stream.policy.r == 5


def test_two_threads_each_running_its_own_stream_match_the_single_threaded_run(model):
    streams = [FRAMES, [f.flip(-1) for f in FRAMES], [f.flip(-2) for f in FRAMES]]
    expected = [_run(evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5)), s) for s in streams]
    emodels = [evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5)) for _ in streams]
    results, errors = [None] * len(streams), []
    barrier = threading.Barrier(len(streams))

    def work(i):
        try:
            barrier.wait()
            out = []
            for _ in range(3):  # several passes: the threads overlap for many frames
                emodels[i].reset()
                out = _run(emodels[i], streams[i])
            results[i] = out
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- weights


def test_weights_are_shared_with_the_original_model(model):
    emodel = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5))
    assert {p.data_ptr() for p in emodel.parameters()} == {p.data_ptr() for p in model.parameters()}
    with torch.no_grad():
        model.head.weight.mul_(2.0)  # an in-place change is seen by the eventful model
        emodel.reset()
        torch.testing.assert_close(emodel(FRAMES[0]), model(FRAMES[0]), atol=1e-5, rtol=1e-4)


def test_copy_weights_gives_the_eventful_model_its_own_weights(model):
    emodel = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5), copy_weights=True)
    assert not {p.data_ptr() for p in emodel.parameters()} & {p.data_ptr() for p in model.parameters()}
    with torch.no_grad():
        before = emodel(FRAMES[0])
        model.head.weight.mul_(2.0)
        emodel.reset()
        assert torch.equal(emodel(FRAMES[0]), before)
    with pytest.raises(TypeError, match="copy_weights must be a bool"):
        evtrace.transform(model, FRAMES[0], copy_weights="yes")


def test_state_dict_holds_the_original_weights_and_no_stream_state(model, stream):
    state = stream.state_dict()
    assert list(state) == list(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any("evtrace" in k for k in state)
    # nested in a larger module the keys carry its prefix
    holder = torch.nn.ModuleDict({"eventful": stream})
    assert list(holder.state_dict()) == [f"eventful.{k}" for k in model.state_dict()]


def test_state_dict_loads_into_a_fresh_transform_of_the_same_model(model, stream):
    other, _ = small_vit()  # same architecture, other weights
    torch.nn.init.normal_(other.head.weight)
    fresh = evtrace.transform(other, FRAMES[0], policy=evtrace.TopK(5), scene_cut=5.0, refresh_every=50)
    _run(fresh, FRAMES[:2])
    assert fresh.load_state_dict(stream.state_dict()) is not None
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    # loading reset the stream: it now runs exactly as the source model's stream from a reset
    stream.reset()
    for got, want in zip(_run(fresh, FRAMES[3:7]), _run(stream, FRAMES[3:7])):
        assert torch.equal(got, want)
    # the original model and a nested eventful model take it too
    model.load_state_dict(fresh.state_dict())
    holder = torch.nn.ModuleDict({"eventful": fresh})
    holder.load_state_dict({f"eventful.{k}": v for k, v in model.state_dict().items()})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("head.bias"), r"missing keys: head\.bias"),
        (lambda sd: sd.__setitem__("head.extra", torch.zeros(1)), r"unexpected keys: head\.extra"),
        (
            lambda sd: sd.__setitem__("head.weight", torch.zeros(3, 3)),
            r"size mismatch for head\.weight: \(3, 3\) given",
        ),
    ],
)
def test_a_bad_state_dict_loads_nothing(model, stream, edit, message):
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    edit(state)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before = _snapshot(stream)
    with pytest.raises(RuntimeError, match=message + r".*Nothing was loaded"):
        stream.load_state_dict(state)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    _assert_same(before, _snapshot(stream))


def test_assign_is_refused(model, stream):
    with pytest.raises(RuntimeError, match="assign=True would replace tensors"):
        stream.load_state_dict(model.state_dict(), assign=True)


# ----------------------------------------------------------------------------- one stream of a batch

STREAMS = [FRAMES, [f.flip(-1) for f in FRAMES], [f.flip(-2) for f in FRAMES]]


def _delta_always(emodel):
    """Exact sites at this tiny N recompute in full (it multiplies less): force the delta path,
    whose per-stream state is what a per-stream reset must keep apart."""
    for m in emodel.attention_modules().values():
        if hasattr(m, "full_when_cheaper"):
            m.full_when_cheaper = False
    return emodel


def _single(model, frames, attention, delta, policy=5):
    emodel = evtrace.transform(model, frames[0], policy=evtrace.TopK(policy), attention=attention)
    return _run(_delta_always(emodel) if delta else emodel, frames)


def _batched(model, attention, delta, reset_at=None, stream=1):
    emodel = evtrace.transform(
        model, torch.cat([s[0] for s in STREAMS]), policy=evtrace.TopK(5), attention=attention
    )
    if delta:
        _delta_always(emodel)
    outs = []
    with torch.no_grad():
        for i in range(len(FRAMES)):
            if i == reset_at:
                emodel.reset(stream=stream)
            outs.append(emodel(torch.cat([s[i] for s in STREAMS])))
    return outs


@pytest.mark.parametrize(
    "attention, delta", [("exact", True), ("exact", False), ("paper", False), ("dense", False)]
)
def test_reset_of_one_stream_of_a_batch_leaves_the_others_bit_identical(model, attention, delta):
    restart = 3
    outs = _batched(model, attention, delta, reset_at=restart)
    untouched = _batched(model, attention, delta)
    for i, (got, want) in enumerate(zip(outs, untouched)):
        # streams 0 and 2: bit for bit the batch run without the reset...
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), f"frame {i}"
    # ...and their single-stream runs to float rounding (a batch GEMM rounds differently)
    for b in (0, 2):
        for i, (got, want) in enumerate(zip(outs, _single(model, STREAMS[b], attention, delta))):
            assert (got[b : b + 1] - want).abs().max() <= 1e-6, f"stream {b}, frame {i}"
    # stream 1 equals a fresh single stream started at the reset frame (its first frame dense)
    fresh = _single(model, STREAMS[1][restart:], attention, delta)
    for i, (got, want) in enumerate(zip(outs[restart:], fresh)):
        assert (got[1:2] - want).abs().max() <= 1e-6, f"stream 1, frame {restart + i}"
    with torch.no_grad():
        torch.testing.assert_close(outs[restart][1:2], model(STREAMS[1][restart]), atol=1e-5, rtol=1e-4)


def test_reset_of_one_stream_on_a_windowed_model():
    """ViTDet: windowed regions (rows of a stream spread over window rows, padding) and a global
    site with relative position."""
    from tests.models import small_vitdet

    model, _ = small_vitdet(img_size=64, window_size=2, global_blocks=(1,), depth=2)
    frames = real_frames(64, 6)
    streams = [frames, [f.flip(-1) for f in frames]]
    emodel = _delta_always(evtrace.transform(model, torch.cat([frames[0]] * 2), policy=evtrace.TopK(4)))
    outs = []
    with torch.no_grad():
        for i in range(6):
            if i == 2:
                emodel.reset(stream=0)
            outs.append(emodel(torch.cat([s[i] for s in streams])))
    keep = _run(_delta_always(evtrace.transform(model, frames[0], policy=evtrace.TopK(4))), streams[1])
    fresh = _run(_delta_always(evtrace.transform(model, frames[0], policy=evtrace.TopK(4))), frames[2:])
    outs, keep, fresh = (
        [torch.cat([t.flatten(1) for t in y.values()], dim=1) for y in ys] for ys in (outs, keep, fresh)
    )
    for got, want in zip(outs, keep):
        torch.testing.assert_close(got[1:], want, atol=1e-6, rtol=1e-5)
    for got, want in zip(outs[2:], fresh):
        torch.testing.assert_close(got[:1], want, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- policies across variants


def test_policies_and_overrides_follow_the_model_to_every_variant(model):
    emodel = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5))
    gates = sorted(emodel.regions())
    emodel.set_policy(3)
    emodel.set_policy(evtrace.TopK(7), gates="blocks.1")
    want = {name: r.gate.policy for name, r in emodel.regions().items()}
    assert {repr(p) for p in want.values()} == {"TopK(r=3)", "TopK(r=7)"}
    report = str(emodel.report())
    assert "TopK(r=3)" in report and "TopK(r=7)" in report and "TopK(r=5)" not in report
    pair = torch.cat([FRAMES[0], FRAMES[1]])
    with torch.no_grad():
        emodel(FRAMES[0])
        emodel(pair)  # a new variant is built: it takes the policies in force
        assert {n: r.gate.policy for n, r in emodel.regions().items()} == want
        emodel.set_policy(evtrace.TopK(2), gates=gates[0])  # changed on the batch-2 variant...
        emodel(FRAMES[0])  # ...and carried back to the cached batch-1 variant
        want[gates[0]] = emodel.regions()[gates[0]].gate.policy
        assert {n: r.gate.policy for n, r in emodel.regions().items()} == want
        assert repr(want[gates[0]]) == "TopK(r=2)"
        emodel.set_policy(4)  # a global policy replaces every override, in every variant
        emodel(pair)
        assert {repr(r.gate.policy) for r in emodel.regions().values()} == {"TopK(r=4)"}
        assert "TopK(r=4)" in str(emodel.report())


# ----------------------------------------------------------------------------- inference mode


@pytest.mark.parametrize("where", ["transform", "switch"])
def test_state_made_in_inference_mode_works_outside_it(model, where):
    normal = _run(evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5)), FRAMES[:6])
    if where == "transform":
        with torch.inference_mode():
            emodel = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5))
            first = [emodel(f) for f in FRAMES[:2]]
    else:
        emodel = evtrace.transform(model, torch.cat([FRAMES[0]] * 2), policy=evtrace.TopK(5))
        with torch.inference_mode():  # a new batch size: a variant made in inference mode
            first = [emodel(f) for f in FRAMES[:2]]
    rest = _run(emodel, FRAMES[2:6])  # in-place updates of the state outside inference mode
    for got, want in zip(first + rest, normal):
        assert torch.equal(got, want)
    assert not any(b.is_inference() for b in emodel.buffers())
    emodel.reset()
    for got, want in zip(_run(emodel, FRAMES[:3]), normal):
        assert torch.equal(got, want)
    with torch.inference_mode():  # and back in
        emodel(FRAMES[3])


# ----------------------------------------------------------------------------- two threads, one model


def test_a_second_thread_calling_a_running_model_is_refused_and_nothing_breaks(model):
    emodel = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5))
    want = _run(evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5)), FRAMES[:5])
    _run(emodel, FRAMES[:2])
    inside, release = threading.Event(), threading.Event()
    region = list(emodel.regions().values())[-1]

    def hold(*args):  # the first thread stops midway through its frame
        inside.set()
        release.wait(10)

    handle = region.register_forward_pre_hook(hold)
    result = {}
    worker = threading.Thread(target=lambda: result.update(y=emodel(FRAMES[2])))
    worker.start()
    assert inside.wait(10)
    for call in (
        lambda: emodel(FRAMES[3]),
        emodel.reset,
        lambda: emodel.reset(stream=0),
        lambda: emodel.set_policy(2),
    ):
        with pytest.raises(
            RuntimeError,
            match="EventfulModel is already running a frame in another thread; .* nothing changed",
        ):
            call()
    release.set()
    worker.join()
    handle.remove()
    assert emodel.policy.r == 5
    outs = [result["y"]] + _run(emodel, FRAMES[3:5])
    for got, w in zip(outs, want[2:]):
        assert torch.equal(got, w)


def test_a_copy_of_a_model_has_its_own_lock(model, stream):
    twin = copy.deepcopy(stream)
    assert twin._lock is not stream._lock
    with stream._lock:  # held by this thread: the same thread may still call (a hook resetting)
        stream.reset()
    twin(FRAMES[3])


# ----------------------------------------------------------------------------- non-finite inside


def _poisoned(frame, stream=0):
    frame = frame.clone()
    frame[stream, :, :16, :16] = 3e38  # finite, but the patch embedding overflows
    return frame


@pytest.mark.parametrize("attention", ["exact", "paper"])
def test_a_finite_frame_that_overflows_inside_is_refused_and_the_stream_restarts(model, attention):
    emodel = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5), attention=attention)
    _run(emodel, FRAMES[:3])
    with pytest.raises(
        evtrace.NonFiniteInputError,
        match=r"produced NaN or Inf values inside the model in stream\(s\) \[0\].*the stream was reset",
    ) as info:
        emodel(_poisoned(FRAMES[3]))
    assert info.value.streams == [0]
    assert all(r.fresh for r in emodel.regions().values())
    assert all(m._needs_init for m in emodel.attention_modules().values())
    # never a poisoned stream: the next frames are those of a fresh stream, finite, the first dense
    fresh = _run(
        evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5), attention=attention), FRAMES[4:8]
    )
    got = _run(emodel, FRAMES[4:8])
    for g, w in zip(got, fresh):
        assert torch.equal(g, w)
    with torch.no_grad():
        torch.testing.assert_close(got[0], model(FRAMES[4]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["exact", "paper"])
def test_an_overflow_in_one_stream_of_a_batch_restarts_that_stream_only(model, attention):
    pair = [torch.cat([a, b]) for a, b in zip(STREAMS[0], STREAMS[1])]
    emodel = evtrace.transform(model, pair[0], policy=evtrace.TopK(5), attention=attention)
    clean = evtrace.transform(model, pair[0], policy=evtrace.TopK(5), attention=attention)
    _run(emodel, pair[:3]), _run(clean, pair[:3])
    with pytest.raises(
        evtrace.NonFiniteInputError, match=r"stream\(s\) \[1\] were reset; the other streams took the frame"
    ) as info:
        emodel(_poisoned(pair[3], stream=1))
    assert info.value.streams == [1]
    assert torch.equal(info.value.output[0], clean(pair[3])[0])  # stream 0 took the frame
    rest = _run(emodel, pair[4:8])
    for i, (got, want) in enumerate(zip(rest, _run(clean, pair[4:8]))):
        assert torch.equal(got[0], want[0]), f"stream 0, frame {4 + i}"
    fresh = _single(model, STREAMS[1][4:8], attention, delta=False)
    for got, want in zip(rest, fresh):
        assert (got[1:] - want).abs().max() <= 1e-6


# ----------------------------------------------------------------------------- bounded variant cache


def test_the_variant_cache_is_a_bounded_lru(model):
    emodel = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5))
    with torch.no_grad():
        for b in range(1, 25):
            emodel(torch.cat([FRAMES[0]] * b))
    assert len(emodel._variants) == 8
    assert [sig[0][0][0] for sig in emodel._variants] == list(range(17, 25))
    small = evtrace.transform(model, FRAMES[0], policy=evtrace.TopK(5), max_variants=2)
    with torch.no_grad():
        for b in (1, 2, 1, 3):  # 1 was used after 2: 2 is the least recently used
            small(torch.cat([FRAMES[0]] * b))
    assert [sig[0][0][0] for sig in small._variants] == [1, 3]
    with pytest.raises(ValueError, match="not.*built|evicted"):
        small.graph_module_for(torch.cat([FRAMES[0]] * 2))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_variants must be an int >= 1"):
            evtrace.transform(model, FRAMES[0], max_variants=bad)
