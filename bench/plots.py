"""PNG plots of benchmarks 1-3: cost versus GiB written per disk, median with min-max error
bars, drawn headless with matplotlib's Agg canvas (no display, no pyplot global state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Series

# key -> (label, marker) in the order they are drawn.
SNAPSHOT = {"group": ("ecsnap instance snapshot (API)", "o"),
            "bare_snapshot": ("bare qemu-img snapshot -c", "s")}
ROLLBACK = {"rollback": ("ecsnap ResetDisks (safety snapshot on)", "o"),
            "bare_rollback": ("bare qemu-img snapshot -c + -a", "s")}
ALTERNATIVES = {"group": ("ecsnap instance snapshot (API)", "o"),
                "cp": ("cp --sparse=always", "v"),
                "convert": ("qemu-img convert", "^"),
                "btrfs": ("btrfs subvolume snapshot", "D"),
                "xfs_reflink": ("XFS cp --reflink=always", "P")}


def _draw(ax: Any, sizes: Sequence[float],
          per_size: Mapping[float, Mapping[str, Series | str]],
          keys: Mapping[str, tuple[str, str]]) -> int:
    """One error-bar line per key, in ms; sizes where the key is missing or a note (str) are
    left out. Returns how many lines were drawn."""
    drawn = 0
    for key, (label, marker) in keys.items():
        xs: list[float] = []
        med: list[float] = []
        low: list[float] = []
        high: list[float] = []
        for size in sizes:
            s = per_size.get(size, {}).get(key)
            if s is None or isinstance(s, str) or not s.samples:
                continue
            m = s.median * 1000
            xs.append(size)
            med.append(m)
            low.append(m - min(s.samples) * 1000)
            high.append(max(s.samples) * 1000 - m)
        if xs:
            ax.errorbar(xs, med, yerr=[low, high], label=label, marker=marker, capsize=4,
                        linewidth=1.5, markersize=5)
            drawn += 1
    return drawn


def _figure(title: str, log_y: bool) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("GiB written per disk (3 disks)")
    ax.set_ylabel("time, ms (median, bars min-max)")
    if log_y:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def plot_costs(sizes: list[float], per_size: Mapping[float, Mapping[str, Series | str]],
               out_dir: Path) -> list[Path]:
    """Write bench-snapshot.png (benchmark 1: ecsnap vs bare qemu-img snapshot),
    bench-rollback.png (2: ResetDisks vs bare) and bench-alternatives.png (3: ecsnap vs full
    copies and, where measured, btrfs / XFS reflink, log y axis) into `out_dir`. per_size[size]
    holds Series of seconds under the keys of SNAPSHOT, ROLLBACK and ALTERNATIVES; missing
    keys and notes (str) are skipped, and a plot with nothing to draw is not written.
    Returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = sorted(sizes)
    written: list[Path] = []
    for name, title, keys, log_y in (
            ("bench-snapshot.png", "1. Instance snapshot of 3 disks, stopped instance",
             SNAPSHOT, False),
            ("bench-rollback.png", "2. Rollback of 3 disks", ROLLBACK, False),
            ("bench-alternatives.png", "3. Instance snapshot vs the alternatives, 3 disks",
             ALTERNATIVES, True)):
        fig, ax = _figure(title, log_y)
        if not _draw(ax, sizes, per_size, keys):
            continue
        if not log_y:
            ax.set_ylim(bottom=0)  # after drawing: set before, it would freeze the top at 1
        if len(sizes) == 1:
            ax.set_xticks(sizes)
        ax.legend(fontsize=8)
        path = out_dir / name
        fig.savefig(path)
        written.append(path)
    return written
