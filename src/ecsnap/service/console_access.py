"""Access to an instance's serial console (for the web console's Connect)."""

from __future__ import annotations

from ecsnap.domain import rules
from ecsnap.domain.model import InstanceStatus
from ecsnap.service.context import ServiceContext, get_instance


def serial_console(ctx: ServiceContext, account_id: str, instance_id: str) -> str:
    """The unix socket of the instance's serial console; only its owner may have it."""
    with ctx.uow() as uow:
        inst = get_instance(uow, account_id, instance_id)
        rules.require_instance_status(inst, InstanceStatus.RUNNING)
    return ctx.compute.serial_socket(instance_id)
