"""Checkpoints (issue 14, item 4): an eventful model pickles and ``torch.save``s with its stream;
``save_stream`` / ``load_stream`` move the stream alone into a model built the same way. A stream
saved at frame k and restored in a new process continues bit for bit as the uninterrupted one;
a checkpoint that does not fit raises and loads nothing."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import evtrace
from evtrace.tools.coverage import families, output_tensor

ROOT = Path(__file__).resolve().parents[1]
K, FRAMES = 4, 8


def _build(name: str, policy=8, batch: int = 1, **options):
    family = families()[name]
    model, example = family.build()
    example = example.expand(batch, *example.shape[1:]).contiguous()
    return family, evtrace.transform(model, example, policy=policy, **options)


def _run(emodel, clip):
    with torch.no_grad():
        return [output_tensor(emodel(x)).clone() for x in clip]


@pytest.mark.parametrize("name", ["zoo_vit", "hf_vit", "zoo_vitdet"])
def test_pickle_and_torch_save_continue_the_stream_bit_for_bit(name):
    family, emodel = _build(name, refresh_every=3)
    clip = family.real_inputs(FRAMES)
    _run(emodel, clip[:K])
    pickled = pickle.loads(pickle.dumps(emodel))
    buffer = io.BytesIO()
    torch.save(emodel, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy(emodel)
    expected = _run(emodel, clip[K:])
    for other in (pickled, loaded, copied):
        assert all(torch.equal(a, b) for a, b in zip(expected, _run(other, clip[K:])))
        assert other.refreshes == emodel.refreshes


def test_a_stream_saved_at_frame_k_continues_bit_for_bit_in_a_new_process(tmp_path):
    family, emodel = _build("zoo_vit", refresh_every=5)
    clip = family.real_inputs(FRAMES)
    _run(emodel, clip[:K])
    torch.save(emodel, tmp_path / "model.pt")
    emodel.save_stream(tmp_path / "stream.pt")
    torch.save(clip[K:], tmp_path / "frames.pt")
    expected = _run(emodel, clip[K:])
    script = textwrap.dedent(
        f"""
        import torch, evtrace
        from evtrace.tools.coverage import families, output_tensor
        d = {str(tmp_path)!r}
        clip = torch.load(d + "/frames.pt")
        whole = torch.load(d + "/model.pt", weights_only=False)
        model, example = families()["zoo_vit"].build()
        fresh = evtrace.transform(model, example, policy=8, refresh_every=5)
        fresh.load_stream(d + "/stream.pt")
        out = {{}}
        with torch.no_grad():
            for key, m in (("whole", whole), ("stream", fresh)):
                out[key] = [output_tensor(m(x)) for x in clip]
        torch.save(out, d + "/out.pt")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for key in ("whole", "stream"):
        assert all(torch.equal(a, b) for a, b in zip(expected, out[key])), key


def _state(emodel):
    return {k: v for k, v in emodel.stream_state()["tensors"].items() if v is not None}


@pytest.mark.parametrize(
    "other",
    [
        dict(name="zoo_dinov2_registers"),  # another model class
        dict(name="zoo_vit", batch=2),  # another input signature (two streams)
        dict(name="zoo_vit", attention="paper"),  # another rewrite
    ],
    ids=["structure", "signature", "attention"],
)
def test_a_checkpoint_that_does_not_fit_raises_and_loads_nothing(other, tmp_path):
    family, emodel = _build("zoo_vit")
    _run(emodel, family.real_inputs(3))
    emodel.save_stream(tmp_path / "stream.pt")
    other = dict(other)
    name = other.pop("name")
    target_family, target = _build(name, **other)
    batch = other.get("batch", 1)
    _run(target, [x.expand(batch, *x.shape[1:]).contiguous() for x in target_family.real_inputs(2)])
    before = _state(target)
    with pytest.raises(ValueError, match="Nothing was loaded"):
        target.load_stream(tmp_path / "stream.pt")
    after = _state(target)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_another_depth_is_another_structure(tmp_path):
    import models_zoo

    example = torch.randn(1, 3, 64, 64)
    small = dict(img_size=64, patch_size=16, embed_dim=64, num_heads=4, num_classes=10)
    a = evtrace.transform(models_zoo.vit(depth=3, **small).eval(), example, policy=8)
    b = evtrace.transform(models_zoo.vit(depth=2, **small).eval(), example, policy=8)
    _run(a, [example])
    with pytest.raises(ValueError, match="rewritten graph"):
        b.load_stream(a.stream_state())


def test_not_a_stream_checkpoint(tmp_path):
    _, emodel = _build("zoo_vit")
    torch.save({"hello": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not an evtrace stream checkpoint"):
        emodel.load_stream(tmp_path / "x.pt")
