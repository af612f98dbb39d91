"""The look-inside benchmark runs on tiny sizes (asserting that it runs and reports, and
that both answers name the same paths; never how fast)."""

from __future__ import annotations

import pytest
from bench import inside


def test_the_benchmark_runs_on_a_tiny_tree(capsys: pytest.CaptureFixture[str]) -> None:
    assert inside.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "300 files, 20 changed (both answers name the same paths)" in out
    assert "| ratio preview / diff -rq |" in out
