"""evtrace's public names: loaded on first access, and never shadowed by a submodule."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import evtrace

ROOT = Path(__file__).resolve().parents[1]


def test_no_public_name_is_also_a_submodule():
    # importing evtrace.<name> as a module would replace the package attribute evtrace.<name>
    # (the function) with the module for everyone after that import
    package = ROOT / "evtrace"
    clashes = [n for n in evtrace.__all__ if (package / f"{n}.py").exists() or (package / n).is_dir()]
    clashes = [n for n in clashes if not isinstance(getattr(evtrace, n), type(evtrace))]
    assert not clashes, f"public names that are also submodules: {clashes}"


def test_every_public_name_resolves_after_every_submodule_was_imported():
    code = (
        "import importlib, pkgutil, evtrace\n"
        "for m in pkgutil.walk_packages(evtrace.__path__, 'evtrace.'):\n"
        "    importlib.import_module(m.name)\n"
        "import types\n"
        "bad = [n for n in evtrace.__all__ if n not in evtrace._MODULES and "
        "isinstance(getattr(evtrace, n), types.ModuleType)]\n"
        "print(bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert callable(importlib.import_module("evtrace").verify)
