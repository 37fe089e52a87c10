"""The benchmark harness: the --quick path end to end on a tiny model, the profile, CLI errors.

Nothing here asserts a time: timings on shared cores are noise; the tests check the shape of the
output (every column, finite numbers) and the error paths.
"""
import json
import math

import pytest

from evtrace.tools import bench
from evtrace.tools.cli import main


def _table_rows(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def _numbers(cell: str) -> list[float]:
    """'12.3 [10.1-14.0]' -> [12.3, 10.1, 14.0]."""
    return [float(x) for x in cell.replace("[", " ").replace("]", " ").replace("-", " ").split()]


def test_quick_tiny_model_three_frames(tmp_path, capsys):
    rc = main(["bench", "--quick", "--models", "tiny", "--frames", "2", "--no-compile", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    markdown = (tmp_path / "bench.md").read_text()
    assert markdown.strip() in capsys.readouterr().out
    header, rows = _table_rows(markdown)
    assert tuple(header) == bench.COLUMNS
    assert len(rows) == len(bench.MODES)  # one r, eager TopK, every attention mode
    assert {row[header.index("attention")] for row in rows} == set(bench.MODES)
    text_columns = {"model", "attention", "policy", "backend"}
    for row in rows:
        assert len(row) == len(header)
        for name, cell in zip(header, row):
            if name in text_columns:
                continue
            values = _numbers(cell)
            assert values and all(math.isfinite(v) for v in values), (name, cell)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == len(rows)
    assert bench.markdown_table(bench.load_rows(tmp_path / "bench.json")) in markdown
    assert all(len(r["dense_steady"]) == 2 and len(r["eventful_steady"]) == 2 for r in data["rows"])
    assert all(r["flop_ratio"] > 1 for r in data["rows"])  # r = N/4 saves FLOPs in every mode
    png = tmp_path / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_reports_outside_aten_share(tmp_path):
    result = bench.run_profile("tiny", r="N/4", frames=2, out=tmp_path)
    assert "Self CPU" in result.table
    assert 0.0 <= result.outside_share <= 1.0 and 0.0 <= result.outside_share_unprofiled <= 1.0
    assert result.aten_s > 0
    assert "outside ATen" in (tmp_path / "profile.txt").read_text()


@pytest.mark.parametrize("r, tokens, expected", [("N/4", 197, 49), ("256", 1764, 256), ("0.5", 17, 8), ("n/2", 17, 8)])
def test_resolve_r(r, tokens, expected):
    assert bench.resolve_r(r, tokens) == expected


@pytest.mark.parametrize("argv, argument", [
    (["--models", "vit_z99"], "--models"),
    (["--models", "tiny", "--r", "abc"], "--r"),
    (["--models", "tiny", "--r", "999"], "--r"),  # more tokens than N = 17
    (["--models", "tiny", "--r", "N/0"], "--r"),
    (["--modes", "sparse"], "--modes"),
    (["--frames", "0"], "--frames"),
])
def test_cli_errors_are_one_line_exit_2(argv, argument, tmp_path, capsys):
    rc = main(["bench", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("evtrace bench: error: ") and argument in err, err


def test_a_failing_group_becomes_a_note(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("graph break")

    monkeypatch.setattr(bench, "_run_group", fail)
    config = bench.quick_config(models=("tiny",), frames=1, modes=("exact",), out=tmp_path, progress=False)
    result = bench.run_bench(config)
    assert result.rows == []
    assert any("tiny eager topk r=4 failed: RuntimeError: graph break" in n for n in result.notes)
    assert "failed" in (tmp_path / "bench.md").read_text()
