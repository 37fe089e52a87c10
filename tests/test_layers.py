"""The package layers: every module imports alone, and imports go one way only.

Layers, lowest first (ARCHITECTURE.md): graph core < runtime < passes < API < tools.
``models_zoo`` stands apart: it imports nothing of evtrace, and only tools (and tests and
benchmarks) import it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("evtrace", "passes", "models_zoo")

GRAPH, RUNTIME, PASSES, API, TOOLS = range(5)
LAYER_NAMES = ("graph core", "runtime", "passes", "API", "tools")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(root: Path = ROOT) -> list[str]:
    return sorted(module_name(p, root) for package in PACKAGES for p in (root / package).rglob("*.py"))


def layer(module: str) -> int | None:
    """The layer of one of our modules; None for models_zoo (apart) and foreign modules."""
    if module.startswith("evtrace.graph"):
        return GRAPH
    if module.startswith("evtrace.runtime"):
        return RUNTIME
    if module == "passes" or module.startswith("passes."):
        return PASSES
    if module.startswith("evtrace.tools") or module.startswith("bench"):
        return TOOLS
    if module == "evtrace" or module.startswith("evtrace."):
        return API
    return None


def imports_of(path: Path, root: Path = ROOT) -> set[str]:
    """Every module of ours that ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from evtrace.tools import demo` imports the submodule evtrace.tools.demo
            found.update(f"{target}.{alias.name}" for alias in node.names)
    ours = set(all_modules(root)) | {module_name(p, root) for p in (root / "bench").glob("*.py")}
    return {name for name in found if name in ours}


def source_files() -> list[Path]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    return files + sorted((ROOT / "bench").glob("*.py"))


def wrong_imports(files: list[Path], root: Path = ROOT) -> list[str]:
    """Every import in ``files`` against the layer order, as one line each."""
    wrong = []
    for path in files:
        importer = module_name(path, root)
        for imported in imports_of(path, root):
            low, high = layer(imported), layer(importer)
            if imported.startswith("models_zoo") and high is not None and high != TOOLS:
                wrong.append(
                    f"{importer} ({LAYER_NAMES[high]}) imports {imported}: only tools use models_zoo"
                )
            elif importer.startswith("models_zoo") and not imported.startswith("models_zoo"):
                wrong.append(
                    f"{importer} (models_zoo) imports {imported}: the zoo depends on nothing of evtrace"
                )
            elif low is not None and high is not None and low > high:
                wrong.append(f"{importer} ({LAYER_NAMES[high]}) imports {imported} ({LAYER_NAMES[low]})")
    return wrong


def test_imports_follow_the_layer_order():
    wrong = wrong_imports(source_files())
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = nx.DiGraph()
    for path in source_files():
        importer = module_name(path)
        for imported in imports_of(path):
            parent = imported.rpartition(".")[0]
            if imported != importer and parent != importer:  # a package naming its own submodules
                graph.add_edge(importer, imported)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_layer_check_sees_a_wrong_import(tmp_path):
    """A copy of two real modules, one given an upward import, must be reported (and only it)."""
    for package in ("evtrace/runtime", "evtrace/graph", "passes"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
    for name in (
        "evtrace/__init__.py",
        "evtrace/runtime/__init__.py",
        "evtrace/graph/__init__.py",
        "passes/__init__.py",
        "passes/regions.py",
        "evtrace/eventful.py",
    ):
        (tmp_path / name).write_text("")
    gates = tmp_path / "evtrace/runtime/gates.py"
    gates.write_text((ROOT / "evtrace/runtime/gates.py").read_text() + "\nfrom passes import regions\n")
    meta = tmp_path / "evtrace/graph/meta.py"
    meta.write_text("def f():\n    from evtrace.eventful import transform\n")
    clean = tmp_path / "passes/ok.py"
    clean.write_text("from evtrace.runtime import gates\n")
    wrong = wrong_imports([gates, meta, clean], tmp_path)
    assert sorted(wrong) == [
        "evtrace.graph.meta (graph core) imports evtrace.eventful (API)",
        "evtrace.runtime.gates (runtime) imports passes (passes)",
        "evtrace.runtime.gates (runtime) imports passes.regions (passes)",
    ]


def api_rows(text: str) -> list[list[str]]:
    """The API layer's order as ARCHITECTURE.md states it: the lines after "API layer, lowest
    first" in its fenced block, each a comma-separated row of modules (``evtrace.`` left out)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("API layer, lowest first"))
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("```"):
            break
        rows.append([f"evtrace.{name.strip()}" for name in line.split(",") if name.strip()])
    return rows


def api_order_problems(rows: list[list[str]], files: list[Path], root: Path = ROOT) -> list[str]:
    row_of = {name: i for i, row in enumerate(rows) for name in row}
    problems = []
    api = [
        p for p in files if layer(module_name(p, root)) == API and module_name(p, root) not in ("evtrace",)
    ]
    for path in api:
        importer = module_name(path, root)
        if importer == "evtrace.cost" or importer not in row_of:
            if importer != "evtrace.cost":
                problems.append(f"{importer} is in no row of ARCHITECTURE.md's API order")
            continue
        for imported in sorted(imports_of(path, root)):
            if imported in row_of and row_of[imported] >= row_of[importer]:
                problems.append(
                    f"{importer} (row {row_of[importer] + 1}) imports {imported} (row {row_of[imported] + 1})"
                )
    return problems


def test_the_api_layer_follows_the_order_architecture_md_states():
    rows = api_rows((ROOT / "ARCHITECTURE.md").read_text())
    assert rows, "ARCHITECTURE.md states no API order"
    problems = api_order_problems(rows, source_files())
    assert not problems, "API modules against ARCHITECTURE.md's order:\n" + "\n".join(problems)


def test_the_api_order_check_sees_an_import_against_the_rows(tmp_path):
    (tmp_path / "evtrace/cost").mkdir(parents=True)
    for name in ("evtrace/__init__.py", "evtrace/cost/__init__.py", "evtrace/report.py"):
        (tmp_path / name).write_text("")
    low = tmp_path / "evtrace/cost/model.py"
    low.write_text("from evtrace.report import build_report\n")
    high = tmp_path / "evtrace/report.py"
    high.write_text("from evtrace.cost import model\n")
    rows = api_rows("```\nAPI layer, lowest first\ncost.model\nreport\n```\n")
    assert rows == [["evtrace.cost.model"], ["evtrace.report"]]
    assert api_order_problems(rows, [low, high], tmp_path) == [
        "evtrace.cost.model (row 1) imports evtrace.report (row 2)"
    ]


# Each module is imported into an interpreter where none of our modules is loaded yet: one
# subprocess for all of them, our modules purged from sys.modules between imports (torch and the
# other third-party packages stay loaded, which does not change our modules' import order).
_ALONE = """
import importlib, json, sys, traceback
results = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("evtrace", "passes", "models_zoo")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
        results[name] = ""
    except Exception as error:
        results[name] = f"{type(error).__name__}: {error}"
print(json.dumps(results))
"""


def test_every_module_imports_alone():
    modules = all_modules()
    done = subprocess.run(
        [sys.executable, "-c", _ALONE, json.dumps(modules)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == set(modules)
    failed = {name: error for name, error in results.items() if error}
    assert not failed, f"modules that do not import alone: {failed}"


@pytest.mark.parametrize("module", ["passes.regions", "evtrace.runtime.attention"])
def test_a_lower_layer_does_not_load_the_api(module):
    code = (
        f"import sys, {module}; "
        "print(sorted(m for m in sys.modules if m in ('evtrace.eventful', 'evtrace.report', 'evtrace.api')))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


_RAW_META = re.compile(
    r"\.meta(?:\.get\(|\[)\s*(?:TENSOR|OP|TOKENS|ROLE|ATTENTION|REGION|MODULE_PATH|FRONTEND|\"evtrace\.)"
)


def test_metadata_is_read_and_written_through_the_accessors_only():
    offenders = []
    for path in source_files():
        if path.name == "meta.py" and path.parent.name == "graph":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _RAW_META.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, (
        "raw access to evtrace's node.meta keys (use evtrace.graph.meta's accessors):\n"
        + "\n".join(offenders)
    )
    assert _RAW_META.search("x = node.meta[TOKENS]") and _RAW_META.search('gm.meta["evtrace.frontend"]')
