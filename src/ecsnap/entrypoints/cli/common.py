"""What every `ecsnap` command shares: the --data-dir and --output options, finding the data
directory, the Rich consoles, byte counts for people, and how an EcsError ends a command
(one line on stderr, exit status 1)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ecsnap import config
from ecsnap.domain.errors import EcsError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DataDir = Annotated[Path | None, typer.Option(
    "--data-dir", envvar="ECSNAP_DATA_DIR",
    help="Data directory (default $ECSNAP_DATA_DIR, else ./var/data when it exists, else "
         "~/.local/share/ecsnap).")]


class OutputFormat(StrEnum):
    table = "table"
    json = "json"


Output = Annotated[OutputFormat, typer.Option("--output", "-o",
                                              help="table (for people) or json.")]


def fail(exc: EcsError) -> None:
    err.print(f"[bold red]Error[/] {exc.code}: {exc.message}", highlight=False)
    raise typer.Exit(1)


def not_initialised(data_dir: Path) -> EcsError:
    return EcsError(
        "DataDirNotInitialised",
        f"{data_dir} is not an ecsnap data directory (`ecsnap init` never ran there). Point "
        "the command at yours: --data-dir DIR or ECSNAP_DATA_DIR=DIR (`make run`'s is "
        "./var/data, which ecsnap finds by itself when run in the directory that holds it); "
        "or make one: ecsnap init --data-dir DIR.", 400)


def initialised_data_dir(data_dir: Path | None) -> Path:
    """The data directory the command works on (config.find_data_dir), which `ecsnap init`
    must have made: else the command ends here, saying so and how to point it at the
    right one; nothing is created."""
    found = config.find_data_dir(data_dir)
    if not config.is_initialised(found):
        fail(not_initialised(found))
    return found


def human_bytes(n: int | None) -> str:
    """A byte count for people, in the console's units (384.0 KiB); None: unknown."""
    if n is None or n < 0:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
