"""The `ecsnap` command, assembled: operator commands that run the services in-process on
a data directory (`operator`), and client commands that call the API (`client_commands`)."""

from __future__ import annotations

import typer

from ecsnap.entrypoints.cli import client_commands, files_commands, operator, policies_commands

app = typer.Typer(help="ecsnap: ECS-style instance snapshots and rollback for QEMU VMs.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

# the order of the commands in `ecsnap --help`
app.command()(operator.init)
app.command()(operator.serve)
app.command()(operator.agent)
app.command("hosts")(operator.hosts_list)
app.command()(client_commands.instances)
app.command()(client_commands.disks)
app.command()(client_commands.snapshots)
app.command()(client_commands.rollback)
app.command()(client_commands.run)
app.command(context_settings=client_commands.PASS_THROUGH_OPTIONS)(client_commands.api)
# `image`: the operator's import and demo build (in-process), your custom images (API)
operator.image_app.command("list")(client_commands.image_list)
operator.image_app.command("create")(client_commands.image_create)
operator.image_app.command("delete")(client_commands.image_delete)
app.add_typer(operator.image_app, name="image")
app.add_typer(client_commands.disk_app, name="disk")
app.add_typer(operator.account_app, name="account")
app.add_typer(operator.accesskey_app, name="accesskey")
app.add_typer(client_commands.groups_app, name="snapshot-groups")
app.add_typer(files_commands.files_app, name="files")
app.add_typer(policies_commands.policy_app, name="policy")


def main() -> None:
    app()
