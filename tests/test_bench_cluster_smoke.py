"""bench/cluster.py (benchmark 8, the cluster) on tiny sizes, so the script cannot rot: a
throwaway PostgreSQL, a single-process build beside a cluster (two API processes and an
agent), then three agents, a throwaway Ceph and a real QEMU for the fencing. It asserts
that every part runs and reports, never how fast (speed is for `python -m bench.cluster`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

pytestmark = [pytest.mark.postgres, pytest.mark.qemu]


def test_the_cluster_benchmark_runs_on_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "cluster.md"
    proc = subprocess.run([sys.executable, "-m", "bench.cluster", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert report.startswith("## 8. Cluster"), report[:200]
    assert report.strip() in proc.stdout
    # 1. Describe*: each request, both builds, with the target's verdict and the ratio
    for request in ("DescribeSnapshotGroups", "DescribeInstances", "DescribeSnapshots"):
        single = [line for line in report.splitlines()
                  if line.startswith(f"| {request} ") and "| single process | 1 |" in line]
        cluster = [line for line in report.splitlines()
                   if line.startswith(f"| {request} ") and "| cluster | 2 |" in line]
        assert len(single) == 1 and len(cluster) == 1, (request, report)
        assert cluster[0].rstrip(" |").rsplit("| ", 1)[1].replace(".", "").isdigit()
    assert "SQL statements" in report
    # 2. dispatch: both builds timed, their ratio against 1.3
    assert "| single process (embedded runner) |" in report
    assert "| cluster (API → PostgreSQL queue → agent) |" in report
    assert "request sent → claimed by the agent" in report  # the agent's log was read
    # 3. fencing: the instance moved to another host, every part measured
    assert "on Ceph RBD" in report and "(h1->h" in report and "(h1->h1)" not in report
    for part in ("its lease expired", "fence committed by a peer", "marked Stopped",
                 "automatic restart: fence committed → Running on another host", "rejoined",
                 "osd blocklist add"):
        [line] = [x for x in report.splitlines() if part in x and x.startswith("| ")]
        assert " ms |" in line or " s |" in line, line
