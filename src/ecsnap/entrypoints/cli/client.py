"""A signed client of the ecsnap (ECS) API, used by the `ecsnap` client commands."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.api.signature import rpc_v1_request_params

VERSION = "2014-05-26"


@dataclass
class Credentials:
    access_key_id: str
    access_key_secret: str
    region_id: str
    endpoint: str


def load_credentials(data_dir: Path | None = None) -> Credentials:
    """From DATA_DIR/credentials.json, else ~/.config/ecsnap/config.json; the environment
    (ECSNAP_ACCESS_KEY_ID, ECSNAP_ACCESS_KEY_SECRET, ECSNAP_REGION, ECSNAP_ENDPOINT) wins."""
    candidates = []
    if data_dir or os.environ.get("ECSNAP_DATA_DIR"):
        candidates.append(Path(data_dir or os.environ["ECSNAP_DATA_DIR"]) / "credentials.json")
    candidates.append(Path.home() / ".config" / "ecsnap" / "config.json")
    values: dict[str, Any] = {}
    for path in candidates:
        if path.is_file():
            values = json.loads(path.read_text())
            break
    env = {"AccessKeyId": "ECSNAP_ACCESS_KEY_ID", "AccessKeySecret": "ECSNAP_ACCESS_KEY_SECRET",
           "RegionId": "ECSNAP_REGION", "Endpoint": "ECSNAP_ENDPOINT"}
    for key, var in env.items():
        if os.environ.get(var):
            values[key] = os.environ[var]
    if not values.get("AccessKeyId") or not values.get("AccessKeySecret"):
        raise EcsError("MissingCredentials", "No credentials: run `ecsnap init`, pass "
                       "--data-dir, or write ~/.config/ecsnap/config.json.", 400)
    return Credentials(values["AccessKeyId"], values["AccessKeySecret"],
                       values.get("RegionId", "local-1"),
                       values.get("Endpoint", "http://127.0.0.1:8080/"))


class ApiClient:
    def __init__(self, creds: Credentials, timeout: float = 60.0) -> None:
        self.creds = creds
        self.http = httpx.Client(timeout=timeout)

    def call(self, action: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        values = {"RegionId": self.creds.region_id}
        for key, value in (params or {}).items():
            if value is not None:
                values[key] = ("true" if value else "false") if isinstance(value, bool) \
                    else str(value)
        query = rpc_v1_request_params(action, values, self.creds.access_key_id,
                                      self.creds.access_key_secret)
        try:
            response = self.http.post(self.creds.endpoint, params=list(query))
        except httpx.HTTPError as exc:
            raise EcsError("ServiceUnavailable",
                           f"Cannot reach {self.creds.endpoint}: {exc}", 503) from exc
        try:
            body = response.json()
        except ValueError as exc:
            raise EcsError("InternalError", f"Not JSON: {response.text[:200]}",
                           response.status_code) from exc
        if response.status_code >= 400:
            raise EcsError(str(body.get("Code", "UnknownError")), str(body.get("Message", "")),
                           response.status_code)
        return dict(body)
