"""The look-inside benchmark runs on tiny sizes (asserting that it runs and reports, and
that its answers are the right ones: the same paths from the preview and `diff -rq`, the
file read back from both disk sizes, every disk of the 3-disk preview complete and exact;
never how fast)."""

from __future__ import annotations

import pytest
from bench import inside


def test_the_benchmark_runs_on_a_tiny_tree(capsys: pytest.CaptureFixture[str]) -> None:
    assert inside.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "300 files, 20 changed (both answers name the same paths)" in out
    assert "| ratio preview / diff -rq |" in out
    # one file read from a snapshot on a 20 and a 40 GiB disk of the same tree
    assert "the same tree of 100 files on every disk), 2 reads per disk" in out
    assert "| 20 GiB (" in out and " | 1.00 (x1) |" in out
    assert "| 40 GiB (" in out and " (x2) |" in out
    # the whole file-level preview of a stopped 3-disk instance
    assert "stopped 3-disk instance (PreviewResetDisks, 200 files per disk, 10 changed " \
        "on each; every disk's list exact and complete)" in out
    assert "| whole preview, 3 disks |" in out
