"""The serial console of an instance in a cluster: the console of an API process proxies its
WebSocket to the agent of the instance's host (`ecsnap agent --address`), which opens the
VM's serial socket there, given a short-lived token the API process made with that host's
secret (service/console_access.py, entrypoints/agent_http.py).

Real processes throughout: PostgreSQL, `ecsnap agent`, `ecsnap serve`. The first tests put a
unix socket where the agent finds an instance's serial socket (DATA_DIR/run/HOST/ID) and
play the guest's side; the last one boots the demo guest in QEMU and logs on to it.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

from ecsnap import bootstrap, config
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import InstanceStatus
from ecsnap.service import console_access
from ecsnap.service.context import ServiceContext
from tests.cluster.conftest import Cluster
from tests.live import LiveServer

pytestmark = [pytest.mark.postgres]



def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeSerial:
    """The guest's side of a serial socket where the agent of `host` looks for it."""

    def __init__(self, data_dir: Path, host: str, instance_id: str) -> None:
        run = data_dir / "run" / host / instance_id
        run.mkdir(parents=True, exist_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(run / "serial.sock"))
        self.server.listen(8)
        self.connections: list[socket.socket] = []
        self.received = b""
        self.ended: list[threading.Event] = []  # per connection: the agent closed it
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.server.accept()
                ended = threading.Event()
                self.connections.append(conn)
                self.ended.append(ended)
                conn.sendall(b"ecsnap login: ")
                threading.Thread(target=self._read, args=(conn, ended), daemon=True).start()

    def _read(self, conn: socket.socket, ended: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(4096):
                self.received += data
        ended.set()

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.server.close()


def _set_instance(cluster: Cluster, instance_id: str, *, host_id: str,
                  status: InstanceStatus) -> None:
    with cluster.ctx.uow() as uow:
        row = uow.instances.load(instance_id)
        row.host_id, row.status = host_id, status
        uow.commit()


def _api_ctx(cluster: Cluster) -> ServiceContext:
    """An API process of the cluster, in-process: what mints the tokens."""
    settings = config.load(cluster.data_dir)
    assert settings.cluster
    return bootstrap.build(settings)


def _agent(port: int, instance_id: str, token: str | None) -> ClientConnection:
    headers = {} if token is None else {console_access.SERIAL_TOKEN_HEADER: token}
    return connect(f"ws://127.0.0.1:{port}/serial/{instance_id}", additional_headers=headers,
                   proxy=None, open_timeout=10)


def _refused(port: int, instance_id: str, token: str | None) -> int:
    """The close code with which the agent refuses (AssertionError if it does not)."""
    with _agent(port, instance_id, token) as ws:
        try:
            data = ws.recv(timeout=10)
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code
    raise AssertionError(f"the agent opened the serial console: {data!r}")


def _read_until(ws: ClientConnection, wanted: bytes, timeout: float = 30) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {wanted!r} on the serial console: {seen[-400:]!r}"
        with contextlib.suppress(TimeoutError):
            data = ws.recv(timeout=min(left, 1))
            seen += data if isinstance(data, bytes) else data.encode()
    return seen


def _token(api: ServiceContext, cluster: Cluster, instance_id: str) -> str:
    target = console_access.serial_console(api, cluster.account_id, instance_id)
    assert isinstance(target, console_access.AgentSerial)
    return target.token


def test_the_agent_opens_a_serial_console_for_a_fresh_token_of_an_instance_it_runs(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    inst, other = cluster.stopped_instance(), cluster.stopped_instance()  # before any agent
    port = _port()
    cluster.agent("h1", args=("--address", f"127.0.0.1:{port}"))
    # Running on h1 (after its join: the agent's reconcile would stop a VM-less instance)
    _set_instance(cluster, inst.id, host_id="h1", status=InstanceStatus.RUNNING)
    guest = FakeSerial(cluster.data_dir, "h1", inst.id)
    api = _api_ctx(cluster)
    try:
        target = console_access.serial_console(api, cluster.account_id, inst.id)
        assert isinstance(target, console_access.AgentSerial)
        assert target.url == f"ws://127.0.0.1:{port}/serial/{inst.id}"
        # a fresh token opens it: bytes both ways
        with _agent(port, inst.id, target.token) as ws:
            assert _read_until(ws, b"login: ").endswith(b"ecsnap login: ")
            ws.send(b"root\n")
            deadline = time.monotonic() + 10
            while b"root\n" not in guest.received and time.monotonic() < deadline:
                time.sleep(0.05)
            assert guest.received == b"root\n"
        # ... once: the same token again is a replay
        assert _refused(port, inst.id, target.token) == 4401
        # no token, a made-up one, a forged MAC, a token of another instance: 4401
        assert _refused(port, inst.id, None) == 4401
        assert _refused(port, inst.id, "nonsense") == 4401
        expiry, nonce, mac = _token(api, cluster, inst.id).split(".")
        forged = f"{expiry}.{nonce}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}"
        assert _refused(port, inst.id, forged) == 4401
        later = f"{int(expiry) + 60}.{nonce}.{mac}"  # its expiry moved: the MAC disagrees
        assert _refused(port, inst.id, later) == 4401
        _set_instance(cluster, other.id, host_id="h1", status=InstanceStatus.RUNNING)
        assert _refused(port, inst.id, _token(api, cluster, other.id)) == 4401
        # an expired token (minted 60 s in the past), or one good for too long: 4401
        with monkeypatch.context() as m:
            m.setattr(console_access, "SERIAL_TOKEN_TTL_S", -60)
            expired = _token(api, cluster, inst.id)
            m.setattr(console_access, "SERIAL_TOKEN_TTL_S", 3600)
            too_long = _token(api, cluster, inst.id)
        assert _refused(port, inst.id, expired) == 4401
        assert _refused(port, inst.id, too_long) == 4401
        # a good token, but the instance is no longer on this host, or not Running: 4404
        token = _token(api, cluster, inst.id)
        _set_instance(cluster, inst.id, host_id="h2", status=InstanceStatus.RUNNING)
        assert _refused(port, inst.id, token) == 4404
        _set_instance(cluster, inst.id, host_id="h1", status=InstanceStatus.RUNNING)
        token = _token(api, cluster, inst.id)
        _set_instance(cluster, inst.id, host_id="h1", status=InstanceStatus.STOPPED)
        assert _refused(port, inst.id, token) == 4404
        # an instance that is not there at all: a token for it cannot even be had
        assert _refused(port, "i-none", token) == 4401
        assert len(guest.connections) == 1  # none of the refusals reached the socket
    finally:
        guest.close()


@dataclass
class ConsoleSession:
    client: httpx.Client
    live: LiveServer

    def serial(self, instance_id: str) -> ClientConnection:
        cookie = "; ".join(f"{k}={v}" for k, v in self.client.cookies.items())
        return connect(f"ws://127.0.0.1:{self.live.port}/console/instances/{instance_id}"
                       "/serial", origin=Origin(f"http://127.0.0.1:{self.live.port}"),
                       additional_headers={"Cookie": cookie}, proxy=None, open_timeout=10)

    def log_out(self) -> None:
        page = self.client.get("/console/instances/")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        assert self.client.post("/console/logout",
                                data={"csrf": csrf.group(1)}).status_code == 303


@contextlib.contextmanager
def logged_on(cluster: Cluster, live: LiveServer) -> Iterator[ConsoleSession]:
    creds = json.loads((cluster.data_dir / "credentials.json").read_text())
    with httpx.Client(base_url=live.endpoint, follow_redirects=False, timeout=30) as client:
        page = client.get("/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf is not None
        assert client.post("/console/login", data={
            "csrf": csrf.group(1), "account": creds["Account"],
            "password": creds["ConsolePassword"]}).status_code == 303
        yield ConsoleSession(client, live)


def test_a_rejoining_agent_has_a_new_serial_secret(cluster: Cluster) -> None:
    """An agent's restart (or its rejoin after a fence) makes a new secret: a token made
    for the secret before opens nothing, one made now does."""
    inst = cluster.stopped_instance()
    settings = config.load(Path(cluster.data_dir), background_tasks=False)
    agent = bootstrap.build_agent(settings, "h1", vcpus=2, memory_mib=2048,
                                  address=f"127.0.0.1:{_port()}")
    try:
        agent.register()
        _set_instance(cluster, inst.id, host_id="h1", status=InstanceStatus.RUNNING)
        api = _api_ctx(cluster)
        before = _token(api, cluster, inst.id)
        secret = cluster.host("h1").serial_secret  # type: ignore[union-attr]
        agent.register()
        assert cluster.host("h1").serial_secret != secret  # type: ignore[union-attr]
        _set_instance(cluster, inst.id, host_id="h1", status=InstanceStatus.RUNNING)
        with pytest.raises(EcsError) as refused:
            console_access.agent_serial_console(agent.ctx, "h1", inst.id, before)
        assert refused.value.code == "InvalidSerialToken"
        assert console_access.agent_serial_console(agent.ctx, "h1", inst.id,
                                                   _token(api, cluster, inst.id))
    finally:
        agent.ctx.close()


def test_the_console_of_an_api_process_carries_the_serial_console_to_the_agent(
        cluster: Cluster) -> None:
    inst = cluster.stopped_instance()  # made before any agent claims its tasks
    port = _port()
    cluster.agent("h1", args=("--address", f"127.0.0.1:{port}"))
    _set_instance(cluster, inst.id, host_id="h1", status=InstanceStatus.RUNNING)
    guest = FakeSerial(cluster.data_dir, "h1", inst.id)
    live = cluster.api()
    try:
        with logged_on(cluster, live) as console:
            page = console.client.get(f"/console/instances/{inst.id}/connect")
            assert page.status_code == 200
            assert "data-serial-path" in page.text and "serial-refused" not in page.text
            with console.serial(inst.id) as ws:
                _read_until(ws, b"ecsnap login: ")
                ws.send(b"root\r")
                deadline = time.monotonic() + 10
                while b"root\r" not in guest.received and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert guest.received == b"root\r"
                # the guest's side ends (its VM stopped): the console's WebSocket closes
                guest.connections[-1].shutdown(socket.SHUT_RDWR)
                with pytest.raises(ConnectionClosed):
                    _read_until(ws, b"never", timeout=15)
            # a session that ends (here: log off) closes its open serial console, and
            # with it the agent's connection to the VM's socket
            with console.serial(inst.id) as ws:
                _read_until(ws, b"ecsnap login: ")
                console.log_out()
                with pytest.raises(ConnectionClosed):  # re-checked every 10 s
                    _read_until(ws, b"never", timeout=30)
            assert guest.ended[-1].wait(10)
            # not Running: refused before the handshake ends (4404 before accept: HTTP
            # 403), as on the single-host server
            _set_instance(cluster, inst.id, host_id="h1", status=InstanceStatus.STOPPED)
        with logged_on(cluster, live) as console, pytest.raises(InvalidStatus) as refused:
            console.serial(inst.id)
        assert refused.value.response.status_code == 403
        assert len(guest.connections) == 2
    finally:
        guest.close()


# ------------------------------------------------------------------ a real guest


@pytest.mark.qemu
def test_log_on_to_a_vm_of_the_demo_image_through_the_console_of_an_api_process(
        vm_cluster: Cluster) -> None:
    cluster = vm_cluster
    port = _port()
    cluster.agent("h1", args=("--address", f"127.0.0.1:{port}"))
    live = cluster.api()
    api = cluster.client(live)
    instance_id = cluster.run_demo(api)
    with cluster.ctx.uow(readonly=True) as uow:
        inst = uow.instances.load(instance_id)
    assert inst.status == InstanceStatus.RUNNING and inst.host_id == "h1"
    with logged_on(cluster, live) as console, console.serial(instance_id) as ws:
        ws.send(b"\r")  # as the Connect page does
        _read_until(ws, b"login:", timeout=180)
        ws.send(b"root\r")
        _read_until(ws, b"root@ecsnap:~# ", timeout=60)
        ws.send(b"echo hello-$((6*7))\r")
        _read_until(ws, b"hello-42", timeout=60)
