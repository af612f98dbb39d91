"""`make test` runs every benchmark once on tiny sizes, so the benchmark code cannot rot.
It asserts that they run and report, never how fast (speed is for `make bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_benchmarks_run_on_tiny_sizes() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout
    for section in ("## 1. Instance snapshot", "## 2. Rollback", "## 3. The alternatives",
                    "## 5. Metadata scale"):
        assert section in report
    assert "| SQLite |" in report and "| PostgreSQL |" in report
