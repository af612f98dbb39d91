"""Cloud Assistant: run a shell command in Running instances through the guest agent.

This is the seed's "log on to the instance and check the data". Each RunCommand is one
InvokeId with one record per instance; the command runs in the background and its
result (exit code, output, error code) is kept for DescribeInvocationResults.

On one host the records are run in the runner's command pool. In cluster mode the API
process has no hypervisor: the record is the job, as a task's row is (service/cluster.py).
RunCommand writes it routed to the instance's host (`Invocation.host_id`) with a NOTIFY on
the agents' channel, in its one transaction; the agent of that host claims it (`claim`:
FOR UPDATE SKIP LOCKED, owner and epoch set), runs it through the guest agent and writes
the result only if its host is still Up at the epoch that claimed it (`hold_epoch`, as
its tasks' commits). Its lease is its host's: a command is never run twice (it may have
had effects), so an invocation whose agent died is reported interrupted
(`ExecutionInterrupted`, as start-up recovery reports the ones a restart cut short) when
the host is fenced or its agent rejoins under a new epoch (`interrupt_host`).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Sequence
from datetime import datetime

from ecsnap.adapters.compute.base import ComputeError, GuestAgentUnavailable
from ecsnap.adapters.store.base import Criteria, UnitOfWork
from ecsnap.domain import errors, ids, rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InstanceStatus, Invocation, InvocationStatus, utcnow
from ecsnap.service.context import ServiceContext, get_instance
from ecsnap.service.listing import Page, page_list

OUTPUT_CAP = 24 * 1024
AGENTS_CHANNEL = "ecsnap_tasks"  # the agents' wake-up, cluster.CHANNEL (cluster is above)

log = logging.getLogger("ecsnap.commands")


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
    if len(instance_ids) > 50:
        raise EcsError("InstanceIds.ExceedLimit", "At most 50 instances per command.", 403)
    if len(name) > 128:
        raise EcsError("CmdName.ExceedLimit", "The command name exceeds 128 characters.", 403)
    if not 1 <= timeout <= 86400:
        raise errors.invalid_parameter("Timeout", "It is 1 to 86400 seconds.")
    command_id, invoke_id = ids.new_id("command"), ids.new_id("task")
    records = []
    routed = ctx.settings.cluster  # carried to the instance's agent (module docstring)
    hosts: dict[str, str | None] = {}
    with ctx.uow() as uow:
        ctx.check_region(uow, region_id)
        for instance_id in instance_ids:
            inst = get_instance(uow, account_id, instance_id, region_id)
            rules.require_instance_status(inst, InstanceStatus.RUNNING)
            hosts[instance_id] = inst.host_id if routed else None
            if routed and not inst.host_id:  # (placement gives every Running one a host)
                raise EcsError("IncorrectInstanceStatus", f"The instance {instance_id} "
                               "is not placed on a host.", 403)
        _check_concurrency(ctx, uow, account_id, instance_ids)
        for instance_id in instance_ids:
            record = Invocation(id=ids.new_id("task"), invoke_id=invoke_id,
                                command_id=command_id, account_id=account_id,
                                region_id=region_id, instance_id=instance_id,
                                command_type=command_type, command_content=content, name=name,
                                working_dir=working_dir, timeout=timeout,
                                host_id=hosts[instance_id])
            uow.invocations.add(record)
            records.append(record.id)
        if routed:
            uow.notify(AGENTS_CHANNEL)  # sent when this transaction commits
        uow.commit()
    if routed:
        return command_id, invoke_id
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


def claim(ctx: ServiceContext, host_id: str, epoch: int, limit: int) -> list[str]:
    """The agent of `host_id`: take up to `limit` invocations routed to it, under `epoch`
    (none if the host is no longer Up at it); run each with `run_claimed`."""
    if limit <= 0:
        return []
    with ctx.uow() as uow:
        if not uow.hold_epoch(host_id, epoch):
            return []
        picked = uow.claim_invocations(host_id, epoch, uow.clock(), limit)
        uow.commit()
    return picked


def run_claimed(ctx: ServiceContext, record_id: str, host_id: str, epoch: int) -> None:
    """Run an invocation this agent claimed (`claim`) and write its result, fenced."""
    _execute(ctx, record_id, owner=(host_id, epoch))


def _execute(ctx: ServiceContext, record_id: str,
             owner: tuple[str, int] | None = None) -> None:
    if owner is None:
        with ctx.uow() as uow:
            record = uow.invocations.load(record_id)
            record.started = utcnow()
            uow.commit()
    else:  # claimed: started then; the VM must be this host's (a fence may have moved it)
        with ctx.uow(readonly=True) as uow:
            record = uow.invocations.load(record_id)
            inst = uow.instances.get(record.instance_id)
        if inst is None or inst.status != InstanceStatus.RUNNING or \
                inst.host_id != owner[0]:
            _write_result(ctx, record_id, owner, status=InvocationStatus.ERROR,
                          code="InstanceNotRunning", info="the instance is not running "
                          "on the host that took the command")
            return
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
    _write_result(ctx, record_id, owner, status=status, code=code, info=info,
                  exit_code=exit_code, output=output, dropped=dropped)


def _write_result(ctx: ServiceContext, record_id: str, owner: tuple[str, int] | None, *,
                  status: InvocationStatus, code: str, info: str, exit_code: int | None = None,
                  output: str = "", dropped: int = 0) -> None:
    """The end of a run. A claimed one's is written only if its host is still Up at the
    epoch that claimed it (held FOR SHARE to the commit: a fence waits for it, or it sees
    the fence) and the record still its own and Running; else it is dropped."""
    with ctx.uow() as uow:
        if owner is not None and not uow.hold_epoch(*owner):
            log.warning("invocation %s: host %s was fenced (epoch %d); its result is "
                        "dropped", record_id, *owner)
            return
        record = uow.invocations.load(record_id)
        if owner is not None and ((record.owner, record.owner_epoch) != owner or
                                  record.status != InvocationStatus.RUNNING):
            log.warning("invocation %s is no longer %s's; its result is dropped", record_id,
                        owner[0])
            return
        record.status, record.error_code, record.error_info = status, code, info
        record.exit_code, record.output, record.dropped = exit_code, output, dropped
        record.finished = utcnow() if owner is None else uow.clock()
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
        _interrupt(rows, "ecsnap restarted while the command ran", utcnow())
        uow.commit()
        return len(rows)


def interrupt_host(uow: UnitOfWork, host_id: str, *, before_epoch: int | None = None,
                   ) -> list[str]:
    """Cluster mode, in the caller's transaction: the Running invocations of a host whose
    agent is gone are reported failed (`ExecutionInterrupted`), as start-up recovery
    reports them. Its fence (`before_epoch` None): all of them, claimed or not (its VMs
    are gone for the cluster). Its agent rejoining under `before_epoch`: the ones claimed
    under an older epoch (the ones not claimed yet are run now). Their IDs."""
    rows = [r for r in uow.invocations.find(host_id=host_id, status=InvocationStatus.RUNNING)
            if before_epoch is None or (r.owner == host_id and r.owner_epoch < before_epoch)]
    why = f"the agent of host {host_id} stopped while the command ran" \
        if before_epoch is not None else \
        f"the host {host_id} was fenced (its agent stopped answering)"
    _interrupt(rows, why, uow.clock())
    return [r.id for r in rows]


def _interrupt(rows: Sequence[Invocation], why: str, at: datetime) -> None:
    for row in rows:
        row.status, row.error_code = InvocationStatus.ERROR, "ExecutionInterrupted"
        row.error_info = why
        row.finished = at
