"""`make test` runs every benchmark once on tiny sizes, so the benchmark code cannot rot.
It asserts that they run and report, never how fast (speed is for `make bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_benchmarks_run_on_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    findings = "## What was slow, what was fixed, and what remains\n\nWritten by hand.\n"
    out.write_text("# an earlier run\n\n## 1. stale figures\n\n" + findings)
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert [s.split(".")[0] for s in sections] == ["## 1", "## 2", "## 3", "## 4", "## 5",
                                                   "## 6", "## What was slow, what was "
                                                   "fixed, and what remains"], sections
    assert report.endswith(findings) and "stale" not in report  # the analysis is kept
    assert "| SQLite |" in report and "| PostgreSQL |" in report
    for png in ("bench-snapshot.png", "bench-rollback.png", "bench-alternatives.png"):
        assert f"]({png})" in report
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a run of one benchmark only rewrites its own section and keeps the others, marked
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--only", "scale",
                           "--no-postgres", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = out.read_text()
    assert [line for line in again.splitlines() if line.startswith("## ")] == sections
    five = section(again, "5")
    assert "| SQLite |" in five and "| PostgreSQL |" not in five and "From the run" not in five
    for n in "12346":
        kept = section(again, n).splitlines()
        assert kept[2].startswith("From the run of 20"), kept[:3]
        assert kept[:2] + kept[4:] == section(report, n).splitlines()
    assert again.endswith(findings)


def section(report: str, number: str) -> str:
    return report.split(f"\n## {number}.")[1].split("\n## ")[0]


def test_a_run_with_only_marks_the_sections_it_kept() -> None:
    """`bench.run --only` keeps the sections it did not measure, each marked with the run
    it comes from, unless it says its own (the sections other benchmarks write)."""
    from bench.run import KEPT, keep_from_earlier

    earlier = ("# report\n\nRun on 2026-11-30 10:48 UTC, vm.\n\n## 1. one\n\nold figures\n"
               "## 5. scale\n\nold scale\n## 8. cluster\n\nRun on 2026-12-02 06:36 UTC: "
               "`python -m bench.cluster`\n\nits figures\n")
    new = "# report\n\nRun on 2026-12-02 07:00 UTC, vm.\n\n## 5. scale\n\nnew scale\n"
    merged = keep_from_earlier(new, earlier)
    assert "new scale" in merged and "old scale" not in merged
    assert f"## 1. one\n\n{KEPT} 2026-11-30 10:48 UTC" in merged
    cluster = merged[merged.index("## 8."):]
    assert KEPT not in cluster and "its figures" in cluster
