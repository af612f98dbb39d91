"""Request signatures of the ECS API: verify both schemes the official SDKs use, and sign
requests for ecsnap's own clients with the very same canonicalisation.

Two schemes reach the server (SDK-WIRE.md §3):

* **ACS3-HMAC-SHA256** (new "tea" SDK, default): an ``Authorization`` header over a canonical
  request made of the method, the path, the sorted query, the signed headers and the SHA-256
  of the body. Freshness and replay use the ``x-acs-date`` and ``x-acs-signature-nonce``
  headers.
* **RPC v1 HMAC-SHA1** (old SDK; new SDK with ``signature_algorithm="v2"``): a ``Signature``
  parameter over every other parameter of the query and of a form-urlencoded body.
  Freshness and replay use the ``Timestamp`` and ``SignatureNonce`` parameters.

Everything here is pure: the caller gives the request, a key lookup, a nonce store and the
clock, and gets an :class:`AuthResult` or an :class:`EcsError` with the ECS code and status.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import re
import secrets
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

from ecsnap.domain import errors
from ecsnap.domain.errors import EcsError, invalid_parameter, missing_parameter

SCHEME_ACS3: Final = "ACS3-HMAC-SHA256"
SCHEME_RPC_V1: Final = "HMAC-SHA1"
Scheme = Literal["ACS3-HMAC-SHA256", "HMAC-SHA1"]

API_VERSION: Final = "2014-05-26"
DEFAULT_WINDOW: Final = timedelta(minutes=15)
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
MAX_NONCE_LENGTH: Final = 128  # the nonces table's column width
FORM_CONTENT_TYPE: Final = "application/x-www-form-urlencoded"

_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
_TIMESTAMP_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
_MISMATCH: Final = ("Specified signature is not matched with our calculation. "
                    "server string to sign is:")

Pairs = list[tuple[str, str]]


# ------------------------------------------------------------------ request view


@dataclass(frozen=True, init=False)
class SignedRequest:
    """What signature checking needs from one HTTP request, framework-free and immutable.

    ``query`` holds the form-decoded query pairs in wire order, blank values kept (see
    :func:`parse_query`); ``headers`` maps lower-case names to the values as received
    (latin-1 decoded, repeated headers joined with ``,``); ``path`` is the raw request path
    without the query; ``body`` the raw body bytes.
    """

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    headers: Mapping[str, str]
    body: bytes = b""

    def __init__(self, method: str, path: str, query: Iterable[tuple[str, str]],
                 headers: Mapping[str, str], body: bytes = b"") -> None:
        object.__setattr__(self, "method", method.upper())
        object.__setattr__(self, "path", path or "/")
        object.__setattr__(self, "query", tuple((str(k), str(v)) for k, v in query))
        object.__setattr__(self, "headers",
                           MappingProxyType({k.lower(): v for k, v in headers.items()}))
        object.__setattr__(self, "body", bytes(body))

    @classmethod
    def from_asgi(cls, scope: Mapping[str, Any], body: bytes = b"",
                  headers: Mapping[str, str] | None = None) -> SignedRequest:
        """Build the view from an ASGI HTTP scope (``request.scope`` in Starlette) and the
        body bytes, keeping the raw ``Host`` header and the raw path (`headers`: the
        scope's, already decoded by `asgi_headers`)."""
        if headers is None:
            headers = asgi_headers(scope)
        raw_path = scope.get("raw_path")
        path = bytes(raw_path).decode("latin-1") if raw_path else str(scope.get("path") or "/")
        return cls(str(scope.get("method") or "GET"), path,
                   parse_query(scope.get("query_string") or b""), headers, body)

    def params(self) -> Pairs:
        """All request parameters: the query, then the pairs of a form-urlencoded body.
        The RPC v1 signature covers exactly these, and actions should read exactly these."""
        return list(self.query) + form_pairs(self.headers, self.body)


def parse_query(raw: str | bytes) -> Pairs:
    """Form-decode a raw query string (``+`` is a space, ``%XX`` is UTF-8), keeping blank
    values and wire order. Never raises on malformed input."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes | bytearray) else raw
    return urllib.parse.parse_qsl(text, keep_blank_values=True)


def asgi_headers(scope: Mapping[str, Any]) -> dict[str, str]:
    """An ASGI scope's headers by lower-case name (repeated ones joined with commas)."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers") or ():
        name = bytes(raw_name).decode("latin-1").lower()
        value = bytes(raw_value).decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


def form_pairs(headers: Mapping[str, str], body: bytes) -> Pairs:
    """The parameters of a ``application/x-www-form-urlencoded`` body, or none."""
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != FORM_CONTENT_TYPE or not body:
        return []
    return parse_query(body)


# ------------------------------------------------------------------ canonicalisation


def pct(value: str) -> str:
    """RFC 3986 percent-encoding of the UTF-8 bytes: only ``A-Za-z0-9-_.~`` stay literal."""
    return urllib.parse.quote(value, safe="-_.~", encoding="utf-8", errors="surrogatepass")


def _utf8(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """Pairs sorted by key (then value), each ``pct(k)=pct(v)``, joined with ``&``."""
    return "&".join(f"{pct(k)}={pct(v)}" for k, v in sorted(pairs))


def rpc_v1_string_to_sign(method: str, params: Iterable[tuple[str, str]]) -> str:
    """``METHOD&%2F&pct(canonical query)`` over every parameter but ``Signature``."""
    canonical = canonical_query((k, v) for k, v in params if k != "Signature")
    return f"{method.upper()}&{pct('/')}&{pct(canonical)}"


def rpc_v1_signature(secret: str, string_to_sign: str) -> str:
    """``base64(HMAC-SHA1(secret + "&", string_to_sign))``."""
    digest = hmac.new(_utf8(secret + "&"), _utf8(string_to_sign), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def acs3_canonical_request(method: str, path: str, query: Iterable[tuple[str, str]],
                           headers: Mapping[str, str], signed_headers: Iterable[str],
                           payload_sha256: str) -> str:
    """The ACS3 canonical request; ``headers`` has lower-case names, ``signed_headers`` is
    the list from the Authorization header, in its order."""
    names = list(signed_headers)
    lines = "".join(f"{name}:{headers.get(name, '').strip()}\n" for name in names)
    return (f"{method.upper()}\n{path or '/'}\n{canonical_query(query)}\n{lines}\n"
            f"{';'.join(names)}\n{payload_sha256}")


def acs3_string_to_sign(canonical_request: str) -> str:
    """``ACS3-HMAC-SHA256\\n`` + hex SHA-256 of the canonical request."""
    return f"{SCHEME_ACS3}\n{hashlib.sha256(_utf8(canonical_request)).hexdigest()}"


def acs3_signature(secret: str, string_to_sign: str) -> str:
    """Lower-case hex ``HMAC-SHA256(secret, string_to_sign)`` (no ``&`` on the key)."""
    return hmac.new(_utf8(secret), _utf8(string_to_sign), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Acs3Authorization:
    """The parts of ``Authorization: ACS3-HMAC-SHA256 Credential=…,SignedHeaders=…,
    Signature=…``."""

    algorithm: str
    credential: str
    signed_headers: tuple[str, ...]
    signature: str

    def header(self) -> str:
        return (f"{self.algorithm} Credential={self.credential},"
                f"SignedHeaders={';'.join(self.signed_headers)},Signature={self.signature}")


def parse_authorization(value: str) -> Acs3Authorization:
    """Parse an ACS3 Authorization header; ``IncompleteSignature`` (400) when malformed or
    of another algorithm."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != SCHEME_ACS3:
        raise _incomplete(f"The Authorization algorithm \"{algorithm}\" is not supported; "
                          f"use {SCHEME_ACS3}.")
    parts: dict[str, str] = {}
    for item in rest.split(","):
        name, eq, text = item.strip().partition("=")
        if eq:
            parts[name.strip()] = text.strip()
    credential = parts.get("Credential", "")
    signed = parts.get("SignedHeaders", "")
    signature = parts.get("Signature", "")
    if not credential or not signed or not signature:
        raise _incomplete("The Authorization header needs Credential, SignedHeaders and "
                          "Signature.")
    names = tuple(n.strip().lower() for n in signed.split(";"))
    if any(not n for n in names):
        raise _incomplete("The SignedHeaders list of the Authorization header is malformed.")
    return Acs3Authorization(algorithm, credential, names, signature)


# ------------------------------------------------------------------ keys, nonces, results


@dataclass(frozen=True)
class AccessKeyRecord:
    """What verification needs to know about an AccessKey pair."""

    access_key_id: str
    secret: str = field(repr=False)
    enabled: bool
    account_id: str


@dataclass(frozen=True)
class AuthResult:
    """A request that passed: who signed it, how, its freshness fields, and the action and
    version *as covered by the signature*. Route on these, not on whatever header or
    parameter comes first: the old SDK also sends unsigned ``x-acs-action`` /
    ``x-acs-version`` headers next to its signed ``Action`` / ``Version`` parameters.
    Either is ``""`` when the request does not name it."""

    access_key_id: str
    account_id: str
    scheme: Scheme
    nonce: str
    timestamp: datetime  # naive UTC, like the rest of ecsnap
    action: str = ""
    version: str = ""


class NonceStore(Protocol):
    """Remembers signature nonces per AccessKey until they expire.

    ``remember`` returns False when ``(key_id, nonce)`` was already stored and has not
    expired yet, else stores it until ``expires`` and returns True. Times are naive UTC
    (``ecsnap.domain.model.utcnow`` style); ``now`` lets a store purge expired rows with
    the same clock the verifier used. A store that cannot record the nonce raises (an
    ``EcsError``, ServiceUnavailable for a full disk): the request is then refused, never
    verified without its nonce recorded. The database's store stores a nonce only while
    its key and account are enabled, and raises the key's error when they no longer are
    (the key lookup may be a cache: that is when a disabled key is refused).
    """

    def remember(self, key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        ...


class MemoryNonceStore:
    """An in-process :class:`NonceStore` (tests, embedded use); forgets on restart."""

    def __init__(self) -> None:
        self._expiry: dict[tuple[str, str], datetime] = {}
        self._heap: list[tuple[datetime, str, str]] = []
        self._lock = threading.Lock()

    def remember(self, key_id: str, nonce: str, expires: datetime, now: datetime) -> bool:
        with self._lock:
            while self._heap and self._heap[0][0] < now:
                when, key, old = heapq.heappop(self._heap)
                if self._expiry.get((key, old)) == when:
                    del self._expiry[(key, old)]
            seen = self._expiry.get((key_id, nonce))
            if seen is not None and seen >= now:
                return False
            self._expiry[(key_id, nonce)] = expires
            heapq.heappush(self._heap, (expires, key_id, nonce))
            return True

    def __len__(self) -> int:
        return len(self._expiry)


KeyLookup = Callable[[str], AccessKeyRecord | None]


# ------------------------------------------------------------------ errors


def _incomplete(message: str) -> EcsError:
    return EcsError("IncompleteSignature", message, 400)


def signature_mismatch(string_to_sign: str, reason: str = "") -> EcsError:
    """``SignatureDoesNotMatch`` (400). The message keeps ECS's wording with the server's
    string-to-sign after the colon: the old SDK evaluates ``Message.split(':')[1]`` and
    turns the code into ``InvalidAccessKeySecret`` when it equals its own (SDK-WIRE §4.2).
    Neither scheme's string-to-sign contains a colon."""
    prefix = f"{reason} " if reason else ""
    return EcsError("SignatureDoesNotMatch", f"{prefix}{_MISMATCH}{string_to_sign}", 400)


def _illegal_timestamp(name: str, why: str) -> EcsError:
    return EcsError("IllegalTimestamp", f"The input parameter \"{name}\" {why}", 400)


def _nonce_used() -> EcsError:
    return EcsError("SignatureNonceUsed", "The request signature nonce has been used.", 400)


# ------------------------------------------------------------------ verification


def verify(request: SignedRequest, lookup_secret: KeyLookup, nonce_store: NonceStore,
           now: datetime, window: timedelta = DEFAULT_WINDOW) -> AuthResult:
    """Check the request's signature, freshness and nonce; return who signed it.

    An ``Authorization: ACS3-…`` header selects ACS3-HMAC-SHA256; otherwise a ``Signature``
    or ``AccessKeyId`` parameter selects RPC v1. Checks run in this order: the signature
    fields are present and well-formed, the key exists and is enabled, the timestamp is
    within ``window`` of ``now`` (either direction), the signature matches, and only then
    is the nonce stored (so unsigned requests cannot burn nonces). ``now`` may be naive
    (taken as UTC) or aware.
    """
    now_utc = _as_utc(now)
    authorization = request.headers.get("authorization", "")
    if authorization.lstrip().upper().startswith("ACS3-"):
        return _verify_acs3(request, authorization, lookup_secret, nonce_store, now_utc, window)
    params = request.params()
    if any(k in ("Signature", "AccessKeyId") for k, _ in params):
        return _verify_rpc_v1(request.method, params, lookup_secret, nonce_store, now_utc,
                              window)
    if authorization.strip():
        raise _incomplete("The Authorization header is not an ACS3-HMAC-SHA256 signature.")
    raise missing_parameter("AccessKeyId")


def _verify_rpc_v1(method: str, params: Pairs, lookup: KeyLookup, nonces: NonceStore,
                   now: datetime, window: timedelta) -> AuthResult:
    def one(name: str) -> str:
        values = [v for k, v in params if k == name]
        if len(values) > 1:
            raise _incomplete(f"The parameter \"{name}\" is given more than once.")
        if not values or not values[0]:
            raise missing_parameter(name)
        return values[0]

    key_id = one("AccessKeyId")
    signature = one("Signature")
    if one("SignatureMethod") != SCHEME_RPC_V1:
        raise _incomplete(f"SignatureMethod must be {SCHEME_RPC_V1}.")
    if one("SignatureVersion") != "1.0":
        raise _incomplete("SignatureVersion must be 1.0.")
    nonce = _check_nonce_format("SignatureNonce", one("SignatureNonce"))
    stamp = one("Timestamp")
    key = _usable_key(lookup, key_id)
    when = _fresh(stamp, "Timestamp", now, window)
    string_to_sign = rpc_v1_string_to_sign(method, params)
    if not _same(rpc_v1_signature(key.secret, string_to_sign), signature):
        raise signature_mismatch(string_to_sign)
    _spend_nonce(nonces, key, nonce, when, now, window)
    signed = dict(params)  # duplicates are covered by the signature too; last one wins
    return AuthResult(key.access_key_id, key.account_id, SCHEME_RPC_V1, nonce, _naive(when),
                      signed.get("Action", ""), signed.get("Version", ""))


def _verify_acs3(request: SignedRequest, authorization: str, lookup: KeyLookup,
                 nonces: NonceStore, now: datetime, window: timedelta) -> AuthResult:
    auth = parse_authorization(authorization)
    headers = request.headers
    stamp = headers.get("x-acs-date", "").strip()
    if not stamp:
        raise missing_parameter("x-acs-date")
    nonce = headers.get("x-acs-signature-nonce", "").strip()
    if not nonce:
        raise missing_parameter("x-acs-signature-nonce")
    nonce = _check_nonce_format("x-acs-signature-nonce", nonce)
    claimed_sha = headers.get("x-acs-content-sha256", "").strip()
    if not claimed_sha:
        raise missing_parameter("x-acs-content-sha256")
    must_sign = {"host", "x-acs-date", "x-acs-signature-nonce"}
    must_sign.update(name for name in headers if name.startswith("x-acs-"))
    unsigned = sorted(must_sign - set(auth.signed_headers))
    if unsigned:
        raise _incomplete(f"These headers must be in SignedHeaders: {', '.join(unsigned)}.")
    key = _usable_key(lookup, auth.credential)
    when = _fresh(stamp, "x-acs-date", now, window)
    payload = hashlib.sha256(request.body).hexdigest()
    canonical = acs3_canonical_request(request.method, request.path, request.query, headers,
                                       auth.signed_headers, payload)
    string_to_sign = acs3_string_to_sign(canonical)
    if not _same(payload, claimed_sha.lower()):
        raise signature_mismatch(string_to_sign,
                                 "The x-acs-content-sha256 header is not the SHA-256 of the "
                                 "request body.")
    if not _same(acs3_signature(key.secret, string_to_sign), auth.signature.lower()):
        raise signature_mismatch(string_to_sign)
    _spend_nonce(nonces, key, nonce, when, now, window)
    query = dict(request.query)  # signed too, through the canonical query
    # x-acs-* headers were required to be signed above, so these are covered.
    action = headers.get("x-acs-action", "").strip() or query.get("Action", "")
    version = headers.get("x-acs-version", "").strip() or query.get("Version", "")
    return AuthResult(key.access_key_id, key.account_id, SCHEME_ACS3, nonce, _naive(when),
                      action, version)


def _check_nonce_format(name: str, nonce: str) -> str:
    if len(nonce) > MAX_NONCE_LENGTH:
        raise invalid_parameter(name, f"It must be at most {MAX_NONCE_LENGTH} characters.")
    return nonce


def _usable_key(lookup: KeyLookup, key_id: str) -> AccessKeyRecord:
    key = lookup(key_id)
    if key is None:
        raise errors.access_key_not_found()
    if not key.enabled:
        raise errors.access_key_disabled()
    return key


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


def parse_timestamp(value: str) -> datetime | None:
    """``YYYY-MM-DDThh:mm:ssZ`` as an aware UTC datetime, or None if malformed."""
    if not _TIMESTAMP.fullmatch(value):
        return None
    try:
        return datetime.strptime(value, _TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


def format_timestamp(moment: datetime) -> str:
    """The wire form ``YYYY-MM-DDThh:mm:ssZ`` (naive datetimes are taken as UTC)."""
    return _as_utc(moment).strftime(_TIMESTAMP_FORMAT)


def _fresh(stamp: str, name: str, now: datetime, window: timedelta) -> datetime:
    when = parse_timestamp(stamp)
    if when is None:
        raise _illegal_timestamp(name, "is not a UTC time in the format "
                                       "YYYY-MM-DDThh:mm:ssZ.")
    if abs(when - now) > window:
        raise _illegal_timestamp(name, f"is more than {window.total_seconds() / 60:g} minutes "
                                       "away from the server time.")
    return when


def _same(mine: str, theirs: str) -> bool:
    return hmac.compare_digest(_utf8(mine), _utf8(theirs))


def _spend_nonce(nonces: NonceStore, key: AccessKeyRecord, nonce: str, when: datetime,
                 now: datetime, window: timedelta) -> None:
    # A replay is refused by the window once `when + window` has passed, so the nonce only
    # needs remembering until then.
    if not nonces.remember(key.access_key_id, nonce, _naive(when + window), _naive(now)):
        raise _nonce_used()


# ------------------------------------------------------------------ client side


def new_nonce() -> str:
    """32 lower-case hex characters, like both SDKs send."""
    return secrets.token_hex(16)


def sign_rpc_v1(params: Iterable[tuple[str, str]] | Mapping[str, str], secret: str,
                method: str = "POST") -> str:
    """The RPC v1 ``Signature`` of ``params`` (any ``Signature`` among them is ignored)."""
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    return rpc_v1_signature(secret, rpc_v1_string_to_sign(method, pairs))


def sign_acs3(method: str, path: str, query: Iterable[tuple[str, str]],
              headers: Mapping[str, str], body: bytes, access_key_id: str,
              secret: str) -> str:
    """The ``Authorization`` header value for a request; every given header is signed
    (names lower-cased and sorted, as the SDK does)."""
    lowered = {k.lower(): v for k, v in headers.items() if k.lower() != "authorization"}
    names = tuple(sorted(lowered))
    canonical = acs3_canonical_request(method, path, query, lowered, names,
                                       hashlib.sha256(body).hexdigest())
    signature = acs3_signature(secret, acs3_string_to_sign(canonical))
    return Acs3Authorization(SCHEME_ACS3, access_key_id, names, signature).header()


def rpc_v1_request_params(action: str, params: Iterable[tuple[str, str]] | Mapping[str, str],
                          access_key_id: str, secret: str, *, method: str = "POST",
                          now: datetime | None = None, nonce: str | None = None,
                          version: str = API_VERSION, fmt: str = "JSON") -> Pairs:
    """Every query parameter of a complete RPC v1 request, ``Signature`` last."""
    pairs = list(params.items()) if isinstance(params, Mapping) else list(params)
    pairs += [("Action", action), ("Version", version), ("Format", fmt),
              ("AccessKeyId", access_key_id), ("SignatureMethod", SCHEME_RPC_V1),
              ("SignatureVersion", "1.0"), ("SignatureNonce", nonce or new_nonce()),
              ("Timestamp", format_timestamp(now or datetime.now(UTC)))]
    return [*pairs, ("Signature", sign_rpc_v1(pairs, secret, method))]


def acs3_request_headers(action: str, query: Iterable[tuple[str, str]], host: str,
                         access_key_id: str, secret: str, *, method: str = "POST",
                         path: str = "/", body: bytes = b"", now: datetime | None = None,
                         nonce: str | None = None, version: str = API_VERSION,
                         extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The headers of a complete ACS3 request (``host`` must be sent as given here),
    ``Authorization`` included. ``extra`` headers are signed too."""
    headers = {
        "accept": "application/json",
        "host": host,
        "x-acs-action": action,
        "x-acs-version": version,
        "x-acs-date": format_timestamp(now or datetime.now(UTC)),
        "x-acs-signature-nonce": nonce or new_nonce(),
        "x-acs-content-sha256": hashlib.sha256(body).hexdigest(),
        **{k.lower(): v for k, v in (extra or {}).items()},
    }
    headers["authorization"] = sign_acs3(method, path, list(query), headers, body,
                                         access_key_id, secret)
    return headers
