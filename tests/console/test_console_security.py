"""The console's hardening, in-process (Starlette's TestClient, real database, the compute
test double): escaping, security headers, no inline script, same-origin WebSocket, log-on
throttling and lockout, session revocation, Secure cookies."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from ecsnap.entrypoints.console import app as console_app
from ecsnap.entrypoints.console.app import create_console
from ecsnap.service import accounts, console_access
from ecsnap.service.context import ServiceContext

PASSWORD = "correct horse battery"
HOSTILE = '"><img src=x onerror=alert(1)>'  # no "/": it must stay one path segment
TEMPLATES = Path(console_app.__file__).parent / "templates"


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(console_access, "_now", c)
    return c


@pytest.fixture
def app(ctx: ServiceContext) -> Starlette:
    accounts.create_account(ctx, "alice", PASSWORD)
    return Starlette(routes=[Mount("/console", create_console(ctx))])


@pytest.fixture
def client(app: Starlette) -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as c:
        yield c


def log_on(client: TestClient, account: str = "alice", password: str = PASSWORD,
           **extra: str) -> Any:
    page = client.get("/console/login")
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, page.text
    return client.post("/console/login", data={"csrf": match.group(1), "account": account,
                                               "password": password, **extra})


def logged_on(client: TestClient) -> TestClient:
    assert log_on(client).status_code == 303
    assert client.get("/console/instances/").status_code == 200
    return client


# ------------------------------------------------------------------ escaping


@pytest.mark.parametrize("path", [
    "/console/tasks/{x}",
    "/console/instances/{x}",
    "/console/instances/{x}/connect",
    "/console/snapshots/?tab=instance-snapshots&rollback={x}",
    "/console/snapshots/?tab=instance-snapshots&modify={x}",
])
def test_user_input_in_a_page_is_escaped(client: TestClient, path: str) -> None:
    logged_on(client)
    response = client.get(path.format(x=HOSTILE), follow_redirects=True)
    assert HOSTILE not in response.text
    assert response.headers["content-type"].startswith("text/html")


def test_task_not_found_reflects_the_id_escaped(client: TestClient) -> None:
    logged_on(client)
    response = client.get(f"/console/tasks/{HOSTILE}")
    assert response.status_code == 404
    assert "InvalidTaskId.NotFound" in response.text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in response.text
    assert HOSTILE not in response.text


def test_a_refused_form_renders_through_the_template(client: TestClient) -> None:
    logged_on(client)
    response = client.post("/console/logout", data={"csrf": "wrong"})
    assert response.status_code == 403
    assert 'id="error-message"' in response.text  # the error page, not a bare f-string


# ------------------------------------------------------------------ headers, scripts


def assert_security_headers(response: Any) -> None:
    csp = response.headers.get("content-security-policy", "")
    directives = dict([*d.strip().split(" ", 1), ""][:2] for d in csp.split(";"))
    assert directives.get("script-src") == "'self'", csp
    assert directives.get("frame-ancestors") == "'none'", csp
    assert directives.get("object-src") == "'none'", csp
    assert response.headers.get("x-frame-options") == "DENY"
    assert response.headers.get("x-content-type-options") == "nosniff"
    assert response.headers.get("referrer-policy") == "same-origin"


def test_every_console_response_carries_the_security_headers(client: TestClient) -> None:
    responses = [client.get("/console/login"),
                 client.get("/console/instances/"),  # redirect to the log-on page
                 client.get("/console/static/console.css"),
                 client.get("/console/static/vendor/xterm.js"),
                 client.get("/console/no-such-page"),
                 log_on(client, password="wrong password!")]
    logged_on(client)
    responses += [client.get("/console/instances/"), client.get("/console/disks/"),
                  client.get("/console/snapshots/?tab=instance-snapshots"),
                  client.get("/console/tasks/t-none"),
                  client.post("/console/logout", data={"csrf": "wrong"})]
    for response in responses:
        assert_security_headers(response)


INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
HANDLER_ATTRIBUTE = re.compile(r"<[^>]+\son[a-z]+\s*=", re.I)


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.html")))
def test_no_template_has_inline_script(template: str) -> None:
    text = (TEMPLATES / template).read_text()
    assert not INLINE_SCRIPT.search(text), template
    assert not HANDLER_ATTRIBUTE.search(text), template
    assert "javascript:" not in text.lower(), template


def test_rendered_pages_load_their_scripts_from_static_files(client: TestClient) -> None:
    logged_on(client)
    for path in ("/console/instances/", "/console/snapshots/?tab=instance-snapshots",
                 "/console/disks/", "/console/images/"):
        text = client.get(path).text
        assert not INLINE_SCRIPT.search(text) and not HANDLER_ATTRIBUTE.search(text), path
        assert "/console/static/console.js" in text
    for script in ("console.js", "connect.js"):
        response = client.get(f"/console/static/{script}")
        assert response.status_code == 200, script
        assert "javascript" in response.headers["content-type"]


# ------------------------------------------------------------------ serial WebSocket


def serial_close_code(client: TestClient, headers: dict[str, str]) -> int:
    with pytest.raises(WebSocketDisconnect) as refused, \
            client.websocket_connect("/console/instances/i-none/serial", headers=headers):
        pass
    return refused.value.code


def test_the_serial_websocket_takes_only_same_origin_connections(client: TestClient) -> None:
    logged_on(client)
    assert serial_close_code(client, {"origin": "http://evil.example"}) == 1008
    assert serial_close_code(client, {"origin": "http://testserver.evil.example"}) == 1008
    assert serial_close_code(client, {"origin": "null"}) == 1008
    assert serial_close_code(client, {}) == 1008  # no Origin: refused too
    # the same origin passes the check and reaches the instance lookup (none here)
    assert serial_close_code(client, {"origin": "http://testserver"}) == 4404


def test_the_serial_websocket_needs_a_live_session(client: TestClient) -> None:
    assert serial_close_code(client, {"origin": "http://testserver"}) == 4401


def test_a_revoked_session_closes_its_open_serial_console(
        ctx: ServiceContext, client: TestClient, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "serial.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    accepted: list[socket.socket] = []

    def serve() -> None:
        conn, _ = server.accept()
        accepted.append(conn)
        conn.sendall(b"login: ")
        time.sleep(2)  # later output must not reach a revoked session
        with contextlib.suppress(OSError):
            conn.sendall(b"more output")

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setattr(console_access, "serial_console", lambda *_: path)
    monkeypatch.setattr(console_app, "SERIAL_SESSION_CHECK_S", 0.05)
    logged_on(client)
    try:
        with client.websocket_connect("/console/instances/i-any/serial",
                                      headers={"origin": "http://testserver"}) as ws:
            assert ws.receive_bytes() == b"login: "
            accounts.disable_account(ctx, "alice")
            with pytest.raises(WebSocketDisconnect):
                ws.receive_bytes()
    finally:
        for conn in accepted:
            conn.close()
        server.close()


# ------------------------------------------------------------------ log-on throttling


def test_failed_log_ons_slow_down_then_lock_the_account(ctx: ServiceContext, client: TestClient,
                                                        clock: Clock) -> None:
    for _ in range(console_access.FREE_FAILURES):
        assert log_on(client, password="wrong password!").status_code == 401
    # the next attempt must wait, even with the right password (it is not even checked)
    delayed = log_on(client)
    assert delayed.status_code == 429 and "wait" in delayed.text
    assert int(delayed.headers["retry-after"]) >= 1
    waited: list[float] = []
    while len(waited) < 20:
        verdict = console_access.check_logon(ctx, "account", "alice", "testclient")
        if verdict.locked:
            break
        waited.append(verdict.retry_after)
        clock.now += verdict.retry_after + 0.01
        assert log_on(client, password="wrong password!").status_code == 401
    assert len(waited) == ctx.settings.logon_max_failures - console_access.FREE_FAILURES
    assert waited == sorted(waited) and waited[-1] > 4 * waited[0] > 0  # a growing delay
    response = log_on(client)
    assert response.status_code == 429 and "locked" in response.text
    [locked] = console_access.list_logon_lockouts(ctx)
    assert (locked.kind, locked.name) == ("account", "alice")
    assert locked.failures == ctx.settings.logon_max_failures
    assert locked.locked_until is not None and locked.locked_until > clock.now
    clock.now += 60  # still locked: the right password is refused
    assert log_on(client).status_code == 429
    # the administrator sees the lock and lifts it
    assert console_access.clear_logon_lockouts(ctx, "account", "alice") == 1
    assert console_access.list_logon_lockouts(ctx) == []
    assert log_on(client).status_code == 303


def test_a_lockout_ends_by_itself(ctx: ServiceContext, clock: Clock) -> None:
    for _ in range(ctx.settings.logon_max_failures):
        console_access.record_logon_failure(ctx, "account", "bob", "10.0.0.1")
    assert console_access.check_logon(ctx, "account", "bob", "10.0.0.2").locked
    clock.now += ctx.settings.logon_lockout_s + 1
    assert console_access.check_logon(ctx, "account", "bob", "10.0.0.2").allowed
    assert console_access.list_logon_lockouts(ctx, include_throttled=True) == []


def test_one_address_guessing_many_accounts_is_locked(ctx: ServiceContext, client: TestClient,
                                                      clock: Clock) -> None:
    ctx.settings.logon_max_failures_per_address = 5
    for i in range(5):
        clock.now += 60
        assert log_on(client, account=f"user{i}", password="wrong password!").status_code \
            == 401
    clock.now += 60
    refused = log_on(client)  # alice's right password, from the locked address
    assert refused.status_code == 429
    kinds = {(x.kind, x.name) for x in console_access.list_logon_lockouts(ctx)}
    assert kinds == {("address", "testclient")}
    assert console_access.clear_logon_lockouts(ctx, "address") == 1
    assert log_on(client).status_code == 303


def test_access_key_log_ons_are_throttled_per_key(ctx: ServiceContext, client: TestClient,
                                                  clock: Clock) -> None:
    key = accounts.create_access_key(ctx, "alice")
    for _ in range(ctx.settings.logon_max_failures):
        clock.now += 60
        assert log_on(client, account="", password="", access_key_id=key.id,
                      access_key_secret="wrong").status_code == 401
    [locked] = console_access.list_logon_lockouts(ctx)
    assert (locked.kind, locked.name) == ("access_key", key.id)


# ------------------------------------------------------------------ sessions


def test_disabling_the_account_ends_its_sessions(ctx: ServiceContext,
                                                 client: TestClient) -> None:
    logged_on(client)
    accounts.disable_account(ctx, "alice")
    assert client.get("/console/instances/").headers["location"] == "/console/login"
    accounts.enable_account(ctx, "alice")
    assert client.get("/console/instances/").status_code == 303  # the session stays gone


def test_a_password_change_ends_the_sessions(ctx: ServiceContext, client: TestClient) -> None:
    logged_on(client)
    accounts.change_password(ctx, "alice", "a brand new passphrase", current_password=PASSWORD)
    assert client.get("/console/instances/").status_code == 303
    assert log_on(client).status_code == 401
    assert log_on(client, password="a brand new passphrase").status_code == 303


@pytest.mark.parametrize("how", ["disable", "rotate", "delete"])
def test_a_session_opened_with_an_access_key_ends_with_the_key(
        ctx: ServiceContext, client: TestClient, how: str) -> None:
    key = accounts.create_access_key(ctx, "alice")
    assert log_on(client, account="", password="", access_key_id=key.id,
                  access_key_secret=key.secret).status_code == 303
    assert client.get("/console/instances/").status_code == 200
    revoke: dict[str, Callable[[ServiceContext, str], object]] = {
        "disable": accounts.disable_access_key, "delete": accounts.delete_access_key,
        "rotate": accounts.rotate_access_key}
    revoke[how](ctx, key.id)
    assert client.get("/console/instances/").status_code == 303


def test_expired_sessions_are_pruned(app: Starlette, client: TestClient) -> None:
    console = app.routes[0].app.state.console  # type: ignore[attr-defined]
    logged_on(client)
    [live] = list(console.sessions.values())
    for i in range(3):
        console.sessions[f"old-{i}"] = console_app.Session(
            live.account_id, "alice", live.region, live.stamp, expires=time.time() - 1)
    assert log_on(client).status_code == 303  # a log-on prunes
    assert not any(t.startswith("old-") for t in console.sessions)
    console.sessions["old-x"] = console_app.Session(live.account_id, "alice", live.region,
                                                    live.stamp, expires=time.time() - 1)
    console.pruned = time.time() - console_app.PRUNE_EVERY_S - 1
    assert client.get("/console/instances/").status_code == 200  # and so, now and then, does
    assert "old-x" not in console.sessions  # any request


# ------------------------------------------------------------------ cookies


def session_cookie(response: Any) -> str:
    [cookie] = [v for v in response.headers.get_list("set-cookie")
                if v.startswith(console_app.COOKIE + "=")]
    return cookie


def test_cookies_are_secure_over_https(app: Starlette) -> None:
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as https:
        assert "secure" in https.get("/console/login").headers["set-cookie"].lower()
        cookie = session_cookie(log_on(https))
        assert "secure" in cookie.lower() and "httponly" in cookie.lower()
    with TestClient(app, follow_redirects=False) as http:
        assert "secure" not in session_cookie(log_on(http)).lower()
