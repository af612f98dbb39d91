"""An agent's /metrics (`ecsnap agent --address`), scraped from a real agent process: the
hosts' heartbeat age and capacity as the database has them at scrape time (a hung peer's
age grows until it is fenced), and the tasks and steps the agent ran."""

from __future__ import annotations

import signal
import socket
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ecsnap.domain.model import TaskStatus
from tests.cluster.conftest import HOST_TIMEOUT_S, Cluster


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_an_agents_metrics_report_heartbeats_capacity_and_its_tasks(cluster: Cluster) -> None:
    inst = cluster.stopped_instance()  # Stopped in KeepCharging: it holds its claim
    port = _port()
    url = f"http://127.0.0.1:{port}/metrics"
    h1 = cluster.agent("h1", args=("--address", f"127.0.0.1:{port}"))
    h2 = cluster.agent("h2")
    with cluster.ctx.uow() as uow:  # its claim is on h1 (the agents' capacity: 8, 8192)
        uow.instances.load(inst.id).host_id = "h1"
        uow.commit()

    cluster.until(lambda: _value(_scrape(url), "ecsnap_host_up", host="h2") == 1.0, 30,
                  "h1's /metrics answering, with both hosts")
    samples = _scrape(url)
    for host in ("h1", "h2"):
        age = _value(samples, "ecsnap_host_heartbeat_age_seconds", host=host)
        assert age is not None and 0 <= age < HOST_TIMEOUT_S, (host, age)
        assert _value(samples, "ecsnap_host_epoch", host=host) == 1.0
    used = {"vcpus": inst.vcpus, "memory_mib": inst.memory_mib}
    total = {"vcpus": 8, "memory_mib": 8192}
    for what in ("vcpus", "memory_mib"):
        assert _value(samples, f"ecsnap_host_{what}", host="h1", kind="used") == used[what]
        assert _value(samples, f"ecsnap_host_{what}", host="h1", kind="free") == \
            total[what] - used[what]
        assert _value(samples, f"ecsnap_host_{what}", host="h2", kind="used") == 0
        assert _value(samples, f"ecsnap_host_{what}", host="h2", kind="free") == total[what]

    # a task the agent ran: a snapshot of the stopped instance, routed to its host h1
    api = cluster.client(cluster.api())
    api.call("CreateSnapshotGroup", {"InstanceId": inst.id})
    [task] = cluster.tasks(resource_id=inst.id, action="TakeSnapshots") or \
        [t for t in cluster.tasks(action="TakeSnapshots")]
    assert cluster.ended(task.id).status == TaskStatus.FINISHED
    assert cluster.task(task.id).owner == "h1"
    samples = _scrape(url)
    assert _value(samples, "ecsnap_tasks_total", action=task.action,
                  outcome="Finished") == 1.0
    assert any(name == "ecsnap_task_step_duration_seconds_count" and
               dict(labels).get("action") == task.action for name, labels in samples)

    # a hung peer: its heartbeat age grows at every scrape, until it is fenced
    h2.signal(signal.SIGSTOP)
    try:
        cluster.until(lambda: (_value(_scrape(url), "ecsnap_host_heartbeat_age_seconds",
                                      host="h2") or 0) > 1.5, 30, "h2's age growing")
        cluster.until(lambda: _value(_scrape(url), "ecsnap_host_up", host="h2") == 0.0, 30,
                      "h2 fenced, as /metrics reports it")
        samples = _scrape(url)
        assert _value(samples, "ecsnap_host_epoch", host="h2") == 2.0
        age = _value(samples, "ecsnap_host_heartbeat_age_seconds", host="h1")
        assert age is not None and age < HOST_TIMEOUT_S
    finally:
        h2.signal(signal.SIGCONT)
    assert h1.proc.poll() is None
