"""The web console's access: serial console sockets, session validity, log-on throttling.

Serial consoles in a cluster: an API process has no hypervisor, so the console proxies the
browser's WebSocket to the agent of the instance's host (`ecsnap agent --address`), which
opens the VM's serial socket there. After its own checks (session, origin, the owner's
instance, Running on host H with an address) the API process gives the agent a token
`EXPIRY.NONCE.MAC`, MAC = HMAC-SHA256(H's `serial_secret`, instance, expiry, nonce), the
expiry `SERIAL_TOKEN_TTL_S` ahead on the database server's clock (hosts' clocks need not
agree). The agent (`agent_serial_console`) takes it once, before it expires, for an
instance Running on its own host only. The secret is made when the agent first registers
and lives in the database, the state every process already trusts.

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
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ecsnap.domain import rules
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Host, HostState, InstanceStatus
from ecsnap.service.context import ServiceContext, get_instance

THROTTLE_FILE = "logon-throttle.json"
FREE_FAILURES = 3  # failures in a window before attempts must wait
MAX_DELAY_S = 30.0
MAX_ENTRIES = 10_000  # the oldest entries go first beyond this (random-name sprays)
KINDS = ("account", "access_key", "address")


SERIAL_TOKEN_TTL_S = 30  # how long an API process's token to an agent is good for
SERIAL_TOKEN_HEADER = "x-ecsnap-serial-token"  # how the API process sends it to the agent


@dataclass(frozen=True)
class AgentSerial:
    """The serial console of an instance on another host (cluster mode): the WebSocket of
    that host's agent and the short-lived token that opens it (in `SERIAL_TOKEN_HEADER`)."""

    host_id: str
    url: str
    token: str = field(repr=False)


def serial_console(ctx: ServiceContext, account_id: str, instance_id: str) -> str | AgentSerial:
    """The instance's serial console; only its owner may have it, and only Running. On the
    single-host server, the unix socket of its VM; in a cluster, its host's agent
    (`AgentSerial`), refused (an ECS error) when that agent has no --address or is down."""
    if not ctx.settings.cluster:
        with ctx.uow() as uow:
            inst = get_instance(uow, account_id, instance_id)
            rules.require_instance_status(inst, InstanceStatus.RUNNING)
        return ctx.compute.serial_socket(instance_id)
    with ctx.uow() as uow:  # writes nothing; a read-only one has no clock
        inst = get_instance(uow, account_id, instance_id)
        rules.require_instance_status(inst, InstanceStatus.RUNNING)
        host = uow.hosts.get(inst.host_id) if inst.host_id else None
        if host is None or host.state != HostState.UP:
            raise EcsError("IncorrectInstanceStatus", f"The host of {inst.id} "
                           f"({inst.host_id or 'none'}) is not up.", 403)
        if not host.address or not host.serial_secret:
            raise EcsError("SerialConsoleUnavailable", _no_address(inst.id, host.id), 403)
        expiry = _seconds(uow.clock()) + SERIAL_TOKEN_TTL_S
        nonce = secrets.token_hex(16)
        token = f"{expiry}.{nonce}.{_serial_mac(host.serial_secret, inst.id, expiry, nonce)}"
        return AgentSerial(host.id, f"ws://{host.address}/serial/{inst.id}", token)


def agent_serial_console(ctx: ServiceContext, host_id: str, instance_id: str,
                         token: str) -> str:
    """For the agent of `host_id`: the unix socket of the instance's serial console, if
    `token` is an API process's token for it (`serial_console`), not expired and not used
    before, and the instance is Running on this host. `InvalidSerialToken` (401) for a bad,
    expired or replayed token; `InvalidInstanceId.NotFound` (404) for an instance that is
    not on this host; `IncorrectInstanceStatus` (403) when it is not Running."""
    refused = EcsError("InvalidSerialToken", "The serial console token is not valid.", 401)
    expiry_text, _, rest = token.partition(".")
    nonce, _, mac = rest.partition(".")
    if not expiry_text.isdigit() or len(expiry_text) > 12 or not nonce or not mac:
        raise refused
    expiry = int(expiry_text)
    with ctx.uow() as uow:  # writes nothing; a read-only one has no clock
        now = _seconds(uow.clock())
        host = uow.hosts.get(host_id)
        secret = host.serial_secret if host is not None else ""
        inst = uow.instances.get(instance_id)
        on_host = inst is not None and inst.host_id == host_id
    if not secret or not hmac.compare_digest(
            _serial_mac(secret, instance_id, expiry, nonce).encode(), mac.encode()):
        raise refused
    if not now <= expiry <= now + SERIAL_TOKEN_TTL_S + 5:  # expired, or not one of ours
        raise EcsError("InvalidSerialToken", "The serial console token expired.", 401)
    if not _first_use(mac, expiry, now):
        raise EcsError("InvalidSerialToken", "The serial console token was used already.",
                       401)
    if inst is None or not on_host:
        raise EcsError("InvalidInstanceId.NotFound",
                       f"The instance {instance_id} is not on host {host_id}.", 404)
    rules.require_instance_status(inst, InstanceStatus.RUNNING)
    return ctx.compute.serial_socket(instance_id)


def serial_refusal(ctx: ServiceContext, account_id: str, instance_id: str) -> str:
    """Why the console cannot show the instance's serial console, or "" if it can (then a
    connection that fails says so by its close code). In cluster mode the console is
    proxied to the agent of the instance's host: refused when that agent has no address."""
    if not ctx.settings.cluster:
        return ""
    with ctx.uow(readonly=True) as uow:
        inst = get_instance(uow, account_id, instance_id)
        host: Host | None = uow.hosts.get(inst.host_id) if inst.host_id else None
    if host is None or host.address:
        return ""
    return _no_address(inst.id, host.id)


def _no_address(instance_id: str, host_id: str) -> str:
    return (f"The serial console of {instance_id} is unavailable: the agent of its host "
            f"{host_id} was started without --address, so this console cannot reach it. "
            "Run commands in the instance with Cloud Assistant (RunCommand, `ecsnap run`) "
            "instead, or restart that agent with --address HOST:PORT.")


def _seconds(at: datetime) -> int:
    """A database clock reading (naive UTC) as Unix seconds."""
    return int(at.replace(tzinfo=UTC).timestamp())


def _serial_mac(secret: str, instance_id: str, expiry: int, nonce: str) -> str:
    message = f"ecsnap-serial\0{instance_id}\0{expiry}\0{nonce}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


_used_tokens: dict[str, int] = {}  # this agent's tokens taken: MAC -> expiry
_used_lock = threading.Lock()


def _first_use(mac: str, expiry: int, now: int) -> bool:
    """Record a token as taken; False if it was taken before (a replay)."""
    with _used_lock:
        for old in [m for m, e in _used_tokens.items() if e < now]:
            del _used_tokens[old]
        if mac in _used_tokens:
            return False
        _used_tokens[mac] = expiry
        return True


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
