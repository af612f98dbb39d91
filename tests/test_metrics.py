"""/metrics: the API's and an agent's scrape, through prometheus-client's own parser.

Real app, real database (SQLite), real qcow2 files; the compute test double runs the VMs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from ecsnap import bootstrap, config, metrics
from ecsnap.adapters.compute.base import ComputeError, VmSpec
from ecsnap.adapters.compute.qemu.live_snapshot import LiveSnapshotTiming
from ecsnap.domain.model import Image
from ecsnap.entrypoints.api.app import create_app
from ecsnap.entrypoints.api.signature import rpc_v1_request_params
from ecsnap.service import setup
from ecsnap.service.context import ServiceContext
from tests.conftest import REGION


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels (parsed by prometheus-client)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def client(ctx: ServiceContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as c:
        yield c


def test_api_requests_tasks_steps_and_host_capacity(ctx: ServiceContext, client: TestClient,
                                                    image: Image) -> None:
    key = setup.initialise(ctx, REGION).access_key

    def call(action: str, **params: str) -> int:
        query = rpc_v1_request_params(action, {"RegionId": REGION, **params}, key.id,
                                      key.secret)
        return client.post("/", params=query).status_code

    before = scrape(client.get("/metrics").text)
    assert call("DescribeInstances") == 200
    assert call("DescribeInstances", InstanceIds='["i-nothere"]') == 200
    assert call("NoSuchAction") == 404
    assert call("StopInstance", InstanceId="i-nothere") == 404
    assert call("RunInstances", ImageId=image.id, InstanceType="ecs.t5-lc2m1.nano") == 200
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = scrape(response.text)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("ecsnap_api_requests_total", action="DescribeInstances", code="OK") == 2
    assert grew("ecsnap_api_request_duration_seconds_count", action="DescribeInstances") == 2
    # a name no action has is counted as "other": no client can add series
    assert grew("ecsnap_api_requests_total", action="other",
                code="InvalidAction.NotFound") == 1
    assert not any("NoSuchAction" in str(labels) for _, labels in after)
    assert grew("ecsnap_api_requests_total", action="StopInstance",
                code="InvalidInstanceId.NotFound") == 1
    assert grew("ecsnap_tasks_total", action="RunInstance", outcome="Finished") == 1
    # steps by kind, not by name (create_disk:d-...): bounded labels
    assert grew("ecsnap_task_step_duration_seconds_count", action="RunInstance",
                step="create_disk") == 1
    assert grew("ecsnap_task_step_duration_seconds_count", action="RunInstance",
                step="boot") == 1
    # the single-host server's implicit host: the region's 8 vCPUs, 1 held by the new
    # instance (ecs.t5-lc2m1.nano: 1 vCPU, 512 MiB), read from the database at the scrape
    assert value(after, "ecsnap_host_vcpus", host="local", kind="used") == 1
    assert value(after, "ecsnap_host_vcpus", host="local", kind="free") == 7
    assert value(after, "ecsnap_host_memory_mib", host="local", kind="free") == 8192 - 512
    assert value(after, "ecsnap_host_up", host="local") == 1
    assert ("ecsnap_host_heartbeat_age_seconds", (("host", "local"),)) not in after


def test_a_failing_task_is_counted_failed(ctx: ServiceContext, client: TestClient,
                                          image: Image, monkeypatch: pytest.MonkeyPatch,
                                          ) -> None:
    key = setup.initialise(ctx, REGION).access_key
    before = value(scrape(client.get("/metrics").text), "ecsnap_tasks_total",
                   action="RunInstance", outcome="Failed")
    def refuse(spec: VmSpec) -> None:
        raise ComputeError("injected: the VM does not start")

    monkeypatch.setattr(ctx.compute, "start", refuse)
    query = rpc_v1_request_params("RunInstances", {"RegionId": REGION, "ImageId": image.id,
                                                   "InstanceType": "ecs.t5-lc2m1.nano"},
                                  key.id, key.secret)
    client.post("/", params=query)
    after = value(scrape(client.get("/metrics").text), "ecsnap_tasks_total",
                  action="RunInstance", outcome="Failed")
    assert after - before == 1


def test_freeze_windows_from_the_drivers_observer(tmp_path: Path) -> None:
    settings = config.load(tmp_path / "data", background_tasks=False)
    ctx = bootstrap.build(settings, background=False)  # the real QEMU driver (not started)
    observer = ctx.compute._snapshots.observer  # type: ignore[attr-defined]
    assert observer is metrics.live_snapshot
    name = "ecsnap_live_snapshot_freeze_seconds"
    count = metrics.REGISTRY.get_sample_value(f"{name}_count", {"method": "fsfreeze"}) or 0
    observer(LiveSnapshotTiming("i-x", 2, "fsfreeze", 12.5, ()))
    assert metrics.REGISTRY.get_sample_value(f"{name}_count", {"method": "fsfreeze"}) == \
        count + 1
    assert (metrics.REGISTRY.get_sample_value(f"{name}_bucket",
                                              {"method": "fsfreeze", "le": "0.025"}) or 0) >= 1


def test_a_scrape_with_a_failing_host_source() -> None:
    def broken() -> list[metrics.HostSample]:
        raise RuntimeError("database down")

    metrics.watch_hosts("test-broken", broken)
    metrics.watch_hosts("test-agent", lambda: [metrics.HostSample(
        "h-test", "Fenced", 3, 42.0, 16, 4, 32768, 1024)])
    try:  # (an agent's /metrics over HTTP: tests/cluster/test_agent_metrics.py)
        samples = scrape(metrics.exposition()[0].decode())
    finally:
        metrics.HOSTS.forget("test-broken")
        metrics.HOSTS.forget("test-agent")
    assert value(samples, "ecsnap_host_heartbeat_age_seconds", host="h-test") == 42
    assert value(samples, "ecsnap_host_up", host="h-test") == 0
    assert value(samples, "ecsnap_host_epoch", host="h-test") == 3
    assert value(samples, "ecsnap_host_vcpus", host="h-test", kind="free") == 12
    assert value(samples, "ecsnap_host_memory_mib", host="h-test", kind="used") == 1024
