"""Hardening of the API's edges: log lines no request can forge, requests bounded before
they are read or verified, page numbers that cannot overflow, names and descriptions
without control characters."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import pytest
from starlette.testclient import TestClient

from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Image
from ecsnap.entrypoints.api.app import create_app, log_value
from ecsnap.entrypoints.api.signature import rpc_v1_request_params
from ecsnap.service import setup
from ecsnap.service.context import ServiceContext
from ecsnap.service.listing import MAX_PAGE_NUMBER, check_page
from tests.conftest import REGION

Caller = Callable[..., tuple[int, dict[str, Any]]]
MiB = 1024 * 1024
ENVELOPE = {"RequestId", "HostId", "Code", "Message", "Recommend"}


@pytest.fixture
def client(ctx: ServiceContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture
def alice(ctx: ServiceContext, client: TestClient) -> Caller:
    key = setup.initialise(ctx, REGION).access_key

    def call(action: str, **params: Any) -> tuple[int, dict[str, Any]]:
        values = {"RegionId": REGION, **{k.replace("__", "."): str(v)
                                         for k, v in params.items()}}
        response = client.post("/", params=rpc_v1_request_params(action, values, key.id,
                                                                 key.secret))
        return response.status_code, response.json()
    return call


# ------------------------------------------------------------------ logs


def api_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ecsnap.api"]


def clean(line: str) -> bool:
    return all(c.isprintable() for c in line)


@pytest.mark.parametrize("action", [
    "DescribeRegions\nrequest 00000000-FAKE DescribeRegions account=acc-admin status=200",
    "DescribeRegions\r\nX", "Describe\x00Regions", "Describe\x1b[2KRegions",
    "Describe\u2028Regions", "Describe\x85Regions",
    "DescribeRegions account=acc-admin status=200 code=OK",
])
def test_a_request_cannot_forge_a_log_line(client: TestClient,
                                           caplog: pytest.LogCaptureFixture,
                                           action: str) -> None:
    caplog.set_level(logging.INFO, logger="ecsnap.api")
    response = client.post("/", params={"Action": action, "RegionId": REGION})
    assert 400 <= response.status_code < 500
    [line] = api_lines(caplog)
    assert clean(line), repr(line)
    # the action is one quoted field, the others are where they were
    request_id = response.headers["x-acs-request-id"]
    assert re.fullmatch(rf'request {request_id} "(?:[^"\\]|\\.)*" account=- '
                        rf'status={response.status_code} code=[A-Za-z.]+ \d+ms', line), line


def test_log_value_keeps_plain_words_and_quotes_the_rest() -> None:
    assert log_value("DescribeRegions") == "DescribeRegions"
    assert log_value("i-0123abc") == "i-0123abc"
    assert log_value("") == log_value(None) == "-"
    assert log_value("a\nb") == '"a\\nb"'
    assert log_value("数据") == '"\\u6570\\u636e"'
    assert log_value("x\ud800") == '"x\\ud800"'
    long = log_value("a b" * 1000)
    assert long.endswith('"...') and len(long) < 160


def test_a_logged_failure_escapes_the_action_too(ctx: ServiceContext, client: TestClient,
                                                 caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ecsnap.entrypoints.api import app as app_module

    def broken(*_args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(app_module, "verify", broken)
    caplog.set_level(logging.INFO, logger="ecsnap.api")
    response = client.post("/", params={"Action": "X\nrequest forged"})
    assert response.status_code == 500
    lines = api_lines(caplog)
    assert len(lines) == 2 and all(clean(line) for line in lines), lines


# ------------------------------------------------------------------ bounded requests


class Upload:
    """An ASGI body that records how much of it the app consumed."""

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.total, self.chunk, self.consumed = total, chunk, 0
        self.piece = b"A=" + b"x" * (chunk - 2)

    async def receive(self) -> dict[str, Any]:
        if self.total == 0:
            return {"type": "http.request", "body": b"", "more_body": False}
        if self.consumed >= self.total:
            return {"type": "http.disconnect"}
        size = min(self.chunk, self.total - self.consumed)
        self.consumed += size
        return {"type": "http.request", "body": self.piece[:size],
                "more_body": self.consumed < self.total}


def asgi_post(ctx: ServiceContext, upload: Upload, *, declare: bool,
              query: bytes = b"Action=DescribeRegions&RegionId=local-1",
              ) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST straight to the ASGI app (no client library buffering the body)."""
    headers = [(b"host", b"127.0.0.1"),
               (b"content-type", b"application/x-www-form-urlencoded")]
    if declare:
        headers.append((b"content-length", str(upload.total).encode()))
    else:
        headers.append((b"transfer-encoding", b"chunked"))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/", "raw_path": b"/",
             "query_string": query, "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080)}
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(create_app(ctx)(scope, upload.receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    head = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], head, json.loads(body)


def test_a_large_declared_body_is_refused_without_reading_it(ctx: ServiceContext) -> None:
    upload = Upload(16 * MiB)
    status, headers, body = asgi_post(ctx, upload, declare=True)
    assert upload.consumed == 0
    assert status == 413 and body["Code"] == "RequestTooLarge.Body", body
    assert set(body) == ENVELOPE and body["RequestId"] == headers["x-acs-request-id"]
    assert headers["connection"] == "close"


def test_a_large_chunked_body_is_read_no_further_than_the_limit(ctx: ServiceContext) -> None:
    upload = Upload(16 * MiB)
    status, _, body = asgi_post(ctx, upload, declare=False)
    assert upload.consumed <= ctx.settings.max_request_bytes + upload.chunk
    assert status == 413 and body["Code"] == "RequestTooLarge.Body", body


def test_the_bounds_come_before_the_signature(ctx: ServiceContext, client: TestClient) -> None:
    """Unsigned requests over a bound get the bound's error, not a signature error."""
    status, _, body = asgi_post(ctx, Upload(0), declare=True,
                                query=b"A=" + b"x" * ctx.settings.max_query_bytes)
    assert status == 414 and body["Code"] == "RequestTooLarge.QueryString", body
    many = "&".join(f"P{i}=1" for i in range(ctx.settings.max_request_params + 1))
    response = client.post(f"/?{many}&Format=XML")
    assert response.status_code == 400 and "<Code>InvalidParameter.TooMany</Code>" in \
        response.text
    # the query's and a form body's parameters count together
    half = "&".join(f"P{i}=1" for i in range(ctx.settings.max_request_params // 2 + 1))
    response = client.post(f"/?{half}", content=half.encode(),
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400 and response.json()["Code"] == "InvalidParameter.TooMany"
    response = client.post("/?Action=DescribeRegions", content=b"x" * (
        ctx.settings.max_request_bytes + 1))
    assert response.status_code == 413 and response.json()["Code"] == "RequestTooLarge.Body"
    assert set(response.json()) == ENVELOPE


def test_the_bounds_are_settings(ctx: ServiceContext) -> None:
    ctx.settings.max_request_bytes = 1000
    status, _, body = asgi_post(ctx, Upload(1001), declare=True)
    assert status == 413
    status, _, body = asgi_post(ctx, Upload(1000), declare=True)
    assert body["Code"] != "RequestTooLarge.Body"
    ctx.settings.max_request_params = 3
    status, _, body = asgi_post(ctx, Upload(0), declare=True, query=b"A=1&B=2&C=3&D=4")
    assert status == 400 and body["Code"] == "InvalidParameter.TooMany"


def test_the_largest_legitimate_calls_pass(alice: Caller) -> None:
    """RunCommand with 16 KB of CommandContent, base64 or plain text that percent-encodes
    to 48 KB, and a hundred InstanceIds: past the bounds, to the action's own answer."""
    script = base64.b64encode((b"echo '~~~???>>>'\n" * 1000)[:12 * 1024]).decode()
    assert len(script) == 16 * 1024 and "+" in script and "/" in script
    status, body = alice("RunCommand", Type="RunShellScript", CommandContent=script,
                         ContentEncoding="Base64", InstanceId__1="i-missing")
    assert body["Code"] not in {"RequestTooLarge.QueryString", "InvalidParameter.TooMany"}
    assert status == 404, body
    status, body = alice("RunCommand", Type="RunShellScript",
                         CommandContent="数" * (16 * 1024 // 3), InstanceId__1="i-missing")
    assert status == 404, body
    ids = {f"InstanceId__{n}": f"i-{n:020d}" for n in range(1, 101)}
    status, body = alice("DescribeInstanceStatus", **ids)
    assert status == 200, body


# ------------------------------------------------------------------ input edges


PAGED = ["DescribeInstances", "DescribeDisks", "DescribeSnapshots", "DescribeTasks",
         "DescribeInstanceStatus", "DescribeImages", "DescribeInvocationResults"]


@pytest.mark.parametrize("action", PAGED)
def test_a_huge_page_number_is_a_400(alice: Caller, image: Image, action: str) -> None:
    for number in ("999999999999999999", str(MAX_PAGE_NUMBER + 1)):
        status, body = alice(action, PageNumber=number, PageSize=50)
        assert status == 400, body
        assert body["Code"] == "InvalidParameter.PageNumber", body


def test_the_largest_page_number_is_an_empty_page(alice: Caller) -> None:
    status, body = alice("DescribeDisks", PageNumber=MAX_PAGE_NUMBER, PageSize=100)
    assert status == 200 and body["Disks"]["Disk"] == [], body
    assert body["PageNumber"] == MAX_PAGE_NUMBER


def test_check_page() -> None:
    assert check_page(None, None) == (1, 10)
    assert check_page(MAX_PAGE_NUMBER, 100) == (MAX_PAGE_NUMBER, 100)
    for number, size in ((10**18, 10), (MAX_PAGE_NUMBER + 1, 1), (-1, 10), (1, 101)):
        with pytest.raises(EcsError) as caught:
            check_page(number, size)
        assert caught.value.http_status == 400
        assert caught.value.code.startswith("InvalidParameter.Page")


@pytest.mark.parametrize(("params", "code"), [
    ({"Name": "group\x00name"}, "InvalidParameter.Name"),
    ({"Description": "before\x00the upgrade"}, "InvalidDescription.Malformed"),
    ({"Description": "line one\nline two"}, "InvalidDescription.Malformed"),
    ({"Description": "bell\x07"}, "InvalidDescription.Malformed"),
    ({"Tag__1__Key": "env\x00", "Tag__1__Value": "prod"}, "InvalidTagKey.Malformed"),
    ({"Tag__1__Key": "env", "Tag__1__Value": "prod\r\n"}, "InvalidTagValue.Malformed"),
    ({"Tag__1__Key": "env", "Tag__1__Value": "a\u2028b"}, "InvalidTagValue.Malformed"),
])
def test_control_characters_are_refused_with_the_fields_code(
        alice: Caller, image: Image, params: dict[str, str], code: str) -> None:
    status, body = alice("RunInstances", ImageId=image.id, InstanceType="ecs.t5-lc2m1.nano")
    assert status == 200, body
    [instance_id] = body["InstanceIdSets"]["InstanceIdSet"]
    status, body = alice("CreateSnapshotGroup", InstanceId=instance_id, **params)
    assert status == 400 and body["Code"] == code, body
    assert alice("DescribeSnapshotGroups")[1]["SnapshotGroups"]["SnapshotGroup"] == []


def test_the_api_answers_get_and_post_only_and_nothing_to_a_client_that_left(
        ctx: ServiceContext) -> None:
    """Another method at `/` is 405 with Allow, before anything is read; a client that
    hangs up while its body streams in is sent nothing (and nothing runs)."""
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def left() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    base = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "scheme": "http", "path": "/", "raw_path": b"/", "root_path": "",
            "query_string": b"Action=DescribeRegions", "headers": [(b"host", b"127.0.0.1")],
            "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080)}
    app = create_app(ctx)
    asyncio.run(app({**base, "method": "PUT"}, left, send))
    assert sent[0]["status"] == 405 and (b"allow", b"GET, HEAD, POST") in sent[0]["headers"]
    sent.clear()
    asyncio.run(app({**base, "method": "POST"}, left, send))
    assert sent == []
