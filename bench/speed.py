"""Speed benchmark of eventful models against the originals: ``python bench/speed.py [--quick] ...``.

A thin wrapper of ``evtrace bench`` (see ``evtrace/bench.py`` for the method and ``--help`` for
the options); results go to ``out/bench`` unless ``--out`` says otherwise.
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep on shared cores

from evtrace.tools.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
