"""Signature verification of both SDK schemes, the client-side signer, and (when the
official SDKs are installed) the real SDKs talking to a throwaway stdlib HTTP server."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.api import signature as sig
from ecsnap.entrypoints.api.params import Params
from ecsnap.entrypoints.api.render import new_request_id, render, render_error
from ecsnap.entrypoints.api.signature import (
    AccessKeyRecord,
    AuthResult,
    MemoryNonceStore,
    SignedRequest,
    parse_query,
    verify,
)

KEYS = {
    "testid": AccessKeyRecord("testid", "testsecret", True, "acc-test"),
    "offid": AccessKeyRecord("offid", "offsecret", False, "acc-off"),
}
SIGNED_AT = datetime(2026, 11, 24, 19, 15, 23)  # the vectors' x-acs-date / Timestamp
HOST = "127.0.0.1:8080"

# sdk-signature-vectors.json, trimmed to what a verifier reads. The file itself is checked
# too when shared/ is beside the repository (test_every_vector_in_the_shared_file).
_ACS3_HEADERS = {
    "accept": "application/json",
    "host": "127.0.0.1:8080",
    "user-agent": "AlibabaCloud (Linux; x86_64) Python/3.11.7 Core/0.4.3 TeaDSL/2",
    "x-acs-content-sha256": sig.EMPTY_SHA256,
    "x-acs-credentials-provider": "static_ak",
    "x-acs-date": "2026-11-24T19:15:23Z",
    "x-acs-version": "2014-05-26",
}
_SIGNED = ("accept;host;user-agent;x-acs-action;x-acs-content-sha256;"
           "x-acs-credentials-provider;x-acs-date;x-acs-signature-nonce;x-acs-version")
VECTORS: dict[str, dict[str, Any]] = {
    "acs3_CreateSnapshotGroup": {
        "raw_request_target": "/?Description=a+b%2Ac~d%2F%C3%A9&ExcludeDiskId.1=d-2&"
                              "ExcludeDiskId.2=d-3&InstanceId=i-1&Name=my+group&"
                              "RegionId=cn-hangzhou",
        "headers": {**_ACS3_HEADERS, "x-acs-action": "CreateSnapshotGroup",
                    "x-acs-signature-nonce": "965be6c7088fb85b61764dbe889bdbed"},
        "authorization": f"ACS3-HMAC-SHA256 Credential=testid,SignedHeaders={_SIGNED},"
                         "Signature=a6f870fa1594d86d44a6db5b799aaf54a43100da0c2d504cba2a237e"
                         "7167539b",
        "string_to_sign": "ACS3-HMAC-SHA256\n9245c9a9258ea5fcfdd3f98d7405c3f5e6017366a13ce"
                          "c9cd71945f5d8d34c59",
    },
    "acs3_StopInstance": {
        "raw_request_target": "/?InstanceId=i-1&StoppedMode=StopCharging",
        "headers": {**_ACS3_HEADERS, "x-acs-action": "StopInstance",
                    "x-acs-signature-nonce": "ab2f95d4fb161dbb3223265870f7b830"},
        "authorization": f"ACS3-HMAC-SHA256 Credential=testid,SignedHeaders={_SIGNED},"
                         "Signature=55fff44e4ee234639f2975440320c33f624746c68a13f3635f56f821"
                         "0917d15c",
        "string_to_sign": "ACS3-HMAC-SHA256\ne3592183e710595fb82afc6470bca41127c455c430843"
                          "f7f4abb61ff30f5a8ce",
    },
    "rpcv1_CreateSnapshotGroup": {
        "raw_request_target": "/?InstanceId=i-1&ExcludeDiskId.1=d-2&ExcludeDiskId.2=d-3&"
                              "Name=my%20group&Description=a%20b%2Ac~d%2F%C3%A9&"
                              "Version=2014-05-26&Action=CreateSnapshotGroup&Format=JSON&"
                              "RegionId=cn-hangzhou&Timestamp=2026-11-24T19%3A15%3A23Z&"
                              "SignatureMethod=HMAC-SHA1&SignatureType=&SignatureVersion=1.0&"
                              "SignatureNonce=5e8ce037ed5cb3390eaa59e43a3ec7e8&"
                              "AccessKeyId=testid&Signature=mKg4dS4kwmB2Uli6%2FJfzmLikdRo%3D",
        "headers": {},
        "string_to_sign": "POST&%2F&AccessKeyId%3Dtestid%26Action%3DCreateSnapshotGroup%26"
                          "Description%3Da%2520b%252Ac~d%252F%25C3%25A9%26ExcludeDiskId.1%3D"
                          "d-2%26ExcludeDiskId.2%3Dd-3%26Format%3DJSON%26InstanceId%3Di-1%26"
                          "Name%3Dmy%2520group%26RegionId%3Dcn-hangzhou%26SignatureMethod%3D"
                          "HMAC-SHA1%26SignatureNonce%3D5e8ce037ed5cb3390eaa59e43a3ec7e8%26"
                          "SignatureType%3D%26SignatureVersion%3D1.0%26Timestamp%3D2026-11-"
                          "24T19%253A15%253A23Z%26Version%3D2014-05-26",
    },
    "rpcv1_StopInstance": {
        "raw_request_target": "/?InstanceId=i-1&StoppedMode=StopCharging&Version=2014-05-26&"
                              "Action=StopInstance&Format=JSON&RegionId=cn-hangzhou&"
                              "Timestamp=2026-11-24T19%3A15%3A23Z&SignatureMethod=HMAC-SHA1&"
                              "SignatureType=&SignatureVersion=1.0&"
                              "SignatureNonce=7ad3d3f9466f8e6d148f10a876d826af&"
                              "AccessKeyId=testid&Signature=V%2FNZhrZRJrSoXheaXAr8CDUQGH8%3D",
        "headers": {},
        "string_to_sign": "POST&%2F&AccessKeyId%3Dtestid%26Action%3DStopInstance%26Format%3D"
                          "JSON%26InstanceId%3Di-1%26RegionId%3Dcn-hangzhou%26SignatureMethod"
                          "%3DHMAC-SHA1%26SignatureNonce%3D7ad3d3f9466f8e6d148f10a876d826af%26"
                          "SignatureType%3D%26SignatureVersion%3D1.0%26StoppedMode%3D"
                          "StopCharging%26Timestamp%3D2026-11-24T19%253A15%253A23Z%26Version"
                          "%3D2014-05-26",
    },
}


def _shared_vectors() -> Path | None:
    here = Path(__file__).resolve()
    for base in here.parents:
        candidate = base / "shared" / "reference" / "sdk-signature-vectors.json"
        if candidate.is_file():
            return candidate
    return None


def request_of(vector: dict[str, Any], **changes: Any) -> SignedRequest:
    """The request a vector describes, as the server would build it from the wire."""
    headers = dict(vector.get("headers") or {})
    if vector.get("authorization"):
        headers["authorization"] = vector["authorization"]
    path, _, query = vector["raw_request_target"].partition("?")
    body = vector.get("body") or ""
    args: dict[str, Any] = {"method": vector.get("method", "POST"), "path": path,
                            "query": parse_query(query), "headers": headers,
                            "body": body.encode() if isinstance(body, str) else body}
    args.update(changes)
    return SignedRequest(**args)


def check(request: SignedRequest, now: datetime = SIGNED_AT,
          store: MemoryNonceStore | None = None,
          window: timedelta = sig.DEFAULT_WINDOW) -> AuthResult:
    return verify(request, KEYS.get, MemoryNonceStore() if store is None else store, now,
                  window)


def rejected(request: SignedRequest, code: str, status: int, **kw: Any) -> EcsError:
    with pytest.raises(EcsError) as caught:
        check(request, **kw)
    assert (caught.value.code, caught.value.http_status) == (code, status), caught.value
    return caught.value


def with_query(request: SignedRequest, edit: Callable[[list[tuple[str, str]]], None]
               ) -> SignedRequest:
    pairs = list(request.query)
    edit(pairs)
    return SignedRequest(request.method, request.path, pairs, request.headers, request.body)


def with_headers(request: SignedRequest, **headers: str | None) -> SignedRequest:
    new = dict(request.headers)
    for name, value in headers.items():
        key = name.replace("_", "-")
        if value is None:
            new.pop(key, None)
        else:
            new[key] = value
    return SignedRequest(request.method, request.path, request.query, new, request.body)


def set_param(name: str, value: str | None) -> Callable[[list[tuple[str, str]]], None]:
    def edit(pairs: list[tuple[str, str]]) -> None:
        kept = [(k, v) for k, v in pairs if k != name]
        if value is not None:
            kept.append((name, value))
        pairs[:] = kept
    return edit


ACS3 = [n for n in VECTORS if n.startswith("acs3")]
RPC = [n for n in VECTORS if n.startswith("rpcv1")]


# ------------------------------------------------------------------ the captured vectors


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_captured_vector_verifies(name: str) -> None:
    result = check(request_of(VECTORS[name]))
    assert result.access_key_id == "testid"
    assert result.account_id == "acc-test"
    assert result.scheme == (sig.SCHEME_ACS3 if name.startswith("acs3") else sig.SCHEME_RPC_V1)
    assert result.timestamp == SIGNED_AT
    assert result.action == name.split("_", 1)[1]
    assert result.version == "2014-05-26"


def test_rpc_v1_action_comes_from_the_signed_parameter() -> None:
    # The old SDK also sends x-acs-action / x-acs-version headers, which v1 does not sign.
    request = with_headers(request_of(VECTORS["rpcv1_StopInstance"]),
                           x_acs_action="DeleteInstance", x_acs_version="2099-01-01")
    result = check(request)
    assert (result.action, result.version) == ("StopInstance", "2014-05-26")


def test_acs3_action_may_come_from_the_signed_query() -> None:
    headers = sig.acs3_request_headers("", [("Action", "StopInstance")], HOST, "testid",
                                       "testsecret", now=SIGNED_AT)
    del headers["x-acs-action"]
    headers["authorization"] = sig.sign_acs3(
        "POST", "/", [("Action", "StopInstance")],
        {k: v for k, v in headers.items() if k != "authorization"}, b"", "testid",
        "testsecret")
    request = SignedRequest("POST", "/", [("Action", "StopInstance")], headers)
    assert check(request).action == "StopInstance"


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_string_to_sign_matches_the_vector(name: str) -> None:
    vector, request = VECTORS[name], request_of(VECTORS[name])
    if name.startswith("acs3"):
        auth = sig.parse_authorization(vector["authorization"])
        canonical = sig.acs3_canonical_request(request.method, request.path, request.query,
                                               request.headers, auth.signed_headers,
                                               sig.EMPTY_SHA256)
        assert sig.acs3_string_to_sign(canonical) == vector["string_to_sign"]
    else:
        assert sig.rpc_v1_string_to_sign("POST", request.params()) == vector["string_to_sign"]


def test_doc_example_canonical_request() -> None:
    vector = VECTORS["acs3_CreateSnapshotGroup"]
    request = request_of(vector)
    auth = sig.parse_authorization(vector["authorization"])
    canonical = sig.acs3_canonical_request("POST", "/", request.query, request.headers,
                                           auth.signed_headers, sig.EMPTY_SHA256)
    assert canonical.split("\n")[:3] == [
        "POST", "/", "Description=a%20b%2Ac~d%2F%C3%A9&ExcludeDiskId.1=d-2&ExcludeDiskId.2=d-3"
        "&InstanceId=i-1&Name=my%20group&RegionId=cn-hangzhou"]
    assert f"\n\n{_SIGNED}\n{sig.EMPTY_SHA256}" in canonical


def test_ecs_api_doc_vector() -> None:
    params = {"AccessKeyId": "testid", "Action": "DescribeRegions", "Format": "XML",
              "SignatureMethod": "HMAC-SHA1",
              "SignatureNonce": "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf",
              "SignatureVersion": "1.0", "Timestamp": "2016-02-23T12:46:24Z",
              "Version": "2014-05-26"}
    assert sig.sign_rpc_v1(params, "testsecret", "GET") == "OLeaidS1JvxuMvnyHOwuJ+uX5qY="


def test_every_vector_in_the_shared_file() -> None:
    path = _shared_vectors()
    assert path is not None, "../shared/reference/sdk-signature-vectors.json must be beside " \
                             "the repository (as in CI)"
    vectors = json.loads(path.read_text())
    assert vectors
    for name, vector in vectors.items():
        request = request_of(vector)
        assert [list(p) for p in request.query] == vector["decoded_query_pairs"], name
        keys = {vector["access_key_id"]: AccessKeyRecord(
            vector["access_key_id"], vector["access_key_secret"], True, "acc")}
        result = verify(request, keys.get, MemoryNonceStore(), SIGNED_AT)
        assert result.access_key_id == vector["access_key_id"], name
        if name in VECTORS:
            assert VECTORS[name]["string_to_sign"] == vector["string_to_sign"], name


# ------------------------------------------------------------------ rejections


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_tampered_query_is_rejected(name: str) -> None:
    tampered = with_query(request_of(VECTORS[name]), set_param("InstanceId", "i-2"))
    error = rejected(tampered, "SignatureDoesNotMatch", 400)
    # The old SDK reads Message.split(':')[1] as the server's string-to-sign.
    server_sts = error.message.split(":")[1]
    assert server_sts != VECTORS[name]["string_to_sign"]
    if name.startswith("rpcv1"):
        assert "InstanceId%3Di-2" in server_sts


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_added_parameter_is_rejected(name: str) -> None:
    tampered = with_query(request_of(VECTORS[name]), lambda p: p.append(("DryRun", "true")))
    rejected(tampered, "SignatureDoesNotMatch", 400)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_wrong_secret_reports_the_same_string_to_sign(name: str) -> None:
    keys = {"testid": AccessKeyRecord("testid", "not-the-secret", True, "acc-test")}
    with pytest.raises(EcsError) as caught:
        verify(request_of(VECTORS[name]), keys.get, MemoryNonceStore(), SIGNED_AT)
    error = caught.value
    assert (error.code, error.http_status) == ("SignatureDoesNotMatch", 400)
    assert error.message.startswith("Specified signature is not matched with our "
                                    "calculation. server string to sign is:")
    # Equal to the client's own string-to-sign: the old SDK then says InvalidAccessKeySecret.
    assert error.message.split(":")[1] == VECTORS[name]["string_to_sign"]


@pytest.mark.parametrize("name", ACS3)
def test_tampered_signed_header_is_rejected(name: str) -> None:
    request = with_headers(request_of(VECTORS[name]), x_acs_action="DeleteInstance")
    rejected(request, "SignatureDoesNotMatch", 400)


@pytest.mark.parametrize("name", ACS3)
def test_body_not_matching_content_sha256_is_rejected(name: str) -> None:
    request = request_of(VECTORS[name], body=b"InstanceId=i-9")
    error = rejected(request, "SignatureDoesNotMatch", 400)
    assert ":" in error.message


@pytest.mark.parametrize("name", sorted(VECTORS))
@pytest.mark.parametrize("offset", [timedelta(minutes=16), -timedelta(minutes=16),
                                    timedelta(days=400), -timedelta(days=400)])
def test_stale_or_future_timestamp_is_rejected(name: str, offset: timedelta) -> None:
    rejected(request_of(VECTORS[name]), "IllegalTimestamp", 400, now=SIGNED_AT + offset)


@pytest.mark.parametrize("name", sorted(VECTORS))
@pytest.mark.parametrize("offset", [timedelta(minutes=15), -timedelta(minutes=15)])
def test_timestamp_at_the_edge_of_the_window_passes(name: str, offset: timedelta) -> None:
    check(request_of(VECTORS[name]), now=SIGNED_AT + offset)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_window_is_configurable(name: str) -> None:
    request = request_of(VECTORS[name])
    rejected(request, "IllegalTimestamp", 400, now=SIGNED_AT + timedelta(minutes=2),
             window=timedelta(minutes=1))
    check(request, now=SIGNED_AT + timedelta(hours=5), window=timedelta(hours=6))


def test_aware_now_is_accepted() -> None:
    check(request_of(VECTORS["acs3_StopInstance"]), now=SIGNED_AT.replace(tzinfo=UTC))
    eastern = datetime(2026, 11, 25, 3, 15, 23, tzinfo=timezone(timedelta(hours=8)))
    check(request_of(VECTORS["rpcv1_StopInstance"]), now=eastern)


@pytest.mark.parametrize("stamp", ["2026-11-24 19:15:23", "2026-11-24T19:15:23",
                                   "2026-13-24T19:15:23Z", "2026-11-24T25:15:23Z",
                                   "2026-11-24T19:15:23+00:00", "1795000000", "yesterday",
                                   "\uff12\uff10\uff12\uff16-11-24T19:15:23Z"])
def test_malformed_timestamp_is_rejected(stamp: str) -> None:
    rpc = with_query(request_of(VECTORS["rpcv1_StopInstance"]), set_param("Timestamp", stamp))
    assert "Timestamp" in rejected(rpc, "IllegalTimestamp", 400).message
    acs3 = with_headers(request_of(VECTORS["acs3_StopInstance"]), x_acs_date=stamp)
    assert "x-acs-date" in rejected(acs3, "IllegalTimestamp", 400).message


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_replayed_nonce_is_rejected(name: str) -> None:
    store = MemoryNonceStore()
    check(request_of(VECTORS[name]), store=store)
    rejected(request_of(VECTORS[name]), "SignatureNonceUsed", 400, store=store,
             now=SIGNED_AT + timedelta(minutes=3))


def test_failed_request_does_not_spend_the_nonce() -> None:
    store = MemoryNonceStore()
    vector = VECTORS["rpcv1_StopInstance"]
    forged = with_query(request_of(vector), set_param("StoppedMode", "KeepCharging"))
    rejected(forged, "SignatureDoesNotMatch", 400, store=store)
    check(request_of(vector), store=store)


def test_nonces_are_per_access_key() -> None:
    store = MemoryNonceStore()
    now = SIGNED_AT
    assert store.remember("a", "n1", now + timedelta(minutes=15), now)
    assert store.remember("b", "n1", now + timedelta(minutes=15), now)
    assert not store.remember("a", "n1", now + timedelta(minutes=15), now)


def test_memory_nonce_store_forgets_expired_nonces() -> None:
    store = MemoryNonceStore()
    now = SIGNED_AT
    for i in range(50):
        assert store.remember("k", f"n{i}", now + timedelta(minutes=15), now)
    assert len(store) == 50
    later = now + timedelta(minutes=16)
    assert store.remember("k", "n0", later + timedelta(minutes=15), later)
    assert len(store) == 1
    assert not store.remember("k", "n0", later + timedelta(minutes=15), later)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_unknown_key_is_rejected(name: str) -> None:
    with pytest.raises(EcsError) as caught:
        verify(request_of(VECTORS[name]), lambda _: None, MemoryNonceStore(), SIGNED_AT)
    assert (caught.value.code, caught.value.http_status) == ("InvalidAccessKeyId.NotFound", 400)


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_disabled_key_is_rejected(name: str) -> None:
    keys = {"testid": AccessKeyRecord("testid", "testsecret", False, "acc-test")}
    with pytest.raises(EcsError) as caught:
        verify(request_of(VECTORS[name]), keys.get, MemoryNonceStore(), SIGNED_AT)
    assert (caught.value.code, caught.value.http_status) == ("Forbidden.AccessKeyDisabled", 403)


@pytest.mark.parametrize("param", ["Signature", "AccessKeyId", "SignatureNonce", "Timestamp",
                                   "SignatureMethod", "SignatureVersion"])
@pytest.mark.parametrize("value", [None, ""])
def test_missing_rpc_v1_field_is_rejected(param: str, value: str | None) -> None:
    request = with_query(request_of(VECTORS["rpcv1_StopInstance"]), set_param(param, value))
    error = rejected(request, "MissingParameter", 400)
    assert f'"{param}"' in error.message


def test_unsigned_request_is_missing_parameter() -> None:
    request = SignedRequest("POST", "/", [("Action", "StopInstance"), ("InstanceId", "i-1")],
                            {"host": HOST})
    assert '"AccessKeyId"' in rejected(request, "MissingParameter", 400).message


@pytest.mark.parametrize(("param", "value"), [("SignatureMethod", "HMAC-SHA256"),
                                              ("SignatureVersion", "2.0")])
def test_unsupported_rpc_v1_method_is_incomplete(param: str, value: str) -> None:
    request = with_query(request_of(VECTORS["rpcv1_StopInstance"]), set_param(param, value))
    rejected(request, "IncompleteSignature", 400)


def test_duplicated_signature_is_incomplete() -> None:
    request = with_query(request_of(VECTORS["rpcv1_StopInstance"]),
                         lambda p: p.append(("Signature", "AAAA")))
    rejected(request, "IncompleteSignature", 400)


def test_overlong_nonce_is_invalid() -> None:
    request = with_query(request_of(VECTORS["rpcv1_StopInstance"]),
                         set_param("SignatureNonce", "n" * 129))
    rejected(request, "InvalidParameter", 400)


@pytest.mark.parametrize("authorization", [
    "ACS3-HMAC-SHA256",
    "ACS3-HMAC-SHA256 Credential=testid",
    "ACS3-HMAC-SHA256 Credential=testid,SignedHeaders=host,Signature=",
    "ACS3-HMAC-SHA256 Credential=,SignedHeaders=host,Signature=ab",
    "ACS3-HMAC-SHA256 Credential=testid,SignedHeaders=host;;x-acs-date,Signature=ab",
    "ACS3-HMAC-SM3 Credential=testid,SignedHeaders=host,Signature=ab",
    "ACS3-RSA-SHA256 Credential=testid,SignedHeaders=host,Signature=ab",
])
def test_malformed_authorization_is_incomplete(authorization: str) -> None:
    request = with_headers(request_of(VECTORS["acs3_StopInstance"]),
                           authorization=authorization)
    rejected(request, "IncompleteSignature", 400)


def test_other_authorization_scheme_is_incomplete() -> None:
    request = SignedRequest("POST", "/", [], {"authorization": "Basic dGVzdDp0ZXN0"})
    rejected(request, "IncompleteSignature", 400)


@pytest.mark.parametrize("header", ["x-acs-date", "x-acs-signature-nonce",
                                    "x-acs-content-sha256"])
def test_missing_acs3_header_is_missing_parameter(header: str) -> None:
    request = with_headers(request_of(VECTORS["acs3_StopInstance"]),
                           **{header.replace("-", "_"): None})
    assert header in rejected(request, "MissingParameter", 400).message


@pytest.mark.parametrize("dropped", ["host", "x-acs-action", "x-acs-date",
                                     "x-acs-signature-nonce", "x-acs-version"])
def test_acs3_must_sign_host_and_every_x_acs_header(dropped: str) -> None:
    names = [n for n in _SIGNED.split(";") if n != dropped]
    request = request_of(VECTORS["acs3_StopInstance"])
    secret = KEYS["testid"].secret
    canonical = sig.acs3_canonical_request("POST", "/", request.query, request.headers, names,
                                           sig.EMPTY_SHA256)
    signature = sig.acs3_signature(secret, sig.acs3_string_to_sign(canonical))
    auth = sig.Acs3Authorization(sig.SCHEME_ACS3, "testid", tuple(names), signature)
    error = rejected(with_headers(request, authorization=auth.header()),
                     "IncompleteSignature", 400)
    assert dropped in error.message


def test_unsigned_extra_headers_are_ignored() -> None:
    # The async SDK adds an unsigned Content-Type; requests adds Accept-Encoding.
    request = with_headers(request_of(VECTORS["acs3_StopInstance"]),
                           content_type="application/octet-stream",
                           accept_encoding="gzip, deflate", content_length="0")
    check(request)


# ------------------------------------------------------------------ client signer


TRICKY = [("Description", "a b*c~d/é +%&=?#"), ("Name", ""), ("Emoji", "😀"),
          ("Tag.1.Key", "k:1"), ("Tag.1.Value", "v;2,3"), ("InstanceIds", '["i-1", "i-2"]')]


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_rpc_v1_signer_round_trips_through_the_wire(method: str) -> None:
    pairs = sig.rpc_v1_request_params("DescribeInstances", TRICKY, "testid", "testsecret",
                                      method=method, now=SIGNED_AT)
    wire = urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)
    request = SignedRequest(method, "/", parse_query(wire), {"host": HOST})
    result = check(request)
    assert (result.scheme, result.access_key_id) == (sig.SCHEME_RPC_V1, "testid")
    params = Params.from_pairs(request.params())
    assert params.str("Description") == "a b*c~d/é +%&=?#"
    assert params.str("Name") == ""
    assert params.tags() == {"k:1": "v;2,3"}


def test_rpc_v1_signer_with_form_body() -> None:
    pairs = sig.rpc_v1_request_params("StopInstance", TRICKY, "testid", "testsecret",
                                      now=SIGNED_AT)
    query, form = pairs[:3], pairs[3:]
    body = urllib.parse.urlencode(form).encode()
    headers = {"host": HOST, "content-type": "application/x-www-form-urlencoded; charset=UTF-8"}
    request = SignedRequest("POST", "/", query, headers, body)
    assert check(request).scheme == sig.SCHEME_RPC_V1
    forged = body.replace(b"InstanceIds", b"InstanceIdz")
    tampered = SignedRequest("POST", "/", query, headers, forged)
    rejected(tampered, "SignatureDoesNotMatch", 400)
    # A body that is not a form is not a parameter source (and not signed by v1).
    other = SignedRequest("POST", "/", query, {"host": HOST, "content-type": "text/plain"},
                          body)
    rejected(other, "MissingParameter", 400)


def test_acs3_signer_round_trips_through_the_wire() -> None:
    headers = sig.acs3_request_headers("DescribeInstances", TRICKY, HOST, "testid",
                                       "testsecret", now=SIGNED_AT)
    wire = urllib.parse.urlencode(TRICKY)  # '+' for spaces, like the new SDK
    request = SignedRequest("POST", "/", parse_query(wire), headers)
    result = check(request)
    assert (result.scheme, result.access_key_id, result.nonce) == (
        sig.SCHEME_ACS3, "testid", headers["x-acs-signature-nonce"])
    assert len(result.nonce) == 32


def test_acs3_signer_with_body_and_extra_headers() -> None:
    body = b"InstanceId=i-1&StoppedMode=StopCharging"
    headers = sig.acs3_request_headers(
        "StopInstance", [], HOST, "testid", "testsecret", now=SIGNED_AT, body=body,
        extra={"Content-Type": "application/x-www-form-urlencoded"})
    request = SignedRequest("POST", "/", [], headers, body)
    assert check(request).scheme == sig.SCHEME_ACS3
    assert Params.from_pairs(request.params()).str("StoppedMode") == "StopCharging"
    rejected(SignedRequest("POST", "/", [], headers, body + b"x"), "SignatureDoesNotMatch", 400)


def test_signers_reuse_the_verifier_canonicalisation() -> None:
    vector = VECTORS["rpcv1_StopInstance"]
    request = request_of(vector)
    given_sig = dict(request.query)["Signature"]
    assert sig.sign_rpc_v1(request.query, "testsecret") == given_sig
    acs3 = request_of(VECTORS["acs3_StopInstance"])
    signed = {k: v for k, v in acs3.headers.items() if k != "authorization"}
    assert sig.sign_acs3("POST", "/", acs3.query, signed, b"", "testid", "testsecret") == \
        VECTORS["acs3_StopInstance"]["authorization"]


def test_from_asgi_scope() -> None:
    vector = VECTORS["acs3_CreateSnapshotGroup"]
    path, _, query = vector["raw_request_target"].partition("?")
    raw_headers = [(k.encode(), v.encode()) for k, v in vector["headers"].items()]
    raw_headers.append((b"Authorization", vector["authorization"].encode()))
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
             "query_string": query.encode(), "headers": raw_headers}
    request = SignedRequest.from_asgi(scope, b"")
    assert request.headers["authorization"] == vector["authorization"]
    assert check(request).scheme == sig.SCHEME_ACS3


def test_signed_request_is_immutable() -> None:
    request = request_of(VECTORS["acs3_StopInstance"])
    with pytest.raises(AttributeError):
        request.method = "GET"  # type: ignore[misc]
    with pytest.raises(TypeError):
        request.headers["host"] = "evil"  # type: ignore[index]


_text = st.text(max_size=40)
_pairs = st.lists(st.tuples(st.sampled_from(
    ["AccessKeyId", "Signature", "SignatureNonce", "Timestamp", "SignatureMethod",
     "SignatureVersion", "Action", "X"]) | _text, _text), max_size=12)
_headers = st.dictionaries(st.sampled_from(
    ["authorization", "x-acs-date", "x-acs-signature-nonce", "x-acs-content-sha256", "host",
     "x-acs-action", "content-type"]) | _text, _text, max_size=8)


@settings(max_examples=300, deadline=None)
@given(query=_pairs, headers=_headers, body=st.binary(max_size=64),
       auth=st.sampled_from(["", "ACS3-HMAC-SHA256 ", "ACS3-x "]) | _text)
def test_verify_raises_only_ecs_errors(query: list[tuple[str, str]], headers: dict[str, str],
                                       body: bytes, auth: str) -> None:
    if auth:
        headers = {**headers, "authorization": auth + headers.get("authorization", "")}
    with contextlib.suppress(EcsError):
        check(SignedRequest("POST", "/", query, headers, body))


# ------------------------------------------------------------------ the real SDKs


@dataclass
class Captured:
    request: SignedRequest
    params: Params
    action: str
    auth: AuthResult | None
    error: EcsError | None
    request_id: str


@dataclass
class WireServer:
    """A stdlib HTTP server that verifies, decodes and answers like ecsnap's API will."""

    port: int
    seen: list[Captured] = field(default_factory=list)
    answers: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def last(self) -> Captured:
        return self.seen[-1]


def _handler(state: WireServer, nonces: MemoryNonceStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path, _, query = self.path.partition("?")
            headers: dict[str, str] = {}
            for name, value in self.headers.items():
                key = name.lower()
                headers[key] = f"{headers[key]},{value}" if key in headers else value
            request = SignedRequest(self.command, path, parse_query(query), headers, body)
            request_id = new_request_id()
            params = Params({})
            action = headers.get("x-acs-action", "")
            auth: AuthResult | None = None
            error: EcsError | None = None
            try:
                params = Params.from_pairs(request.params())
                action = action or params.str("Action") or ""
                auth = verify(request, KEYS.get, nonces, datetime.now(UTC))
                answer = state.answers.get(action, {})
                if isinstance(answer, EcsError):
                    raise answer
                out = render(action, answer, request_id, params.raw("Format"))
            except EcsError as e:
                error = e
                out = render_error(e, request_id, params.raw("Format"))
            state.seen.append(Captured(request, params, action, auth, error, request_id))
            self.send_response(out.status)
            self.send_header("Content-Type", out.content_type)
            self.send_header("Content-Length", str(len(out.body)))
            self.end_headers()
            self.wfile.write(out.body)

        do_GET = do_POST

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def wire() -> Iterator[WireServer]:
    state = WireServer(0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, MemoryNonceStore()))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def new_sdk(wire: WireServer, secret: str = "testsecret", key: str = "testid",
            algorithm: str | None = None) -> Any:
    from alibabacloud_ecs20140526.client import Client
    from alibabacloud_tea_openapi import models as open_api_models

    config = open_api_models.Config(access_key_id=key, access_key_secret=secret,
                                    endpoint=wire.endpoint, protocol="http",
                                    region_id="cn-hangzhou")
    if algorithm:
        config.signature_algorithm = algorithm
    return Client(config)


def old_sdk(secret: str = "testsecret", key: str = "testid") -> Any:
    from aliyunsdkcore.client import AcsClient

    return AcsClient(key, secret, "cn-hangzhou", auto_retry=False)


def _old_request(wire: WireServer, name: str) -> Any:
    module = __import__(f"aliyunsdkecs.request.v20140526.{name}Request",
                        fromlist=[f"{name}Request"])
    request = getattr(module, f"{name}Request")()
    request.set_endpoint(wire.endpoint)
    request.set_protocol_type("http")
    return request


def test_new_sdk_acs3_create_snapshot_group(wire: WireServer) -> None:
    client = new_sdk(wire)
    from alibabacloud_ecs20140526 import models

    wire.answers["CreateSnapshotGroup"] = {"SnapshotGroupId": "ssg-1"}
    response = client.create_snapshot_group(models.CreateSnapshotGroupRequest(
        region_id="cn-hangzhou", instance_id="i-1", exclude_disk_id=["d-2", "d-3"],
        name="my group", description="a b*c~d/é", instant_access=True,
        tag=[models.CreateSnapshotGroupRequestTag(key="team", value="a b"),
             models.CreateSnapshotGroupRequestTag(key="empty", value="")]))
    seen = wire.last
    assert seen.error is None and seen.auth is not None
    assert seen.auth.scheme == sig.SCHEME_ACS3
    assert response.status_code == 200
    assert response.body.snapshot_group_id == "ssg-1"
    assert response.body.request_id == seen.request_id
    p = seen.params
    assert p.list("ExcludeDiskId") == ["d-2", "d-3"]
    assert p.str("Description") == "a b*c~d/é"
    assert p.bool("InstantAccess") is True
    assert p.tags() == {"team": "a b", "empty": ""}


def test_new_sdk_v2_signature_and_describe_instances(wire: WireServer) -> None:
    client = new_sdk(wire, algorithm="v2")
    from alibabacloud_ecs20140526 import models

    wire.answers["DescribeInstances"] = {
        "TotalCount": 1, "PageNumber": 1, "PageSize": 10, "NextToken": "",
        "Instances": {"Instance": [{
            "InstanceId": "i-1", "Status": "Running", "Cpu": 2, "Memory": 4096,
            "PublicIpAddress": {"IpAddress": []},
            "VpcAttributes": {"PrivateIpAddress": {"IpAddress": ["10.0.0.5"]}},
            "Tags": {"Tag": [{"TagKey": "k", "TagValue": "v"}]},
            "OperationLocks": {"LockReason": []}}]}}
    response = client.describe_instances(models.DescribeInstancesRequest(
        region_id="cn-hangzhou", instance_ids='["i-1", "i-2"]', page_size=10, dry_run=False))
    seen = wire.last
    assert seen.auth is not None and seen.auth.scheme == sig.SCHEME_RPC_V1
    assert seen.params.json_list("InstanceIds") == ["i-1", "i-2"]
    assert seen.params.int("PageSize") == 10
    assert seen.params.bool("DryRun") is False
    instance = response.body.instances.instance[0]
    assert (instance.instance_id, instance.cpu) == ("i-1", 2)
    assert instance.vpc_attributes.private_ip_address.ip_address == ["10.0.0.5"]
    assert instance.tags.tag[0].tag_key == "k"
    assert instance.public_ip_address.ip_address == []
    assert response.body.total_count == 1


def test_new_sdk_nested_lists_deserialize(wire: WireServer) -> None:
    client = new_sdk(wire)
    from alibabacloud_ecs20140526 import models

    wire.answers["DescribeSnapshotGroups"] = {"NextToken": "", "SnapshotGroups": {
        "SnapshotGroup": [{
            "SnapshotGroupId": "ssg-1", "Status": "accomplished",
            "Snapshots": {"Snapshot": [{"SnapshotId": "s-1", "Available": True,
                                        "InstantAccess": False,
                                        "InstantAccessRetentionDays": 0,
                                        "Tags": {"Tag": []}}]},
            "Tags": {"Tag": [{"Key": "team", "Value": "x"}]}}]}}
    response = client.describe_snapshot_groups(models.DescribeSnapshotGroupsRequest(
        region_id="cn-hangzhou", snapshot_group_id=["ssg-1", "ssg-2"],
        status=["accomplished"]))
    assert wire.last.params.list("SnapshotGroupId") == ["ssg-1", "ssg-2"]
    group = response.body.snapshot_groups.snapshot_group[0]
    assert group.snapshots.snapshot[0].available is True
    assert group.snapshots.snapshot[0].tags.tag == []
    assert group.tags.tag[0].key == "team"


def test_new_sdk_wrong_secret_gets_signature_does_not_match(wire: WireServer) -> None:
    client = new_sdk(wire, secret="wrong")
    from alibabacloud_ecs20140526 import models
    from alibabacloud_tea_openapi.exceptions import ClientException

    with pytest.raises(ClientException) as caught:
        client.stop_instance(models.StopInstanceRequest(instance_id="i-1"))
    assert caught.value.code == "SignatureDoesNotMatch"
    assert caught.value.status_code == 400
    assert caught.value.request_id == wire.last.request_id
    assert ":" in caught.value.data["Message"]


def test_new_sdk_error_envelope(wire: WireServer) -> None:
    client = new_sdk(wire)
    from alibabacloud_ecs20140526 import models
    from alibabacloud_tea_openapi.exceptions import ClientException

    wire.answers["StopInstance"] = EcsError("IncorrectInstanceStatus", "Not now.", 403)
    with pytest.raises(ClientException) as caught:
        client.stop_instance(models.StopInstanceRequest(instance_id="i-1",
                                                        stopped_mode="StopCharging"))
    error = caught.value
    assert (error.code, error.status_code) == ("IncorrectInstanceStatus", 403)
    assert error.data["Message"] == "Not now."
    assert error.data["HostId"] and error.data["Recommend"]
    assert wire.last.params.enum("StoppedMode", {"StopCharging", "KeepCharging"}) == \
        "StopCharging"


def test_new_sdk_unknown_and_disabled_keys(wire: WireServer) -> None:
    from alibabacloud_ecs20140526 import models
    from alibabacloud_tea_openapi.exceptions import ClientException

    for key, code, status in [("nobody", "InvalidAccessKeyId.NotFound", 400),
                              ("offid", "Forbidden.AccessKeyDisabled", 403)]:
        client = new_sdk(wire, key=key, secret="offsecret")
        with pytest.raises(ClientException) as caught:
            client.stop_instance(models.StopInstanceRequest(instance_id="i-1"))
        assert (caught.value.code, caught.value.status_code) == (code, status)


def test_old_sdk_reset_disks(wire: WireServer) -> None:
    client = old_sdk()
    request = _old_request(wire, "ResetDisks")
    request.set_Disks([{"DiskId": "d-1", "SnapshotId": "s-1"},
                       {"DiskId": "d-2", "SnapshotId": "s-2"}])
    request.set_DryRun(True)
    wire.answers["ResetDisks"] = {"OperationProgressSet": {"OperationProgress": []}}
    body = json.loads(client.do_action_with_exception(request))
    seen = wire.last
    assert seen.auth is not None and seen.auth.scheme == sig.SCHEME_RPC_V1
    assert body == {"RequestId": seen.request_id,
                    "OperationProgressSet": {"OperationProgress": []}}
    assert seen.params.objects("Disk", fields=("DiskId", "SnapshotId")) == [
        {"DiskId": "d-1", "SnapshotId": "s-1"}, {"DiskId": "d-2", "SnapshotId": "s-2"}]
    assert seen.params.bool("DryRun") is True
    assert seen.params.str("RegionId") == "cn-hangzhou"


def test_old_sdk_create_snapshot_group_with_tags(wire: WireServer) -> None:
    client = old_sdk()
    request = _old_request(wire, "CreateSnapshotGroup")
    request.set_InstanceId("i-1")
    request.set_ExcludeDiskIds(["d-2", "d-3"])
    request.set_Name("my group")
    request.set_Description("a b*c~d/é")
    request.set_Tags([{"Key": "team", "Value": "a b"}])
    wire.answers["CreateSnapshotGroup"] = {"SnapshotGroupId": "ssg-9"}
    body = json.loads(client.do_action_with_exception(request))
    assert body["SnapshotGroupId"] == "ssg-9"
    p = wire.last.params
    assert (p.list("ExcludeDiskId"), p.str("Name"), p.tags()) == (
        ["d-2", "d-3"], "my group", {"team": "a b"})


@pytest.mark.filterwarnings("ignore:do_action\\(\\) method is deprecated:DeprecationWarning")
def test_old_sdk_xml_format(wire: WireServer) -> None:
    import xml.etree.ElementTree as ET

    client = old_sdk()
    request = _old_request(wire, "StopInstance")
    request.set_InstanceId("i-1")
    request.set_accept_format("XML")
    raw = client.do_action(request)  # do_action_with_exception always asks for JSON
    root = ET.fromstring(raw)
    assert root.tag == "StopInstanceResponse"
    assert root.findtext("RequestId") == wire.last.request_id


def test_old_sdk_wrong_secret_becomes_invalid_access_key_secret(wire: WireServer) -> None:
    client = old_sdk(secret="wrong")
    from aliyunsdkcore.acs_exception.exceptions import ServerException

    request = _old_request(wire, "StopInstance")
    request.set_InstanceId("i-1")
    with pytest.raises(ServerException) as caught:
        client.do_action_with_exception(request)
    # The SDK compares Message.split(':')[1] with its own string-to-sign: equal means
    # "your secret is wrong", which proves the server computed the same string.
    assert caught.value.get_error_code() == "InvalidAccessKeySecret"
    assert caught.value.get_http_status() == 400
    assert wire.last.error is not None and wire.last.error.code == "SignatureDoesNotMatch"


def test_old_sdk_unknown_and_disabled_keys(wire: WireServer) -> None:
    for key, code, status in [("nobody", "InvalidAccessKeyId.NotFound", 400),
                              ("offid", "Forbidden.AccessKeyDisabled", 403)]:
        client = old_sdk(key=key, secret="offsecret")
        from aliyunsdkcore.acs_exception.exceptions import ServerException

        request = _old_request(wire, "StopInstance")
        request.set_InstanceId("i-1")
        with pytest.raises(ServerException) as caught:
            client.do_action_with_exception(request)
        assert caught.value.get_error_code() == code
        assert caught.value.get_http_status() == status
        assert caught.value.get_request_id() == wire.last.request_id
