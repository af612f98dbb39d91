"""The `ecsnap` command, assembled: operator commands that run the services in-process on
a data directory (`operator`), and client commands that call the API (`client_commands`)."""

from __future__ import annotations

import typer

from ecsnap.entrypoints.cli import client_commands, files_commands, operator

app = typer.Typer(help="ecsnap: ECS-style instance snapshots and rollback for QEMU VMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

# the order of the commands in `ecsnap --help`
app.command()(operator.init)
app.command()(operator.serve)
app.command()(client_commands.instances)
app.command()(client_commands.disks)
app.command()(client_commands.snapshots)
app.command()(client_commands.rollback)
app.command()(client_commands.run)
app.command(context_settings=client_commands.PASS_THROUGH_OPTIONS)(client_commands.api)
app.add_typer(operator.image_app, name="image")
app.add_typer(operator.account_app, name="account")
app.add_typer(operator.accesskey_app, name="accesskey")
app.add_typer(client_commands.groups_app, name="snapshot-groups")
app.add_typer(files_commands.files_app, name="files")


def main() -> None:
    app()
