"""Render ECS responses and errors as JSON (the default) or XML (``Format=XML``).

Shapes (ECS-API.md §1, SDK-WIRE.md §4-5):

* success, JSON: one flat object, ``RequestId`` first, then the action's fields;
  XML: ``<{Action}Response>`` holding ``<RequestId>`` and the fields;
* lists arrive already wrapped by the action (``{"Disks": {"Disk": [...]}}``); in XML a
  list is the same element repeated (``<Disks><Disk>…</Disk><Disk>…</Disk></Disks>``);
* booleans are ``true`` / ``false`` in both;
* errors: ``{RequestId, HostId, Code, Message, Recommend}`` or ``<Error>…</Error>`` with the
  error's HTTP status. The new SDK parses an XML error only with the exact content type
  ``text/xml;charset=utf-8``; JSON goes out as ``application/json;charset=utf-8``.

JSON is the answer to anything but ``Format=XML`` (any letter case): the new SDK sends no
``Format`` and cannot read XML, the old SDK sends ``JSON`` or even ``None``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any, Final, NamedTuple
from xml.sax.saxutils import escape

import orjson

from ecsnap.domain.errors import EcsError

JSON_CONTENT_TYPE: Final = "application/json;charset=utf-8"
XML_CONTENT_TYPE: Final = "text/xml;charset=utf-8"
DEFAULT_HOST_ID: Final = "ecs.aliyuncs.com"
RECOMMEND_URL: Final = "https://api.aliyun.com/troubleshoot?q={code}"

_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_XML_BAD_CHARS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class Rendered(NamedTuple):
    """An HTTP answer: ``status, content_type, body = render(...)``."""

    status: int
    content_type: str
    body: bytes


def new_request_id() -> str:
    """An upper-case UUID, the shape of ECS request IDs."""
    return str(uuid.uuid4()).upper()


def wants_xml(fmt: str | None) -> bool:
    """True only for ``Format=XML`` (any case); everything else, even garbage, is JSON."""
    return (fmt or "").strip().upper() == "XML"


def render(action: str, data: Mapping[str, Any], request_id: str, fmt: str | None = None,
           status: int = 200) -> Rendered:
    """A success response for ``action`` with the action's ``data`` (RequestId is added
    here; a ``RequestId`` inside ``data`` is replaced)."""
    body = {"RequestId": request_id, **{k: v for k, v in data.items() if k != "RequestId"}}
    if wants_xml(fmt):
        return Rendered(status, XML_CONTENT_TYPE, _xml_document(f"{action}Response", body))
    return Rendered(status, JSON_CONTENT_TYPE, _json(body))


def error_body(error: EcsError, request_id: str, host_id: str = DEFAULT_HOST_ID,
               recommend: str | None = None) -> dict[str, str]:
    """The fields of the ECS error envelope."""
    return {"RequestId": request_id, "HostId": host_id, "Code": error.code,
            "Message": error.message,
            "Recommend": RECOMMEND_URL.format(code=error.code) if recommend is None
            else recommend}


def render_error(error: EcsError, request_id: str, fmt: str | None = None,
                 host_id: str = DEFAULT_HOST_ID, recommend: str | None = None) -> Rendered:
    """The error envelope with the error's HTTP status."""
    body = error_body(error, request_id, host_id, recommend)
    if wants_xml(fmt):
        return Rendered(error.http_status, XML_CONTENT_TYPE, _xml_document("Error", body))
    return Rendered(error.http_status, JSON_CONTENT_TYPE, _json(body))


def unwrapped_lists(data: Any, path: str = "") -> list[str]:
    """Paths of lists that are not wrapped ECS-style (the only key of their own object,
    below the top level). The new SDK silently drops a body with an unwrapped list
    (SDK-WIRE §4.1), so action tests should assert this is empty."""
    found: list[str] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, list) and (not path or len(data) != 1):
                found.append(where)
            found.extend(unwrapped_lists(value, where))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found.extend(unwrapped_lists(item, f"{path}[{i}]"))
    return found


# ------------------------------------------------------------------ JSON


def _json_default(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        moment = value if value.tzinfo is None else value.astimezone(UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    raise TypeError(f"cannot render {type(value).__name__} in an ECS response")


# orjson writes the same compact UTF-8 JSON as the standard library, ~10x faster (a page of
# 100 instances, 100 KB: 1 ms -> 0.1 ms here), but for tiny floats (1e-05 is 0.00001, the
# same number); datetimes and dataclasses go through _json_default as before. Whatever
# orjson refuses (a lone surrogate, an integer beyond 64 bits, a non-string key, a type
# _json_default rejects) takes the standard library's path, which also raises the same
# errors for what cannot be rendered at all.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def _json(body: Mapping[str, Any]) -> bytes:
    try:
        return orjson.dumps(body, default=_json_default, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        pass
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: escape everything instead
        return json.dumps(body, separators=(",", ":"), default=_json_default).encode("ascii")


# ------------------------------------------------------------------ XML


def _xml_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum | datetime | date):
        return _xml_text(_json_default(value))
    if not isinstance(value, str | int | float):
        raise TypeError(f"cannot render {type(value).__name__} in an ECS response")
    text = _XML_BAD_CHARS.sub("\ufffd", str(value))
    return escape(text)


def _xml_element(name: str, value: Any, out: list[str]) -> None:
    if isinstance(value, list | tuple):
        for item in value:
            _xml_element(name, item, out)
        return
    if not _XML_NAME.fullmatch(name) or name.lower().startswith("xml"):
        raise ValueError(f"{name!r} is not a usable XML element name")
    if isinstance(value, Mapping):
        out.append(f"<{name}>")
        for key, item in value.items():
            _xml_element(str(key), item, out)
        out.append(f"</{name}>")
        return
    text = _xml_text(value)
    out.append(f"<{name}>{text}</{name}>" if text else f"<{name}/>")


def _xml_document(root: str, body: Mapping[str, Any]) -> bytes:
    out = ['<?xml version="1.0" encoding="UTF-8"?>']
    _xml_element(root, body, out)
    return "".join(out).encode("utf-8")
