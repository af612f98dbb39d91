"""Accounts and their AccessKey pairs; every resource belongs to one account."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from datetime import datetime

from ecsnap.domain import ids
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import AccessKey, Account
from ecsnap.service.context import ServiceContext

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${digest.hex()}"


def _password_matches(stored: str, password: str) -> bool:
    try:
        _, salt_hex, _ = stored.split("$")
    except ValueError:
        return False
    return hmac.compare_digest(hash_password(password, bytes.fromhex(salt_hex)), stored)


def new_secret(length: int = 30) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


def create_account(ctx: ServiceContext, name: str, password: str | None = None) -> Account:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise EcsError("InvalidAccountName.Malformed",
                       "An account name is 1-64 letters, digits, '-', '_' or '.'.", 400)
    with ctx.uow() as uow:
        if uow.accounts.find(name=name):
            raise EcsError("AccountAlreadyExists", f"The account {name} exists already.", 409)
        account = Account(id=ids.new_id("account"), name=name,
                          password_hash=hash_password(password) if password else "")
        uow.accounts.add(account)
        uow.commit()
        return account


def get_account(ctx: ServiceContext, name: str) -> Account | None:
    with ctx.uow(readonly=True) as uow:
        found = uow.accounts.find(name=name)
        return found[0] if found else None


def set_password(ctx: ServiceContext, name: str, password: str) -> None:
    with ctx.uow() as uow:
        found = uow.accounts.find(name=name)
        if not found:
            raise EcsError("InvalidAccount.NotFound", f"No account {name}.", 404)
        found[0].password_hash = hash_password(password)
        uow.commit()


def create_access_key(ctx: ServiceContext, account_name: str) -> AccessKey:
    with ctx.uow() as uow:
        found = uow.accounts.find(name=account_name)
        if not found:
            raise EcsError("InvalidAccount.NotFound", f"No account {account_name}.", 404)
        key = AccessKey(id=ids.new_id("access_key"), secret=new_secret(),
                        account_id=found[0].id)
        uow.access_keys.add(key)
        uow.commit()
        return key


def set_access_key_enabled(ctx: ServiceContext, key_id: str, enabled: bool) -> None:
    with ctx.uow() as uow:
        key = uow.access_keys.get(key_id)
        if key is None:
            raise EcsError("InvalidAccessKeyId.NotFound", f"No AccessKey {key_id}.", 404)
        key.enabled = enabled
        uow.commit()


def find_access_key(ctx: ServiceContext, key_id: str) -> AccessKey | None:
    with ctx.uow(readonly=True) as uow:
        key = uow.access_keys.get(key_id)
        if key is None:
            return None
        account = uow.accounts.get(key.account_id)
        if account is None or not account.enabled:
            key.enabled = False
        return key


def authenticate_password(ctx: ServiceContext, name: str, password: str) -> Account | None:
    account = get_account(ctx, name)
    if account is None or not account.enabled or not account.password_hash:
        hash_password(password)  # same work either way
        return None
    return account if _password_matches(account.password_hash, password) else None


def authenticate_access_key(ctx: ServiceContext, key_id: str, secret: str) -> Account | None:
    key = find_access_key(ctx, key_id)
    if key is None or not key.enabled or not hmac.compare_digest(key.secret, secret):
        return None
    with ctx.uow() as uow:
        return uow.accounts.get(key.account_id)


def remember_nonce(ctx: ServiceContext, key_id: str, nonce: str, expires: datetime,
                   now: datetime) -> bool:
    """False if the nonce was used within its window (kept in the database, so a restart
    does not forget it)."""
    with ctx.uow() as uow:
        fresh = uow.remember_nonce(key_id, nonce, expires, now)
        uow.commit()
        return fresh
