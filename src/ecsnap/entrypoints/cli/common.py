"""What every `ecsnap` command shares: the --data-dir option, the Rich consoles, and how
an EcsError ends a command (one line on stderr, exit status 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ecsnap.domain.errors import EcsError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", envvar="ECSNAP_DATA_DIR",
                                              help="Data directory (default "
                                                   "$ECSNAP_DATA_DIR).")]


def fail(exc: EcsError) -> None:
    err.print(f"[bold red]Error[/] {exc.code}: {exc.message}", highlight=False)
    raise typer.Exit(1)
