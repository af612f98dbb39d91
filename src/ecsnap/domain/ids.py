"""ECS-style resource identifiers: a prefix and 20 lowercase alphanumerics."""

from __future__ import annotations

import secrets
import string
import uuid

_ALPHABET = string.ascii_lowercase + string.digits

PREFIXES = {
    "instance": "i",
    "disk": "d",
    "snapshot": "s",
    "snapshot_group": "ssg",
    "auto_snapshot_policy": "sp",
    "image": "m",
    "task": "t",
    "command": "c",
    "account": "acc",
    "access_key": "LTAI",
}


def new_id(kind: str, length: int = 20) -> str:
    prefix = PREFIXES[kind]
    body = "".join(secrets.choice(_ALPHABET) for _ in range(length))
    return f"{prefix}{body}" if kind == "access_key" else f"{prefix}-{body}"


def new_request_id() -> str:
    return str(uuid.uuid4()).upper()
