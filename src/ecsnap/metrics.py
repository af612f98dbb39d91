"""ecsnap's Prometheus metrics: every metric is defined here, through the official
`prometheus-client`, and read at `/metrics` (the API app, and an agent's `--address`
listener: `entrypoints/agent_http.py`).

A leaf module (contract `metrics` in pyproject.toml): it imports nothing of ecsnap, so the
service layer records into it as it reads `ecsnap.config`, and no import cycle can come of
it. The hot path only increments counters and observes histograms (a lock and a few
additions each); what must be read from the database (hosts: heartbeat age, capacity) is
read at scrape time by `HostCollector`, from a source an entry point registers with
`watch_hosts`, never while a request is served.

Labels are bounded: an API action is labelled by its name only when it is an action of the
API (else "other"), a task step by its kind (`create_disk`, not `create_disk:d-…`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("ecsnap.metrics")

# API answers are ms to seconds (Describe*: a few ms; actions that wait for a short task:
# up to 2 s); tasks and their steps run from ms to minutes; a freeze window is ms.
_REQUEST_BUCKETS = (.001, .0025, .005, .01, .02, .05, .1, .25, .5, 1, 2.5, 5, 10)
_STEP_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_FREEZE_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5)

API_REQUESTS = Counter("ecsnap_api_requests", "API requests answered, by action and the "
                       "answer's code (OK or the ECS error code)", ["action", "code"])
API_LATENCY = Histogram("ecsnap_api_request_duration_seconds", "Time to answer an API "
                        "request, from its arrival to its rendered answer, by action",
                        ["action"], buckets=_REQUEST_BUCKETS)
TASKS = Counter("ecsnap_tasks", "Tasks ended, by action and outcome (Finished or Failed)",
                ["action", "outcome"])
STEP_DURATION = Histogram("ecsnap_task_step_duration_seconds", "Time one task step took "
                          "to run, by action and step kind", ["action", "step"],
                          buckets=_STEP_BUCKETS)
FREEZE_WINDOW = Histogram("ecsnap_live_snapshot_freeze_seconds", "Live snapshots: how long "
                          "the guest was frozen (fsfreeze) or paused (pause)", ["method"],
                          buckets=_FREEZE_BUCKETS)

_known_actions: frozenset[str] = frozenset()


def know_actions(actions: Iterable[str]) -> None:
    """The API's action names: the only values the `action` label of a request takes
    (anything else a client sends counts as "other", so no client can grow the series)."""
    global _known_actions
    _known_actions = frozenset(actions)


def api_request(action: str, code: str, seconds: float) -> None:
    """One API request answered (called once per request, on the hot path)."""
    label = action if action in _known_actions else "other"
    API_REQUESTS.labels(label, code).inc()
    API_LATENCY.labels(label).observe(seconds)


def task_step(action: str, step: str, seconds: float) -> None:
    STEP_DURATION.labels(action, step.partition(":")[0]).observe(seconds)


def task_ended(action: str, outcome: str) -> None:
    TASKS.labels(action, outcome).inc()


def live_snapshot(timing: object) -> None:
    """The compute driver's `snapshot_observer`: one live snapshot's freeze window
    (a LiveSnapshotTiming: `method`, `window_ms`; typed loosely, this module imports no
    adapter)."""
    FREEZE_WINDOW.labels(str(getattr(timing, "method", "unknown"))).observe(
        float(getattr(timing, "window_ms", 0.0)) / 1000)


# ---------------------------------------------------------------- hosts, at scrape time

@dataclass(frozen=True)
class HostSample:
    """One host as a scrape reports it (the service's host view, flattened)."""

    host_id: str
    state: str  # Up | Fenced
    epoch: int
    heartbeat_age_s: float | None  # None: no agent heartbeats (the single-host server)
    vcpus: int
    vcpus_used: int
    memory_mib: int
    memory_mib_used: int


class HostCollector(Collector):
    """Hosts' heartbeat age and capacity, read from the database at every scrape through
    the sources registered with `watch_hosts` (one per ServiceContext; a failing source
    is logged and skipped: a scrape never fails for it)."""

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], Iterable[HostSample]]] = {}
        self._lock = threading.Lock()

    def watch(self, name: str, source: Callable[[], Iterable[HostSample]]) -> None:
        with self._lock:
            self._sources[name] = source

    def forget(self, name: str) -> None:
        with self._lock:
            self._sources.pop(name, None)

    def describe(self) -> Iterable[Metric]:
        return []  # no scrape at registration time

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            sources = list(self._sources.values())
        samples: dict[str, HostSample] = {}
        for source in sources:
            try:
                samples.update((s.host_id, s) for s in source())
            except Exception:
                log.exception("metrics: the hosts could not be read")
        up = GaugeMetricFamily("ecsnap_host_up", "1 while a host is Up, 0 once fenced",
                               labels=["host"])
        epoch = GaugeMetricFamily("ecsnap_host_epoch", "A host's current epoch (bumped at "
                                  "each fence)", labels=["host"])
        age = GaugeMetricFamily("ecsnap_host_heartbeat_age_seconds", "Seconds since the "
                                "host's agent last heartbeated", labels=["host"])
        vcpus = GaugeMetricFamily("ecsnap_host_vcpus", "A host's vCPUs, used (claimed by "
                                  "its instances) and free", labels=["host", "kind"])
        memory = GaugeMetricFamily("ecsnap_host_memory_mib", "A host's memory in MiB, used "
                                   "(claimed by its instances) and free",
                                   labels=["host", "kind"])
        for s in samples.values():
            up.add_metric([s.host_id], 1.0 if s.state == "Up" else 0.0)
            epoch.add_metric([s.host_id], s.epoch)
            if s.heartbeat_age_s is not None:
                age.add_metric([s.host_id], s.heartbeat_age_s)
            vcpus.add_metric([s.host_id, "used"], s.vcpus_used)
            vcpus.add_metric([s.host_id, "free"], max(0, s.vcpus - s.vcpus_used))
            memory.add_metric([s.host_id, "used"], s.memory_mib_used)
            memory.add_metric([s.host_id, "free"], max(0, s.memory_mib - s.memory_mib_used))
        yield from (up, epoch, age, vcpus, memory)


HOSTS = HostCollector()
REGISTRY.register(HOSTS)


def watch_hosts(name: str, source: Callable[[], Iterable[HostSample]]) -> None:
    """Report the hosts `source` returns at every scrape (replacing an earlier source of
    the same name)."""
    HOSTS.watch(name, source)


def exposition() -> tuple[bytes, str]:
    """The body and content type of a scrape of this process's metrics."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def now() -> float:
    """The clock the timings use (monotonic)."""
    return time.monotonic()


__all__ = ["API_LATENCY", "API_REQUESTS", "FREEZE_WINDOW", "HOSTS", "STEP_DURATION", "TASKS",
           "HostCollector", "HostSample", "api_request", "exposition", "know_actions",
           "live_snapshot", "task_ended", "task_step", "watch_hosts"]
