"""Re-render the fidelity tables and plot from a saved run, without running the sweep again.

    python -m evtrace.tools.cli fidelity --out out/fidelity       # the sweep (about 25 min on 2 shared cores)
    python bench/fidelity.py out/fidelity/fidelity.json docs  # tables + plot into docs/

Writes ``fidelity.md``, ``fidelity.png`` and ``fidelity.json`` into the target folder (the plot
shows the real-weights model; the random-weights second view is in the tables).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evtrace.tools.fidelity import read_points, summary, write_outputs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="fidelity.json of a run")
    parser.add_argument("out", type=Path, help="folder to write into")
    args = parser.parse_args(argv)
    points = read_points(args.json)
    real = [p for p in points if "random" not in p.model]
    second = [p for p in points if "random" in p.model]
    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_outputs(real, second, args.out)
    print(summary(points))
    print("wrote", ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
