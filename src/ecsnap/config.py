"""Settings of ecsnap, in one place: defaults, then `DATA_DIR/config.json`, then environment.

Environment variables: ECSNAP_DATA_DIR, ECSNAP_DATABASE_URL, ECSNAP_ACCEL (auto|kvm|tcg),
ECSNAP_SIGNATURE_WINDOW (minutes), ECSNAP_CACHE_DIR, ECSNAP_CRASH_AT (fault injection for
crash tests: the process kills itself with SIGKILL at the named task step), ECSNAP_CLUSTER
(1: cluster mode), ECSNAP_HOST_TIMEOUT and ECSNAP_HEARTBEAT (seconds), ECSNAP_RESTART_FENCED
(0: a fenced host's instances are not started again elsewhere).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = "~/.local/share/ecsnap"
LOCAL_DATA_DIR = "var/data"  # `make run`'s, relative to the current directory


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: `data_dir` (--data-dir) when given, else $ECSNAP_DATA_DIR, else
    ./var/data when it exists in the current directory (`make run` made it), else
    ~/.local/share/ecsnap. Nothing is created here."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("ECSNAP_DATA_DIR"):
        return Path(os.environ["ECSNAP_DATA_DIR"]).expanduser()
    if Path(LOCAL_DATA_DIR).is_dir():
        return Path(LOCAL_DATA_DIR).resolve()
    return Path(DEFAULT_DATA_DIR).expanduser()


def is_initialised(data_dir: Path) -> bool:
    """Whether `ecsnap init` made `data_dir` (it writes credentials.json and the AccessKey
    secrets' key; the embedded database lives there too)."""
    return any((data_dir / name).is_file()
               for name in ("credentials.json", "secret.key", "ecsnap.db"))


@dataclass
class Settings:
    data_dir: Path
    database_url: str = ""
    accel: str = "auto"
    signature_window_minutes: int = 15
    crash_at: str = ""
    crash_signal: str = "KILL"  # STOP: hang there instead (SIGSTOP; a hung host in tests)
    background_tasks: bool = True
    stop_timeout_s: float = 30.0
    health_gate_timeout_s: float = 120.0
    default_region: str = "local-1"
    # automatic snapshot policies: the time zone of their time points, per region (region ID
    # -> IANA name, e.g. {"local-1": "Asia/Shanghai"}), else the one of every region; and how
    # often the scheduler in `ecsnap serve` looks for due snapshots and expired ones
    snapshot_policy_timezones: dict[str, str] = field(default_factory=dict)
    snapshot_policy_timezone: str = "UTC"
    snapshot_policy_interval_s: float = 30.0
    region_vcpus: int = 16
    region_memory_mib: int = 32768
    instance_types: list[dict[str, Any]] = field(default_factory=list)
    cache: str = ""  # downloaded packages and built guest images; default DATA_DIR/cache
    # console log-on throttling (ecsnap.service.console_access): failures within the window
    # before a lockout, per account name (or AccessKey ID) and per client address
    logon_max_failures: int = 10
    logon_max_failures_per_address: int = 30
    logon_window_s: float = 900.0
    logon_lockout_s: float = 900.0
    # API request bounds, enforced before a body is read or a signature checked. The SDKs
    # send every parameter in the query and an empty body; the largest legitimate call,
    # RunCommand with 16 KB of CommandContent, takes under 64 KiB of query even when every
    # byte is percent-encoded, and a few hundred parameters at most (RunInstances).
    # Task execution: journaled tasks (snapshots, rollbacks, starts...) and Cloud Assistant
    # commands (up to 24 h each) run in separate thread pools, so commands never hold up a
    # snapshot; commands running at once are bounded per instance and per account.
    # What an account may hold unless the admin set its own (`ecsnap account quota`); a
    # negative number: no limit. One tenant cannot take a whole region with MinAmount.
    default_quotas: dict[str, int] = field(default_factory=lambda: {
        "instances": 50, "vcpus": 64, "memory_mib": 131072, "disks": 300,
        "disk_gib": 16384, "snapshots": 5000})
    task_workers: int = 4
    command_workers: int = 16
    max_commands_per_instance: int = 2
    max_commands_per_account: int = 8
    max_request_bytes: int = 1024 * 1024  # body: 413 RequestTooLarge.Body
    max_query_bytes: int = 256 * 1024  # raw query string: 414 RequestTooLarge.QueryString
    max_request_params: int = 1000  # query and form body together: 400 InvalidParameter.TooMany
    # Cluster mode (service/cluster.py; PostgreSQL only): `ecsnap serve` answers the API and
    # the console only and journals tasks for the agents (`ecsnap agent --host-id H`, one
    # per host), which heartbeat every `heartbeat_s`; a host whose last heartbeat is older
    # than `host_timeout_s` is fenced by another agent (its epoch bumped, its tasks taken
    # over). Without it `ecsnap serve` is one process with an embedded agent, as always.
    # `restart_fenced`: the fencing agent starts the fenced host's Running instances again
    # on other hosts (those on shared storage, Ceph RBD; StartInstance's placement).
    cluster: bool = False
    heartbeat_s: float = 1.0
    host_timeout_s: float = 10.0
    restart_fenced: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'ecsnap.db'}"

    @property
    def pools_dir(self) -> Path:
        return self.data_dir / "pools"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache).expanduser() if self.cache else self.data_dir / "cache"

    @property
    def credentials_path(self) -> Path:
        return self.data_dir / "credentials.json"


def load(data_dir: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings for `data_dir` (else the one `find_data_dir` finds)."""
    root = find_data_dir(data_dir)
    values: dict[str, Any] = {}
    config_file = root / "config.json"
    if config_file.exists():
        values.update(json.loads(config_file.read_text()))
    env = {
        "database_url": os.environ.get("ECSNAP_DATABASE_URL"),
        "accel": os.environ.get("ECSNAP_ACCEL"),
        "signature_window_minutes": os.environ.get("ECSNAP_SIGNATURE_WINDOW"),
        "crash_at": os.environ.get("ECSNAP_CRASH_AT"),
        "crash_signal": os.environ.get("ECSNAP_CRASH_SIGNAL"),
        "cache": os.environ.get("ECSNAP_CACHE_DIR"),
        "cluster": os.environ.get("ECSNAP_CLUSTER"),
        "host_timeout_s": os.environ.get("ECSNAP_HOST_TIMEOUT"),
        "heartbeat_s": os.environ.get("ECSNAP_HEARTBEAT"),
        "restart_fenced": os.environ.get("ECSNAP_RESTART_FENCED"),
    }
    values.update({k: v for k, v in env.items() if v})
    values.update(overrides)
    known = {f.name: f for f in fields(Settings)}
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known or key == "data_dir":
            continue
        default = getattr(Settings(data_dir=root), key)
        if isinstance(default, bool) and isinstance(value, str):
            value = value.strip().lower() in ("1", "true", "yes", "on")
        clean[key] = type(default)(value) if isinstance(default, int | float) and \
            not isinstance(default, bool) else value
    return Settings(data_dir=root, **clean)
