"""Building block: what an account may hold (its quotas) and what it holds now.

Limits are the account's own (set by the admin, `accounts.set_quotas`), else the defaults of
the settings (`default_quotas`); a negative limit means none. Usage is counted from the rows
in the caller's transaction, so a check and the rows it admits commit together.
"""

from __future__ import annotations

from collections.abc import Mapping

from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain import rules
from ecsnap.domain.model import QUOTA_KINDS
from ecsnap.service.context import ServiceContext


def limits(ctx: ServiceContext, uow: UnitOfWork, account_id: str) -> dict[str, int | None]:
    account = uow.accounts.get(account_id)
    defaults = ctx.settings.default_quotas
    if account is None:  # accounts made outside the account service (tests, benchmarks)
        return {k: (None if defaults.get(k, -1) < 0 else defaults[k]) for k in QUOTA_KINDS}
    return {k: account.quota(k, defaults) for k in QUOTA_KINDS}


def usage(uow: UnitOfWork, account_id: str, kinds: Mapping[str, int]) -> dict[str, int]:
    """What the account holds of the `kinds` asked about (only those are counted)."""
    used: dict[str, int] = {}
    if {"instances", "vcpus", "memory_mib"} & kinds.keys():
        held = uow.instances.find(account_id=account_id)
        used.update(instances=len(held), vcpus=sum(i.vcpus for i in held),
                    memory_mib=sum(i.memory_mib for i in held))
    if {"disks", "disk_gib"} & kinds.keys():
        disks = uow.disks.find(account_id=account_id, released=False)
        used.update(disks=len(disks), disk_gib=sum(d.size_gib for d in disks))
    if "snapshots" in kinds:
        used["snapshots"] = uow.snapshots.count(account_id=account_id)
    return used


def check(ctx: ServiceContext, uow: UnitOfWork, account_id: str,
          wanted: Mapping[str, int]) -> dict[str, int]:
    """The ECS QuotaExceed.* error if `wanted` more would exceed one of the account's quotas;
    else what the account uses of the kinds asked about (counted for the check)."""
    wanted = {k: v for k, v in wanted.items() if v > 0}
    if not wanted:
        return {}
    used = usage(uow, account_id, wanted)
    rules.check_quota(limits(ctx, uow, account_id), used, wanted)
    return used


def how_many_fit(ctx: ServiceContext, uow: UnitOfWork, account_id: str,
                 each: Mapping[str, int], most: int) -> int:
    return rules.times_within_quota(limits(ctx, uow, account_id),
                                    usage(uow, account_id, each), each, most)
