"""A live `ecsnap serve` on 127.0.0.1 in a child process, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ecsnap(*args: str, env: dict[str, str] | None = None, check: bool = True,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the `ecsnap` command of this checkout."""
    proc = subprocess.run([sys.executable, "-m", "ecsnap", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"ecsnap {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


class LiveServer:
    def __init__(self, data_dir: Path, *, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {**os.environ, "ECSNAP_ACCEL": os.environ.get("ECSNAP_ACCEL", "auto"),
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "serve.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def credentials(self) -> dict[str, str]:
        return dict(json.loads((self.data_dir / "credentials.json").read_text()))

    def start(self, timeout: float = 60) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ecsnap", "serve", "--data-dir",
             str(self.data_dir), "--listen", f"127.0.0.1:{self.port}"],
            stdout=log, stderr=log, cwd=ROOT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ecsnap serve exited:\n{self.log.read_text()[-4000:]}")
            try:
                httpx.get(self.endpoint + "console/login", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"ecsnap serve did not answer:\n{self.log.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
