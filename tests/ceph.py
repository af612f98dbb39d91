"""A throwaway single-node Ceph cluster (one monitor, one memstore OSD, no manager), on
127.0.0.1, for the RBD tests: the recipe of shared/reference/CEPH.md.

`CephCluster(root).start()` writes a ceph.conf under `root`, makes and starts the monitor
and the OSD (in the foreground of their own sessions, so they are stopped by pid), and
creates an RBD pool; `stop()` ends both daemons by pid. Everything lives under `root`; the
OSD keeps the data in RAM (memstore), so size `memstore_bytes` for what the tests write.

The monitor batches its proposals every `paxos_propose_interval` (1 s by default), and
every RBD snapshot takes a new snapshot ID from it: at 0.01 s a snapshot costs ~10 ms
instead of ~1 s. `propose_interval=None` keeps Ceph's default (for benchmarks that report
both). `set-require-min-compat-client mimic` allows clone v2 (clones of unprotected
snapshots), which the RBD backend uses.

`auth=True` turns cephx on (the default is `auth ... = none`): the `mon.`, `client.admin`
and `osd.0` keys are made with ceph-authtool (the OSD's is added to the monitor before
its mkfs); the admin key is in `keyring` (`client.admin.keyring`), which the ceph.conf
does not name, so every client must be given it (as an ecsnap region's `keyring=`).

`shared(tmp_path_factory)`: one cluster per pytest process, started by the first session
fixture that asks for it and stopped when the last one lets go, so that test modules in
different directories (each with its own session fixture) share one cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TOOLS = ("ceph-mon", "ceph-osd", "monmaptool")
MIB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing() -> str:
    """Why no cluster can run here ("" when one can)."""
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        return (f"{', '.join(absent)} not installed: `make test` installs Ceph "
                "(scripts/system-deps.sh)")
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        return ("this Python cannot import Debian's rados/rbd bindings: the venv must be made "
                "from /usr/bin/python3 with --system-site-packages (the Makefile does; "
                "rebuild an older venv with `rm .venv/bin/.installed && make venv`)")
    return ""


class CephCluster:
    def __init__(self, root: Path, *, pool: str = "rbd", memstore_bytes: int = 2048 * MIB,
                 propose_interval: float | None = 0.01, auth: bool = False) -> None:
        self.root = Path(root)
        self.auth = auth
        self.keyring = self.root / "client.admin.keyring"
        self.pool = pool
        self.memstore_bytes = memstore_bytes
        self.propose_interval = propose_interval
        self.fsid = str(uuid.uuid4())
        self.port = _free_port()
        self.conf = self.root / "ceph.conf"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------ set-up

    def _write_conf(self) -> None:
        r = self.root
        mon = f"paxos propose interval = {self.propose_interval}\n" \
            if self.propose_interval is not None else ""
        auth = "cephx" if self.auth else "none"
        mon += f"keyring = {r}/mon.keyring\n" if self.auth else ""
        osd = f"keyring = {r}/osd/$name/keyring\n" if self.auth else ""
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = 127.0.0.1:{self.port}
mon initial members = a
auth cluster required = {auth}
auth service required = {auth}
auth client required = {auth}
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
run dir = {r}/run
log file = {r}/log/$name.log
admin socket = {r}/run/$name.asok
mon data = {r}/mon/$name
osd data = {r}/osd/$name
mon data avail warn = 1
mon data avail crit = 0
ms bind ipv6 = false

[mon]
{mon}
[osd]
{osd}osd max object name len = 256
osd max object namespace len = 64
""")

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 (the child's)
        try:
            self.procs[name] = subprocess.Popen(
                [*args, "-f", "-c", str(self.conf)], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        finally:
            log.close()

    def _run(self, *args: str) -> None:
        proc = subprocess.run([*args, "-c", str(self.conf)], capture_output=True, text=True,
                              cwd=self.root, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {proc.stdout}{proc.stderr}")

    def start(self, timeout: float = 120.0) -> None:
        for d in ("run", "log", "mon/mon.a", "osd/osd.0"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        monmap = str(self.root / "monmap")
        subprocess.run(["monmaptool", "--create", "--add", "a", f"127.0.0.1:{self.port}",
                        "--fsid", self.fsid, monmap], check=True, capture_output=True)
        if self.auth:
            self._keys()
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap,
                  *(["--keyring", str(self.root / "mon.keyring")] if self.auth else []))
        self._daemon("mon.a", "ceph-mon", "-i", "a")
        try:
            deadline = time.monotonic() + timeout
            osd_id = self.mon_command({"prefix": "osd create"}, timeout=timeout)
            assert str(osd_id).strip() == "0", osd_id
            if self.auth:  # the OSD's key, known to the monitor before its mkfs
                key = self.root / "osd/osd.0/keyring"
                subprocess.run(["ceph-authtool", str(key), "--create-keyring", "--gen-key",
                                "-n", "osd.0"], check=True, capture_output=True, timeout=60)
                self.mon_command({"prefix": "auth add", "entity": "osd.0",
                                  "caps": ["osd", "allow *", "mon", "allow profile osd"]},
                                 inbuf=key.read_bytes())
            self._run("ceph-osd", "-i", "0", "--mkfs")
            self._daemon("osd.0", "ceph-osd", "-i", "0")
            self.mon_command({"prefix": "osd crush add", "id": 0, "weight": 1.0,
                              "args": ["host=localhost", "root=default"]})
            self.mon_command({"prefix": "osd set-require-min-compat-client",
                              "version": "mimic"})
            self.create_pool(self.pool)
            self._wait_writable(self.pool, deadline)
        except BaseException:
            self.stop()
            raise

    def _keys(self) -> None:
        """The monitor's key and client.admin's (cephx), with ceph-authtool."""
        mon, admin = str(self.root / "mon.keyring"), str(self.keyring)
        for args in (
                [mon, "--create-keyring", "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"],
                [admin, "--create-keyring", "--gen-key", "-n", "client.admin",
                 "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                 "--cap", "mgr", "allow *"],
                [mon, "--import-keyring", admin]):
            subprocess.run(["ceph-authtool", *args], check=True, capture_output=True,
                           timeout=60)

    def create_pool(self, pool: str, pg_num: int = 8) -> None:
        self.mon_command({"prefix": "osd pool create", "pool": pool, "pg_num": pg_num})
        self.mon_command({"prefix": "osd pool application enable", "pool": pool,
                          "app": "rbd"})

    def _wait_writable(self, pool: str, deadline: float) -> None:
        """Until a write to the pool succeeds (its placement groups are active)."""
        with self.connect() as cluster:
            while True:
                try:
                    with cluster.open_ioctx(pool) as ioctx:
                        ioctx.write_full("ecsnap-test-ready", b"ready")
                        ioctx.remove_object("ecsnap-test-ready")
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

    # ------------------------------------------------------------ clients

    @contextlib.contextmanager
    def connect(self, timeout: float = 30.0) -> Iterator[Any]:
        """A rados.Rados client connection (ops time out instead of hanging)."""
        import rados

        cluster = rados.Rados(conffile=str(self.conf), conf={
            "rados_osd_op_timeout": str(int(timeout)),
            "rados_mon_op_timeout": str(int(timeout)),
            "client_mount_timeout": str(int(timeout)),
            "log_file": str(self.root / "log" / "client.test.log"),
            **({"keyring": str(self.keyring)} if self.auth else {})})
        cluster.connect(timeout=int(timeout))
        try:
            yield cluster
        finally:
            cluster.shutdown()

    @contextlib.contextmanager
    def image(self, name: str, pool: str | None = None) -> Iterator[Any]:
        """An rbd.Image of the pool (default: the test pool), open on a connection of the
        test's own. Read-write even to look: librbd 16 aborts now and then on read-only
        opens of clones (see RbdBackend._image)."""
        import rbd

        with self.connect() as conn, conn.open_ioctx(pool or self.pool) as ioctx, \
                rbd.Image(ioctx, name) as image:
            yield image

    def mon_command(self, cmd: dict[str, Any], timeout: float = 60.0,
                    inbuf: bytes = b"") -> str:
        with self.connect(timeout) as cluster:
            ret, out, why = cluster.mon_command(json.dumps(cmd), inbuf, timeout=int(timeout))
        if ret != 0:
            raise RuntimeError(f"ceph {cmd['prefix']}: {why} (error {ret})")
        return bytes(out).decode()

    def spec(self, pool: str | None = None) -> str:
        """A region's storage_pool naming this cluster's pool."""
        keyring = f"&keyring={self.keyring}" if self.auth else ""
        return f"rbd:{pool or self.pool}?conf={self.conf}&client=admin{keyring}"

    # ------------------------------------------------------------ stop

    def stop(self) -> None:
        """SIGTERM the daemons by pid (the OSD first), SIGKILL what is left after 10 s."""
        for name in sorted(self.procs, key=lambda n: not n.startswith("osd")):
            proc = self.procs[name]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.procs.clear()


_lock = threading.Lock()
_shared: CephCluster | None = None
_users = 0


@contextlib.contextmanager
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """The pytest process's cluster: started by the first user, stopped after the last.
    Fails the test (does not skip it) when Ceph is not installed: `make test` installs it."""
    global _shared, _users
    why = missing()
    if why:
        pytest.fail(why)
    with _lock:
        if _shared is None:
            cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
            cluster.start()
            _shared = cluster
        _users += 1
        cluster = _shared
    try:
        yield cluster
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _shared is not None:
                _shared.stop()
                _shared = None
