"""Cloud Assistant: run a shell command in Running instances through the guest agent.

This is the seed's "log on to the instance and check the data". Each RunCommand is one
InvokeId with one record per instance; the command runs in the background and its
result (exit code, output, error code) is kept for DescribeInvocationResults.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from ecsnap.adapters.compute.base import ComputeError, GuestAgentUnavailable
from ecsnap.adapters.store.base import Criteria, UnitOfWork
from ecsnap.domain import errors, ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InstanceStatus, Invocation, InvocationStatus, utcnow
from ecsnap.service.context import ServiceContext, get_instance
from ecsnap.service.listing import Page, page_list

OUTPUT_CAP = 24 * 1024


def run_command(ctx: ServiceContext, account_id: str, region_id: str, *, command_type: str,
                content: str, instance_ids: Sequence[str], timeout: int = 60,
                working_dir: str = "/root", name: str = "", content_encoding: str = "PlainText",
                ) -> tuple[str, str]:
    """RunCommand. Returns (CommandId, InvokeId); poll describe_invocation_results."""
    if command_type not in ("RunShellScript", "RunBatScript", "RunPowerShellScript"):
        raise EcsError("InvalidCmdType.NotFound",
                       f"The command type \"{command_type}\" does not exist.", 403)
    if command_type != "RunShellScript":
        raise EcsError("InvalidInstance.NotMatch",
                       f"{command_type} is for Windows instances; these run Linux.", 403)
    if content_encoding == "Base64":
        try:
            content = base64.b64decode(content, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise errors.invalid_parameter("CommandContent", "It is not valid Base64.") from exc
    elif content_encoding != "PlainText":
        raise errors.invalid_parameter("ContentEncoding", "Use PlainText or Base64.")
    if not content:
        raise errors.missing_parameter("CommandContent")
    if len(content.encode()) > 16 * 1024:
        raise EcsError("InvalidParameter.CommandContent",
                       "The command is longer than 16 KB.", 400)
    if not instance_ids:
        raise errors.missing_parameter("InstanceId.1")
    if ctx.settings.cluster:  # the guest agent's socket is on the instance's host
        raise EcsError("OperationDenied.ClusterApi", "RunCommand is not available in "
                       "cluster mode yet: the guest agent is on the instance's host.", 403)
    if len(instance_ids) > 50:
        raise EcsError("InstanceIds.ExceedLimit", "At most 50 instances per command.", 403)
    if len(name) > 128:
        raise EcsError("CmdName.ExceedLimit", "The command name exceeds 128 characters.", 403)
    if not 1 <= timeout <= 86400:
        raise errors.invalid_parameter("Timeout", "It is 1 to 86400 seconds.")
    command_id, invoke_id = ids.new_id("command"), ids.new_id("task")
    records = []
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        for instance_id in instance_ids:
            inst = get_instance(uow, account_id, instance_id, region_id)
            rules.require_instance_status(inst, InstanceStatus.RUNNING)
        _check_concurrency(ctx, uow, account_id, instance_ids)
        for instance_id in instance_ids:
            record = Invocation(id=ids.new_id("task"), invoke_id=invoke_id,
                                command_id=command_id, account_id=account_id,
                                region_id=region_id, instance_id=instance_id,
                                command_type=command_type, command_content=content, name=name,
                                working_dir=working_dir, timeout=timeout)
            uow.invocations.add(record)
            records.append(record.id)
        uow.commit()
    for record_id in records:
        ctx.runner.spawn(lambda rid=record_id: _execute(ctx, rid))  # type: ignore[misc]
    return command_id, invoke_id


def _check_concurrency(ctx: ServiceContext, uow: UnitOfWork, account_id: str,
                       instance_ids: Sequence[str]) -> None:
    """Commands running at once are bounded per instance and per account (settings
    max_commands_per_instance, max_commands_per_account), so no tenant can queue the
    command pool full; counted from the records, in the transaction that adds the new ones."""
    settings = ctx.settings
    running = uow.invocations.find(account_id=account_id, status=InvocationStatus.RUNNING)
    if len(running) + len(instance_ids) > settings.max_commands_per_account:
        raise EcsError("Throttling.Resource",
                       f"The account runs {len(running)} commands; at most "
                       f"{settings.max_commands_per_account} run at once. Retry later.", 429)
    for instance_id in instance_ids:
        on_it = sum(1 for r in running if r.instance_id == instance_id)
        if on_it + list(instance_ids).count(instance_id) > settings.max_commands_per_instance:
            raise EcsError("Throttling.Resource",
                           f"The instance {instance_id} runs {on_it} commands; at most "
                           f"{settings.max_commands_per_instance} run at once on one "
                           "instance. Retry later.", 429)


def _execute(ctx: ServiceContext, record_id: str) -> None:
    with ctx.uow() as uow:
        record = uow.invocations.load(record_id)
        record.started = utcnow()
        uow.commit()
    status, code, info, exit_code, output, dropped = InvocationStatus.SUCCESS, "", "", None, "", 0
    try:
        result = ctx.compute.guest_exec(record.instance_id, record.command_content,
                                        timeout=float(record.timeout),
                                        working_dir=record.working_dir)
        raw = result.stdout + result.stderr
        dropped = max(0, len(raw) - OUTPUT_CAP)
        output = raw[:OUTPUT_CAP].decode(errors="replace")
        exit_code = result.exit_code
        if result.timed_out:
            status, code = InvocationStatus.TIMEOUT, "ExecutionTimeout"
            info = f"the command ran longer than {record.timeout} s and was killed"
        elif exit_code != 0:
            status, code = InvocationStatus.FAILED, "ExitCodeNonzero"
            info = f"the command exited with code {exit_code}"
    except GuestAgentUnavailable as exc:
        status, code, info = InvocationStatus.ERROR, "ClientNotResponse", \
            f"the guest agent did not answer: {exc}"
    except ComputeError as exc:
        status, code, info = InvocationStatus.ERROR, "ExecutionException", str(exc)
    with ctx.uow() as uow:
        record = uow.invocations.load(record_id)
        record.status, record.error_code, record.error_info = status, code, info
        record.exit_code, record.output, record.dropped = exit_code, output, dropped
        record.finished = utcnow()
        uow.commit()


def describe_invocation_results(ctx: ServiceContext, account_id: str, region_id: str, *,
                                invoke_id: str | None = None, instance_id: str | None = None,
                                command_id: str | None = None, record_status: str | None = None,
                                page_number: int | None = None, page_size: int | None = None,
                                next_token: str | None = None, max_results: int | None = None,
                                ) -> Page[Invocation]:
    """A page of the records, in either paging style."""
    rows = find_invocations(ctx, account_id, region_id, invoke_id=invoke_id,
                            instance_id=instance_id, command_id=command_id,
                            record_status=record_status)
    return page_list(rows, page_number=page_number, page_size=page_size,
                     next_token=next_token, max_results=max_results, max_page_size=50)


def find_invocations(ctx: ServiceContext, account_id: str, region_id: str, *,
                     invoke_id: str | None = None, instance_id: str | None = None,
                     command_id: str | None = None, record_status: str | None = None,
                     ) -> list[Invocation]:
    """Every record that matches, oldest first (DescribeInvocations groups them)."""
    criteria = Criteria(equals={"account_id": account_id, "region_id": region_id})
    for column, value in (("invoke_id", invoke_id), ("instance_id", instance_id),
                          ("command_id", command_id)):
        if value:
            criteria.equals[column] = value
    with ctx.uow(readonly=True) as uow:
        ctx.check_region(uow, region_id)
        rows = uow.invocations.find(criteria)
    if record_status:
        rows = [r for r in rows if r.record_status == record_status]
    return rows


def interrupt_running(ctx: ServiceContext) -> int:
    """At start-up: commands that were running when ecsnap stopped are reported failed."""
    with ctx.uow() as uow:
        rows = uow.invocations.find(status=InvocationStatus.RUNNING)
        for row in rows:
            row.status, row.error_code = InvocationStatus.ERROR, "ExecutionInterrupted"
            row.error_info = "ecsnap restarted while the command ran"
            row.finished = utcnow()
        uow.commit()
        return len(rows)
