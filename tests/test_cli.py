"""evtrace.tools.cli: subcommands, --help, and one-line errors (exit 2, no traceback) for bad input.

The demo end to end is in test_demo.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from evtrace.tools import cli


def _err(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _assert_usage_error(rc, err, argument, command="demo"):
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"evtrace {command}: error: ")
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


@pytest.mark.parametrize(
    "argv,argument,needle",
    [
        (["--budget", "0"], "--budget", "[1, 257]"),
        (["--budget", "258"], "--budget", "got 258"),
        (["--size", "112", "--budget", "66"], "--budget", "[1, 65]"),
        (["--budget", "many"], "--budget", "invalid int"),
        (["--threshold", "-0.1"], "--threshold", ">= 0"),
        (["--threshold", "nan"], "--threshold", ">= 0"),
        (["--budget", "4", "--threshold", "0.1"], "--threshold", "not allowed with argument --budget"),
        (["--attention", "fast"], "--attention", "invalid choice"),
    ],
)
def test_bad_policy_arguments(capsys, tmp_path, argv, argument, needle):
    rc, err = _err(capsys, ["demo", *argv, "--out", str(tmp_path)])
    _assert_usage_error(rc, err, argument)
    assert needle in err


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
        ("models_zoo:no_such_factory", "has no attribute 'no_such_factory'"),
        ("models_zoo", "expected MODULE:FACTORY"),
        ("models_zoo:__doc__", "is not callable"),
        ("builtins:dict", "not an nn.Module"),
    ],
)
def test_inspect_bad_factory(capsys, spec, needle):
    rc, err = _err(capsys, ["inspect", spec])
    _assert_usage_error(rc, err, "MODULE:FACTORY", "inspect")
    assert needle in err


def test_inspect_bad_input_shape(capsys):
    rc, err = _err(capsys, ["inspect", "models_zoo:deit_tiny", "--input-shape", "1,3,x"])
    _assert_usage_error(rc, err, "--input-shape", "inspect")


def test_inspect_prints_report(capsys):
    assert cli.main(["inspect", "models_zoo:deit_tiny", "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "evtrace report: VisionTransformer" in out
    assert "1 stream(s) x 17 tokens" in out  # built for 64 px: 4 x 4 patches + class token
    assert "linears: 48 sparse" in out and "dense head: acts on a subset of the tokens" in out


def test_inspect_budget_shows_savings_and_rejects_a_budget_above_n(capsys):
    assert cli.main(["inspect", "models_zoo:deit_tiny", "--size", "64", "--budget", "4"]) == 0
    assert "x fewer" in capsys.readouterr().out
    rc, err = _err(capsys, ["inspect", "models_zoo:deit_tiny", "--size", "64", "--budget", "18"])
    _assert_usage_error(rc, err, "--budget", "inspect")
    assert "choose a budget in [1, 17]" in err


def test_fidelity_bad_arguments(capsys, tmp_path):
    rc, err = _err(capsys, ["fidelity", "--size", "100", "--out", str(tmp_path)])
    _assert_usage_error(rc, err, "--size", "fidelity")
    rc, err = _err(capsys, ["fidelity", "--clip", str(tmp_path / "missing.mp4"), "--out", str(tmp_path)])
    _assert_usage_error(rc, err, "--clip", "fidelity")


def test_help_and_no_subcommand(capsys):
    options = {
        "demo": (
            "--clip",
            "--frames",
            "--size",
            "--budget",
            "--threshold",
            "--attention",
            "--out",
            "--threads",
        ),
        "inspect": ("MODULE:FACTORY", "--size", "--input-shape", "--frontend"),
        "fidelity": ("--clip", "--frames", "--size", "--attention", "--out", "--no-second-view"),
    }
    for command, opts in options.items():
        assert cli.main([command, "--help"]) == 0
        out = capsys.readouterr().out
        for opt in opts:
            assert opt in out, (command, opt)
    assert cli.main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in options)
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
        [sys.executable, "-m", "evtrace.tools.cli", "demo", "--clip", str(bad), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("evtrace demo: error: --clip: ")


def test_output_into_a_closed_pipe_exits_0(monkeypatch, tmp_path, capsys):
    class ClosedPipe:  # stdout of ``evtrace inspect ... | head -1`` once head has exited
        def __init__(self, fd):
            self.fd = fd

        def write(self, _text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return self.fd

    with open(tmp_path / "sink", "w") as sink:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(sink.fileno()))
        rc = cli.main(["inspect", "models_zoo:deit_tiny", "--size", "32"])
    assert rc == 0
    assert capsys.readouterr().err == ""
