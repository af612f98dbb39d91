"""First set-up of a data directory: region, admin account, first AccessKey (idempotent)."""

from __future__ import annotations

from dataclasses import dataclass

from ecsnap.domain.model import AccessKey, Account, Region
from ecsnap.service import accounts, regions
from ecsnap.service.context import ServiceContext

ADMIN = "admin"


@dataclass
class Initialised:
    region: Region
    account: Account
    access_key: AccessKey
    password: str | None  # only when the admin account was created now


def initialise(ctx: ServiceContext, region_id: str) -> Initialised:
    s = ctx.settings
    region = regions.ensure_region(ctx, region_id, vcpus=s.region_vcpus,
                                   memory_mib=s.region_memory_mib,
                                   instance_types=s.instance_types)
    account = accounts.get_account(ctx, ADMIN)
    password = None
    if account is None:
        password = accounts.new_secret(16)
        account = accounts.create_account(ctx, ADMIN, password)
    with ctx.uow(readonly=True) as uow:
        keys = sorted(uow.access_keys.find(account_id=account.id),
                      key=lambda k: (not k.enabled, k.created))  # rotation disables the old
    found = accounts.find_access_key(ctx, keys[0].id) if keys else None  # the plain secret
    key = found if found is not None else accounts.create_access_key(ctx, ADMIN)
    return Initialised(region, account, key, password)
