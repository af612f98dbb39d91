"""`make test` runs the RBD benchmark once on tiny sizes (its own throwaway cluster with a
file-backed OSD), so its code cannot rot. It asserts that it runs and reports, never how
fast (speed is for `python -m bench.rbd`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.ceph import missing

ROOT = Path(__file__).parents[1]


def test_the_rbd_benchmark_runs_on_tiny_sizes(tmp_path: Path) -> None:
    why = missing()
    if why:
        pytest.fail(why)
    out = tmp_path / "rbd.md"
    proc = subprocess.run([sys.executable, "-m", "bench.rbd", "--sizes", "0.01,0.02",
                           "--repeats", "1", "--settle", "0", "--dir", str(tmp_path),
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert report.startswith("### Ceph RBD, paxos_propose_interval 0.01 s")
    assert report.count("\n| 0.0") == 2 and "x faster" in report
    assert not list(tmp_path.glob("ecsnap-bench-rbd-*"))  # its cluster and data are gone
