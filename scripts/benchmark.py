"""Kept for old commands: the benchmark is ``umi bench`` (``umi/bench.py``, ``docs/benchmarks.md``).

    .venv/bin/python scripts/benchmark.py --tasks 200 --concurrency 16   # = umi bench --tasks 200 --concurrency 16
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from umi.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
