"""`make test` runs the reliability soak (bench/soak.py) once on tiny counts, so that its
code cannot rot: 5 crash trials of the stopped kinds and 1 of a running VM, 1 round of 50
concurrent calls, 300 fuzz requests. The full counts are `make soak`'s."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from bench.soak import action_schemas

from ecsnap.entrypoints.api.actions import ACTIONS

ROOT = Path(__file__).parents[1]


def test_the_fuzz_reads_every_action_s_parameters_from_the_api() -> None:
    schemas = action_schemas()
    assert set(schemas) == set(ACTIONS)
    by_name = {p.name: p for p in schemas["DescribeInstances"]}
    assert (by_name["PageSize"].kind, by_name["PageSize"].low, by_name["PageSize"].high) == \
        ("int", 1, 100)
    assert by_name["InstanceIds"].kind == "json_list" and by_name["RegionId"].required
    [disks] = [p for p in schemas["RunInstances"] if p.name == "DataDisk"]
    assert {"Size", "DeleteWithInstance"} <= {f.name for f in disks.fields}
    [mode] = [p for p in schemas["StopInstance"] if p.name == "StoppedMode"]
    assert mode.allowed == ("KeepCharging", "StopCharging")


@pytest.mark.qemu
def test_the_soak_runs_on_tiny_counts(tmp_path: Path) -> None:
    out = tmp_path / "reliability.md"
    out.write_text("# an earlier run\n\n## 9. stale\n\nold\n\n## Notes\n\nWritten by hand.\n")
    # a short work dir: VM sockets live under it, and a unix socket's path is at most 107
    # bytes (pytest's tmp_path can be longer than that allows)
    work = Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp")) / "work"
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--smoke", "--out", str(out),
                           "--work", str(work)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = out.read_text()
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert [h.split(".")[0] for h in headings] == ["## 1", "## 2", "## 3", "## 9",
                                                   "## Notes"], headings
    assert report.endswith("## Notes\n\nWritten by hand.\n")  # kept, as the stale section
    assert "**6 trials, 0 failed**" in report
    assert "| CreateSnapshotGroup (running) | 1 | 0 |" in report
    assert "both caught." in report  # the checks fail on planted faults
    assert "(50 answers): 0 answered 5xx, 0 answers not a result" in report
    assert "**300 requests in" in report and "0 answered 5xx, 0 with a traceback, 0 " \
        "rejected calls that changed state, 0 malformed requests accepted" in report
    assert not work.exists()  # removed when nothing failed
    work.parent.rmdir()
