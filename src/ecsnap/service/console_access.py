"""The web console's access: serial console sockets, session validity, log-on throttling.

Log-on throttling counts failed console log-ons per account name (or AccessKey ID) and per
client address, in a window (`Settings.logon_window_s`). After the first
`FREE_FAILURES` failures each further attempt must wait a growing delay (1 s, 2 s, 4 s...
at most `MAX_DELAY_S`); after `Settings.logon_max_failures` failures for an account
(`logon_max_failures_per_address` for an address) it is locked for
`Settings.logon_lockout_s`. Refused attempts are not checked and not counted. The state
is kept in `DATA_DIR/logon-throttle.json` (under a file lock), so the administrator's
commands in another process see it: `list_logon_lockouts`, `clear_logon_lockouts`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecsnap.domain import rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InstanceStatus
from ecsnap.service.context import ServiceContext, get_instance

THROTTLE_FILE = "logon-throttle.json"
FREE_FAILURES = 3  # failures in a window before attempts must wait
MAX_DELAY_S = 30.0
MAX_ENTRIES = 10_000  # the oldest entries go first beyond this (random-name sprays)
KINDS = ("account", "access_key", "address")


def serial_console(ctx: ServiceContext, account_id: str, instance_id: str) -> str:
    """The unix socket of the instance's serial console; only its owner may have it."""
    with ctx.uow() as uow:
        inst = get_instance(uow, account_id, instance_id)
        rules.require_instance_status(inst, InstanceStatus.RUNNING)
    return ctx.compute.serial_socket(instance_id)


def serial_refusal(ctx: ServiceContext, account_id: str, instance_id: str) -> str:
    """Why this process cannot open the instance's serial console, or "" if it can. In
    cluster mode an API process has no hypervisor: the console's socket is on the
    instance's host, and the console page says so (no terminal) instead of failing to
    connect; Cloud Assistant commands are carried to that host's agent."""
    if not ctx.settings.cluster:
        return ""
    with ctx.uow(readonly=True) as uow:
        inst = get_instance(uow, account_id, instance_id)
    where = f"on its host {inst.host_id}" if inst.host_id else "on its host"
    return (f"The serial console of {inst.id} is {where}, and this console runs in an "
            "API process of a cluster, which has no hypervisor. Run commands in the "
            "instance with Cloud Assistant (RunCommand, `ecsnap run`) instead: "
            "they are carried to its host's agent.")


# ------------------------------------------------------------------ console sessions


def session_stamp(ctx: ServiceContext, account_id: str,
                  access_key_id: str | None = None) -> str | None:
    """What a console session is bound to: a digest of the account's password hash (so a
    password change ends every session of the account), or None when the session must
    end: the account is gone or disabled, or, for a session opened with an AccessKey
    pair, that key is disabled, deleted or rotated away. The console takes it at log-on
    and compares it on every request (the CLI that disables an account runs in another
    process, so this is read from the database, not signalled)."""
    with ctx.uow(readonly=True) as uow:
        account = uow.accounts.get(account_id)
        if account is None or not account.enabled:
            return None
        if access_key_id is not None:
            key = uow.access_keys.get(access_key_id)
            if key is None or not key.enabled or key.account_id != account_id:
                return None
        return hashlib.sha256(f"{account.id}\0{account.password_hash}".encode()).hexdigest()


# ------------------------------------------------------------------ log-on throttling


def _now() -> float:
    return time.time()


@dataclass(frozen=True)
class LogonVerdict:
    allowed: bool
    retry_after: float = 0.0  # seconds
    locked: bool = False  # a lockout (else a delay) refused the attempt
    kind: str = ""  # what refused it: "account", "access_key" or "address"


@dataclass(frozen=True)
class LogonLockout:
    kind: str  # "account", "access_key" or "address"
    name: str  # the account name, the AccessKey ID or the client address
    failures: int  # in the current window
    last_failure: float  # epoch seconds
    locked_until: float | None  # epoch seconds; None: throttled (delayed), not locked
    retry_after: float  # seconds until the next attempt is taken


_thread_lock = threading.Lock()


@contextlib.contextmanager
def _throttle_state(ctx: ServiceContext) -> Iterator[dict[str, dict[str, Any]]]:
    """The throttle entries, locked across threads and processes; written back on exit."""
    path = ctx.settings.data_dir / THROTTLE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_suffix(".lock")
    with _thread_lock, open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = _read(path)
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                _write(path, state)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, state: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh)
    os.replace(tmp, path)


def _key(kind: str, name: str) -> str:
    return f"{kind}:{name[:256]}"


def _limit(ctx: ServiceContext, kind: str) -> int:
    s = ctx.settings
    return s.logon_max_failures_per_address if kind == "address" else s.logon_max_failures


def _delay(failures: int) -> float:
    """How long after the last failure the next attempt must wait."""
    if failures < FREE_FAILURES:
        return 0.0
    return min(2.0 ** (failures - FREE_FAILURES), MAX_DELAY_S)


def _prune(ctx: ServiceContext, state: dict[str, dict[str, Any]], now: float) -> None:
    window = ctx.settings.logon_window_s
    for key in list(state):
        e = state[key]
        locked = (e.get("locked_until") or 0) > now
        if not locked and (e.get("locked_until") or now - e.get("first", 0) > window):
            del state[key]  # a lockout ran out, or the window passed
    if len(state) > MAX_ENTRIES:
        for key in sorted(state, key=lambda k: state[k].get("last", 0))[:-MAX_ENTRIES]:
            del state[key]


def _retry_after(entry: dict[str, Any], now: float) -> float:
    if (entry.get("locked_until") or 0) > now:
        return float(entry["locked_until"]) - now
    return max(0.0, entry.get("last", 0) + _delay(int(entry.get("failures", 0))) - now)


def _subjects(kind: str, name: str, address: str) -> list[tuple[str, str]]:
    if kind not in ("account", "access_key"):
        raise ValueError(f"unknown log-on kind {kind!r}")
    return [(kind, name), ("address", address)]


def check_logon(ctx: ServiceContext, kind: str, name: str, address: str) -> LogonVerdict:
    """May a log-on as `name` (`kind` "account" or "access_key") from `address` be checked
    now? Refused while either is locked or within its delay after a failure."""
    now = _now()
    with _throttle_state(ctx) as state:
        _prune(ctx, state, now)
        worst = LogonVerdict(True)
        for subject_kind, subject in _subjects(kind, name, address):
            entry = state.get(_key(subject_kind, subject))
            if entry is None:
                continue
            wait = _retry_after(entry, now)
            if wait > worst.retry_after:
                worst = LogonVerdict(False, wait, (entry.get("locked_until") or 0) > now,
                                     subject_kind)
        return worst


def record_logon_failure(ctx: ServiceContext, kind: str, name: str, address: str) -> None:
    """Count a failed log-on against the account (or AccessKey ID) and the address."""
    now = _now()
    with _throttle_state(ctx) as state:
        _prune(ctx, state, now)
        for subject_kind, subject in _subjects(kind, name, address):
            entry = state.setdefault(_key(subject_kind, subject),
                                     {"failures": 0, "first": now})
            entry["failures"] = int(entry["failures"]) + 1
            entry["last"] = now
            if entry["failures"] >= _limit(ctx, subject_kind):
                entry["locked_until"] = now + ctx.settings.logon_lockout_s


def record_logon_success(ctx: ServiceContext, kind: str, name: str, address: str) -> None:
    """A log-on succeeded: forget the account's failures (not the address's: one valid
    account must not reset the count of an address guessing at others)."""
    with _throttle_state(ctx) as state:
        _subjects(kind, name, address)
        state.pop(_key(kind, name), None)


def list_logon_lockouts(ctx: ServiceContext, *,
                        include_throttled: bool = False) -> list[LogonLockout]:
    """The locked accounts, AccessKey IDs and client addresses (with `include_throttled`
    also those only delayed, or with failures not yet delayed), most recent first."""
    now = _now()
    with _throttle_state(ctx) as state:
        _prune(ctx, state, now)
        out = []
        for key, e in state.items():
            kind, _, name = key.partition(":")
            locked = (e.get("locked_until") or 0) > now
            if locked or include_throttled:
                out.append(LogonLockout(kind, name, int(e.get("failures", 0)),
                                        float(e.get("last", 0)),
                                        float(e["locked_until"]) if locked else None,
                                        _retry_after(e, now)))
    return sorted(out, key=lambda x: -x.last_failure)


def clear_logon_lockouts(ctx: ServiceContext, kind: str | None = None,
                         name: str | None = None) -> int:
    """Forget the failures (and lift the lockout) of one account / AccessKey ID / address
    (`kind` and `name`), of every entry of a `kind`, or of all. Returns how many went;
    `InvalidParameter` (400) for an unknown kind."""
    if kind is not None and kind not in KINDS:
        raise EcsError("InvalidParameter", f"The kind must be one of {', '.join(KINDS)}.", 400)
    with _throttle_state(ctx) as state:
        gone = [k for k in state if
                (kind is None or k.partition(":")[0] == kind) and
                (name is None or k.partition(":")[2] == name)]
        for k in gone:
            del state[k]
        return len(gone)
