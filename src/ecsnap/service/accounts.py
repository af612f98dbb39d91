"""Accounts and their AccessKey pairs; every resource belongs to one account.

AccessKey secrets are stored encrypted (AES-256-GCM, the key ID as associated data) with a
key kept outside the database, in `DATA_DIR/secret.key` (0600, created on first use, i.e.
at `ecsnap init`): a copy of the database alone hands out no secret, and the signature
checks (HMAC-SHA256 and HMAC-SHA1 both need the plain secret) decrypt it per lookup, and
an API process keeps the usable keys it decrypted for a minute (`signing_key`).
Rows written before (plain text) are encrypted at start-up (`seal_stored_secrets`).

Console passwords are scrypt hashes and must follow `check_password_policy`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain import errors, ids
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import QUOTA_KINDS, AccessKey, Account
from ecsnap.service import quotas
from ecsnap.service.context import ServiceContext

log = logging.getLogger("ecsnap.service.accounts")

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}

PASSWORD_MIN_LENGTH = 12
PASSWORD_MAX_LENGTH = 1024  # scrypt takes any length; a bound keeps a log-on cheap
SIGNING_KEY_TTL_S = 60.0  # signing_key: how long a usable key is used from the cache
SIGNING_KEYS_CACHED = 10_000  # ... and how many (the cache starts afresh past that)

SECRET_KEY_FILE = "secret.key"
_SEALED = "aesgcm1:"  # stored form: prefix + urlsafe-base64(nonce[12] + ciphertext + tag)
_BOX = "accounts.secret_box"  # ServiceContext.extras key of the loaded cipher


# ------------------------------------------------------------------ passwords


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


def check_password_policy(account_name: str, password: str) -> None:
    """The console password policy: at least 12 characters (at most 1024), not containing
    the account name (in any letter case), and not one character repeated.
    EcsError `InvalidPassword.Malformed` (400) saying which rule failed."""
    def refuse(why: str) -> EcsError:
        return EcsError("InvalidPassword.Malformed", f"The password {why}.", 400)

    if len(password) < PASSWORD_MIN_LENGTH:
        raise refuse(f"must be at least {PASSWORD_MIN_LENGTH} characters long")
    if len(password) > PASSWORD_MAX_LENGTH:
        raise refuse(f"must be at most {PASSWORD_MAX_LENGTH} characters long")
    if account_name and account_name.casefold() in password.casefold():
        raise refuse("must not contain the account name")
    if len(set(password)) == 1:
        raise refuse("must not be one character repeated")


def new_secret(length: int = 30) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


# ------------------------------------------------------------------ accounts


def create_account(ctx: ServiceContext, name: str, password: str | None = None) -> Account:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise EcsError("InvalidAccountName.Malformed",
                       "An account name is 1-64 letters, digits, '-', '_' or '.'.", 400)
    if password is not None:
        check_password_policy(name, password)
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


def change_password(ctx: ServiceContext, name: str, new_password: str, *,
                    current_password: str | None = None) -> None:
    """Set the console password of account `name` (policy: `check_password_policy`).
    With `current_password`, it must match first (`InvalidPassword.Mismatch`, 403).
    The account's console sessions end (they are bound to the password hash)."""
    check_password_policy(name, new_password)
    with ctx.uow() as uow:
        found = uow.accounts.find(name=name)
        if not found:
            raise EcsError("InvalidAccount.NotFound", f"No account {name}.", 404)
        account = found[0]
        if current_password is not None and not (
                account.password_hash and
                _password_matches(account.password_hash, current_password)):
            raise EcsError("InvalidPassword.Mismatch", "The current password is not correct.",
                           403)
        account.password_hash = hash_password(new_password)
        uow.commit()


def set_password(ctx: ServiceContext, name: str, password: str) -> None:
    """An administrator's password reset: `change_password` without the current one."""
    change_password(ctx, name, password)


def set_account_enabled(ctx: ServiceContext, name: str, enabled: bool) -> None:
    """Disable (or enable again) an account: a disabled account cannot log on to the
    console or sign API requests, and its open console sessions end."""
    with ctx.uow() as uow:
        found = uow.accounts.find(name=name)
        if not found:
            raise EcsError("InvalidAccount.NotFound", f"No account {name}.", 404)
        found[0].enabled = enabled
        uow.commit()


def disable_account(ctx: ServiceContext, name: str) -> None:
    set_account_enabled(ctx, name, False)


def enable_account(ctx: ServiceContext, name: str) -> None:
    set_account_enabled(ctx, name, True)


# ------------------------------------------------------------------ AccessKey secrets at rest


def secret_key_path(ctx: ServiceContext) -> Path:
    return ctx.settings.data_dir / SECRET_KEY_FILE


def _load_or_create_key(path: Path) -> bytes:
    """The 256-bit key in `path`, created (0600, atomically: a racing process keeps the
    first one written) when the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(base64.urlsafe_b64encode(AESGCM.generate_key(256)).decode() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)  # never replaces a key another process wrote meanwhile
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by others than its owner: chmod 600 it", path)
    key = base64.urlsafe_b64decode(path.read_text().strip())
    if len(key) != 32:
        raise RuntimeError(f"{path} does not hold a 256-bit key")
    return key


def _box(ctx: ServiceContext) -> AESGCM:
    box = ctx.extras.get(_BOX)
    if not isinstance(box, AESGCM):
        box = ctx.extras[_BOX] = AESGCM(_load_or_create_key(secret_key_path(ctx)))
    return box


def _seal(ctx: ServiceContext, key_id: str, secret: str) -> str:
    nonce = secrets.token_bytes(12)
    sealed = _box(ctx).encrypt(nonce, secret.encode(), key_id.encode())
    return _SEALED + base64.urlsafe_b64encode(nonce + sealed).decode()


def _unseal(ctx: ServiceContext, key_id: str, stored: str) -> str:
    """The plain secret of a stored one (rows not yet sealed are returned as they are)."""
    if not stored.startswith(_SEALED):
        return stored
    raw = base64.urlsafe_b64decode(stored[len(_SEALED):])
    return _box(ctx).decrypt(raw[:12], raw[12:], key_id.encode()).decode()


def seal_stored_secrets(ctx: ServiceContext) -> int:
    """Encrypt the AccessKey secrets still stored in plain text (databases written before
    secrets were encrypted); run at start-up. Returns how many rows it encrypted."""
    with ctx.uow(readonly=True) as uow:
        plain = [k.id for k in uow.access_keys.find() if not k.secret.startswith(_SEALED)]
    if not plain:
        return 0
    with ctx.uow() as uow:
        for key_id in plain:
            key = uow.access_keys.get(key_id)
            if key is not None and not key.secret.startswith(_SEALED):
                key.secret = _seal(ctx, key.id, key.secret)
        uow.commit()
    log.info("encrypted %d AccessKey secrets with %s", len(plain), secret_key_path(ctx))
    return len(plain)


# ------------------------------------------------------------------ AccessKeys


@dataclass(frozen=True)
class AccessKeyInfo:
    """An AccessKey without its secret (what listings show)."""

    id: str
    account_id: str
    account_name: str
    enabled: bool
    created: datetime


def _with_plain_secret(ctx: ServiceContext, key: AccessKey, secret: str | None = None,
                       enabled: bool | None = None) -> AccessKey:
    """A detached copy of `key` carrying the plain secret (never the stored row)."""
    return AccessKey(id=key.id, secret=secret if secret is not None else
                     _unseal(ctx, key.id, key.secret), account_id=key.account_id,
                     enabled=key.enabled if enabled is None else enabled, created=key.created)


def create_access_key(ctx: ServiceContext, account_name: str) -> AccessKey:
    """A new AccessKey pair; the returned object carries the plain secret (show it once:
    only its encrypted form is stored)."""
    with ctx.uow() as uow:
        found = uow.accounts.find(name=account_name)
        if not found:
            raise EcsError("InvalidAccount.NotFound", f"No account {account_name}.", 404)
        key_id, secret = ids.new_id("access_key"), new_secret()
        key = AccessKey(id=key_id, secret=_seal(ctx, key_id, secret), account_id=found[0].id)
        uow.access_keys.add(key)
        uow.commit()
        return _with_plain_secret(ctx, key, secret)


def list_access_keys(ctx: ServiceContext, account_name: str | None = None) -> list[AccessKeyInfo]:
    """The AccessKeys (of one account, else of all), oldest first, without secrets."""
    with ctx.uow(readonly=True) as uow:
        names = {a.id: a.name for a in uow.accounts.find()}
        if account_name is not None:
            owner = [i for i, n in names.items() if n == account_name]
            if not owner:
                raise EcsError("InvalidAccount.NotFound", f"No account {account_name}.", 404)
            keys = uow.access_keys.find(account_id=owner[0])
        else:
            keys = uow.access_keys.find()
        return sorted((AccessKeyInfo(k.id, k.account_id, names.get(k.account_id, ""),
                                     k.enabled, k.created) for k in keys),
                      key=lambda k: (k.created, k.id))


def _key_not_found(key_id: str) -> EcsError:
    return EcsError("InvalidAccessKeyId.NotFound", f"No AccessKey {key_id}.", 404)


def set_access_key_enabled(ctx: ServiceContext, key_id: str, enabled: bool) -> None:
    with ctx.uow() as uow:
        key = uow.access_keys.get(key_id)
        if key is None:
            raise _key_not_found(key_id)
        key.enabled = enabled
        uow.commit()


def disable_access_key(ctx: ServiceContext, key_id: str) -> None:
    """Signatures with this key are refused and console sessions opened with it end."""
    set_access_key_enabled(ctx, key_id, False)


def enable_access_key(ctx: ServiceContext, key_id: str) -> None:
    set_access_key_enabled(ctx, key_id, True)


def delete_access_key(ctx: ServiceContext, key_id: str) -> None:
    with ctx.uow() as uow:
        key = uow.access_keys.get(key_id)
        if key is None:
            raise _key_not_found(key_id)
        uow.access_keys.delete(key)
        uow.commit()


def rotate_access_key(ctx: ServiceContext, key_id: str, *,
                      delete_old: bool = False) -> AccessKey:
    """A new AccessKey pair for the account of `key_id`, and `key_id` disabled (or deleted,
    with `delete_old`), in one transaction. Returns the new key with its plain secret."""
    with ctx.uow() as uow:
        old = uow.access_keys.get(key_id)
        if old is None:
            raise _key_not_found(key_id)
        new_id, secret = ids.new_id("access_key"), new_secret()
        key = AccessKey(id=new_id, secret=_seal(ctx, new_id, secret),
                        account_id=old.account_id)
        uow.access_keys.add(key)
        if delete_old:
            uow.access_keys.delete(old)
        else:
            old.enabled = False
        uow.commit()
        return _with_plain_secret(ctx, key, secret)


def find_access_key(ctx: ServiceContext, key_id: str) -> AccessKey | None:
    """The AccessKey with its plain secret (for signature checks), `enabled` False when its
    account is disabled; None if there is none or its secret does not decrypt."""
    with ctx.uow(readonly=True) as uow:
        key = uow.access_keys.get(key_id)
        if key is None:
            return None
        account = uow.accounts.get(key.account_id)
        enabled = key.enabled and account is not None and account.enabled
    try:
        return _with_plain_secret(ctx, key, enabled=enabled)
    except (InvalidTag, ValueError):
        log.error("AccessKey %s: its secret does not decrypt with %s (was the key file "
                  "replaced?)", key_id, secret_key_path(ctx))
        return None


def authenticate_password(ctx: ServiceContext, name: str, password: str) -> Account | None:
    account = get_account(ctx, name)
    if account is None or not account.enabled or not account.password_hash:
        hash_password(password)  # same work either way
        return None
    return account if _password_matches(account.password_hash, password) else None


def authenticate_access_key(ctx: ServiceContext, key_id: str, secret: str) -> Account | None:
    key = find_access_key(ctx, key_id)
    if key is None or not key.enabled or not hmac.compare_digest(key.secret.encode(),
                                                                 secret.encode()):
        return None
    with ctx.uow(readonly=True) as uow:
        return uow.accounts.get(key.account_id)


def signing_key(ctx: ServiceContext, key_id: str) -> AccessKey | None:
    """`find_access_key` for an API request's signature check, from this process's cache
    of usable keys when it is there (SIGNING_KEY_TTL_S at most): a request then reads no
    key from the database, and decrypts no secret. A key disabled or deleted since is not
    missed: the request's `spend_nonce` stores its nonce only while the key and its
    account are enabled, and refuses it otherwise. Keys that are not usable are not
    cached (the database says so again on every request)."""
    now = time.monotonic()
    cached = ctx.signing_keys.get(key_id)
    if cached is not None and now - cached[1] < SIGNING_KEY_TTL_S:
        return cached[0]
    key = find_access_key(ctx, key_id)
    if key is not None and key.enabled:
        if len(ctx.signing_keys) >= SIGNING_KEYS_CACHED:
            ctx.signing_keys.clear()
        ctx.signing_keys[key_id] = (key, now)
    return key


def spend_nonce(ctx: ServiceContext, key_id: str, nonce: str, expires: datetime,
                now: datetime) -> bool:
    """Store an API request's signature nonce (in the database, so a restart does not
    forget it) while its AccessKey and account are enabled. False if the nonce was used
    within its window; InvalidAccessKeyId.NotFound or Forbidden.AccessKeyDisabled if the
    key is no longer usable (the signature was checked with a cached one)."""
    with ctx.uow(readonly=True) as uow:
        if uow.spend_nonce(key_id, nonce, expires, now):
            return True
    ctx.signing_keys.pop(key_id, None)
    key = find_access_key(ctx, key_id)
    if key is None:
        raise errors.access_key_not_found()
    if not key.enabled:
        raise errors.access_key_disabled()
    return False


# ------------------------------------------------------------------ quotas


@dataclass(frozen=True)
class QuotaLine:
    kind: str  # one of domain.model.QUOTA_KINDS
    limit: int | None  # None: no limit
    used: int
    own: bool  # set for this account (else the default of the settings)


def set_quotas(ctx: ServiceContext, name: str, values: dict[str, int]) -> None:
    """Set some of an account's quotas (a negative value: no limit); `clear_quotas` goes
    back to the settings' defaults. InvalidParameter for an unknown kind."""
    bad = [k for k in values if k not in QUOTA_KINDS]
    if bad:
        raise EcsError("InvalidParameter",
                       f"Unknown quota {bad[0]}; quotas are {', '.join(QUOTA_KINDS)}.", 400)
    with ctx.uow() as uow:
        account = _account(uow, name)
        account.quotas = {**account.quotas, **{k: int(v) for k, v in values.items()}}
        uow.commit()


def clear_quotas(ctx: ServiceContext, name: str) -> None:
    """The account takes the settings' default quotas again."""
    with ctx.uow() as uow:
        _account(uow, name).quotas = {}
        uow.commit()


def quota_report(ctx: ServiceContext, name: str) -> list[QuotaLine]:
    with ctx.uow(readonly=True) as uow:
        account = _account(uow, name)
        limit = quotas.limits(ctx, uow, account.id)
        used = quotas.usage(uow, account.id, dict.fromkeys(QUOTA_KINDS, 1))
    return [QuotaLine(k, limit[k], used.get(k, 0), k in account.quotas) for k in QUOTA_KINDS]


def _account(uow: UnitOfWork, name: str) -> Account:
    found = uow.accounts.find(name=name)
    if not found:
        raise EcsError("InvalidAccount.NotFound", f"No account {name}.", 404)
    return found[0]
