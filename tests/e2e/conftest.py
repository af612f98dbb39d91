"""End-to-end fixtures: a real `ecsnap serve` with the demo image, real QEMU VMs."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import LiveServer, ecsnap

CACHE = Path(os.environ.get("ECSNAP_TEST_CACHE", Path(__file__).parents[2] / ".cache"))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("e2e") / "data"
    data_dir.mkdir()
    # the Debian packages the demo image is built from are cached between runs
    CACHE.mkdir(parents=True, exist_ok=True)
    (data_dir / "config.json").write_text(json.dumps({"cache": str(CACHE)}))
    live = LiveServer(data_dir)
    ecsnap("init", "--data-dir", str(data_dir), "--endpoint", live.endpoint)
    ecsnap("image", "build-demo", "--data-dir", str(data_dir))
    live.start()
    try:
        yield live
    finally:
        live.stop()
        _stop_vms(data_dir)


def _stop_vms(data_dir: Path) -> None:
    """Kill the VMs the tests left running (only ours: they live under this data dir)."""
    import signal

    for pidfile in (data_dir / "run").glob("*/*.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


@pytest.fixture(scope="session")
def demo_image(server: LiveServer) -> str:
    from ecsnap.entrypoints.cli.client import ApiClient, load_credentials

    api = ApiClient(load_credentials(server.data_dir))
    body = api.call("DescribeImages", {"ImageOwnerAlias": "system"})
    [image] = [i for i in body["Images"]["Image"] if i["ImageName"] == "ecsnap-demo-debian12"]
    return str(image["ImageId"])
