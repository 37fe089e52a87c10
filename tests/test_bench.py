"""The benchmark harness: the --quick path end to end on a tiny model, the profile, CLI errors.

Nothing here asserts a measured speed: timings on shared cores are noise; the tests check the
shape of the output (every column, finite numbers), that the baseline is the fastest dense
candidate (a stand-in that sleeps 30 ms against one that returns at once), and the error paths.
"""

import json
import math

import pytest

from evtrace.runtime.packed import packing_available
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
    rc = main(
        [
            "bench",
            "--quick",
            "--models",
            "tiny",
            "--frames",
            "2",
            "--no-compile",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    markdown = (tmp_path / "bench.md").read_text()
    assert markdown.strip() in capsys.readouterr().out
    header, rows = _table_rows(markdown)
    assert tuple(header) == bench.COLUMNS
    assert len(rows) == len(bench.MODES)  # one r, eager TopK, every attention mode
    assert {row[header.index("attention")] for row in rows} == set(bench.MODES)
    text_columns = {"model", "attention", "policy", "backend", "dense baseline", "dense variants ms"}
    for row in rows:
        assert len(row) == len(header)
        for name, cell in zip(header, row):
            if name in text_columns:
                continue
            values = _numbers(cell)
            assert values and all(math.isfinite(v) for v in values), (name, cell)
        # the zoo ViT has the use_sdpa switch: both dense formulations race, the faster is the baseline
        variants = dict(part.rsplit(" ", 1) for part in row[header.index("dense variants ms")].split(", "))
        expected = {"explicit", "sdpa"}
        if packing_available():  # each also with packed linear weights, as the sparse regions run
            expected |= {"explicit+packed", "sdpa+packed"}
        assert set(variants) == expected
        baseline = row[header.index("dense baseline")]
        assert float(variants[baseline]) == min(float(v) for v in variants.values())
        assert _numbers(row[header.index("dense ms median [min-max]")])[0] == float(variants[baseline])
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == len(rows)
    assert bench.markdown_table(bench.load_rows(tmp_path / "bench.json")) in markdown
    assert all(len(r["dense_steady"]) == 2 and len(r["eventful_steady"]) == 2 for r in data["rows"])
    assert all(r["flop_ratio"] > 1 for r in data["rows"])  # r = N/4 saves FLOPs in every mode
    for r in data["rows"]:
        medians = r["dense_variants"]
        assert r["dense_median"] == medians[r["dense_baseline"]] == min(medians.values())
        assert math.isclose(r["speedup"], r["dense_median"] / r["eventful_median"])
    png = tmp_path / "bench.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_reports_outside_aten_share(tmp_path):
    result = bench.run_profile("tiny", r="N/4", frames=2, out=tmp_path)
    assert "Self CPU" in result.table
    assert 0.0 <= result.outside_share <= 1.0 and 0.0 <= result.outside_share_unprofiled <= 1.0
    assert result.aten_s > 0
    assert "outside ATen" in (tmp_path / "profile.txt").read_text()


@pytest.mark.parametrize(
    "r, tokens, expected", [("N/4", 197, 49), ("256", 1764, 256), ("0.5", 17, 8), ("n/2", 17, 8)]
)
def test_resolve_r(r, tokens, expected):
    assert bench.resolve_r(r, tokens) == expected


@pytest.mark.parametrize(
    "argv, argument",
    [
        (["--models", "vit_z99"], "--models"),
        (["--models", "tiny", "--r", "abc"], "--r"),
        (["--models", "tiny", "--r", "999"], "--r"),  # more tokens than N = 17
        (["--models", "tiny", "--r", "N/0"], "--r"),
        (["--modes", "sparse"], "--modes"),
        (["--frames", "0"], "--frames"),
    ],
)
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


def test_dense_variants_share_weights_and_flip_the_switch():
    import torch

    from models_zoo.vitdet import vitdet

    torch.manual_seed(0)
    model = vitdet(
        img_size=64, embed_dim=32, depth=2, num_heads=2, window_size=3, global_blocks=(1,), with_pyramid=False
    ).eval()  # 4x4 grid padded to 6x6 windows of 3
    variants = bench.dense_variants(model, packed=False)
    assert list(variants) == ["explicit", "sdpa"]
    assert variants["explicit"] is model  # built explicit: the model itself, nothing copied
    switches = [m for m in variants["sdpa"].modules() if hasattr(m, "use_sdpa")]
    assert len(switches) == 2 and all(m.use_sdpa is True for m in switches)
    assert not any(m.use_sdpa for m in model.modules() if hasattr(m, "use_sdpa"))  # the original untouched
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(variants["sdpa"](x), model(x), atol=1e-5, rtol=1e-4)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert bench.dense_variants(plain, packed=False) == {"as built": plain}
    if packing_available():
        packed = bench.dense_variants(model)
        assert list(packed) == ["explicit", "sdpa", "explicit+packed", "sdpa+packed"]
        with torch.no_grad():
            torch.testing.assert_close(packed["sdpa+packed"](x), model(x), atol=1e-5, rtol=1e-4)
        assert list(bench.dense_variants(plain)) == ["as built", "as built+packed"]


def test_the_fastest_dense_candidate_is_the_baseline():
    import time

    import torch

    import evtrace

    spec = bench.MODELS["tiny"]
    model = spec.build().eval()
    frames = [torch.randn(1, 3, 64, 64) for _ in range(3)]

    out = model(frames[0]).detach()

    def slow(x):  # stand-ins: a timing that cannot lose (or win) to contention on shared cores
        time.sleep(0.03)
        return out

    def fast(x):
        return out

    with torch.no_grad():
        ev = evtrace.transform(model, frames[0], policy=4)
        group = bench._Group(spec, "eager", "topk", 4, 0.15)
        rows = bench._run_group(
            group,
            {"slow": slow, "fast": fast},
            {"exact": ev},
            frames,
            1.0,
            {},
            lambda text: None,
            bench._Progress(0, False),
        )
    (row,) = rows
    assert row.dense_baseline == "fast"
    assert set(row.dense_variants) == {"slow", "fast"}
    assert row.dense_variants["slow"] >= 0.03 > row.dense_variants["fast"] == row.dense_median
    assert row.speedup == row.dense_median / row.eventful_median
    assert "| fast |" in bench.markdown_table(rows)


def test_rows_saved_before_the_baseline_columns_still_load(tmp_path):
    row = dict(
        model="tiny",
        tokens=17,
        r=4,
        attention="exact",
        policy="TopK",
        backend="eager",
        dense_steady=[0.002, 0.003],
        dense_first=0.004,
        eventful_steady=[0.001, 0.001],
        eventful_first=0.005,
        dense_gflops=1.0,
        eventful_gflops=0.5,
        state_bytes=10,
        peak_rss_bytes=2**20,
        compile_s=0.0,
    )
    (tmp_path / "bench.json").write_text(json.dumps({"rows": [row]}))
    (loaded,) = bench.load_rows(tmp_path / "bench.json")
    assert loaded.dense_baseline == "as built" and loaded.dense_variants == {}
    cells = dict(zip(bench.COLUMNS, loaded.cells()))
    assert cells["dense baseline"] == "as built" and cells["dense variants ms"] == "-"
