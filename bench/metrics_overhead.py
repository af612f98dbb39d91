"""The cost of /metrics on the API's hot path: one DescribeInstances request (signed, through
the whole app in-process, SQLite, 50 instances in the region) with the metrics recorded and
with the recording replaced by a no-op, interleaved in rounds, side by side in one run.
Reports the SQL statements per request (metrics add none: nothing is read from the database
while a request is served) and the process CPU time per request (median over rounds).

Usage: python -m bench.metrics_overhead [--requests 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from starlette.testclient import TestClient

from ecsnap import bootstrap, config, metrics
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain.model import Instance, InstanceStatus, StoppedMode
from ecsnap.entrypoints.api.app import create_app
from ecsnap.entrypoints.api.signature import rpc_v1_request_params
from ecsnap.service import regions, setup

REGION = "bench-1"


def measure(requests: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ecsnap-mb-") as tmp:
        settings = config.load(Path(tmp) / "data", background_tasks=False)
        ctx = bootstrap.build(settings, background=False)
        regions.ensure_region(ctx, REGION, vcpus=512, memory_mib=1 << 20)
        key = setup.initialise(ctx, REGION).access_key
        with ctx.uow() as uow:
            add_instances(uow, key_account(ctx, key.id), 50)
            uow.commit()
        statements = 0

        def count(*_: object) -> None:
            nonlocal statements
            statements += 1

        event.listen(ctx.extras["engine"], "before_cursor_execute", count)
        recorded = metrics.api_request
        cpu: dict[str, list[float]] = {"with": [], "without": []}
        sql: dict[str, int] = {}
        with TestClient(create_app(ctx), base_url="http://127.0.0.1") as client:
            def one() -> None:
                query = rpc_v1_request_params("DescribeInstances", {"RegionId": REGION},
                                              key.id, key.secret)
                assert client.post("/", params=query).status_code == 200

            for _ in range(50):  # warm-up: caches, compiled statements
                one()
            for _ in range(rounds):
                for mode in ("with", "without"):
                    metrics.api_request = recorded if mode == "with" else _nothing
                    statements = 0
                    began = time.process_time()
                    for _ in range(requests):
                        one()
                    cpu[mode].append((time.process_time() - began) / requests * 1e6)
                    sql[mode] = statements // requests
            metrics.api_request = recorded
        ctx.extras["engine"].dispose()
    med = {mode: statistics.median(v) for mode, v in cpu.items()}
    return {"cpu_us": med, "spread_us": {m: (min(v), max(v)) for m, v in cpu.items()},
            "statements": sql, "ratio": med["with"] / med["without"],
            "observe_us": micro_observe()}


def micro_observe(n: int = 200_000) -> float:
    """CPU time of one `metrics.api_request` call alone (counter + histogram), in µs."""
    metrics.know_actions(["DescribeInstances"])
    began = time.process_time()
    for _ in range(n):
        metrics.api_request("DescribeInstances", "OK", 0.004)
    return (time.process_time() - began) / n * 1e6


def _nothing(action: str, code: str, seconds: float) -> None:
    return None


def key_account(ctx: Any, key_id: str) -> str:
    from ecsnap.service import accounts

    found = accounts.find_access_key(ctx, key_id)
    assert found is not None
    return str(found.account_id)


def add_instances(uow: UnitOfWork, account_id: str, n: int) -> None:
    for k in range(n):
        uow.instances.add(Instance(
            id=f"i-bench{k:04d}", account_id=account_id, region_id=REGION,
            zone_id=f"{REGION}-a", instance_type="ecs.t5-lc2m1.nano", vcpus=1,
            memory_mib=512, image_id="m-none", status=InstanceStatus.STOPPED,
            stopped_mode=StoppedMode.KEEP_CHARGING, host_id="local"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    r = measure(args.requests, args.rounds)
    print(f"DescribeInstances (50 instances, SQLite, in-process), {args.rounds} rounds of "
          f"{args.requests} requests, interleaved:")
    for mode in ("without", "with"):
        lo, hi = r["spread_us"][mode]
        print(f"  {mode:7} metrics: {r['cpu_us'][mode]:7.0f} µs CPU/request "
              f"(rounds {lo:.0f}-{hi:.0f}), {r['statements'][mode]} SQL statements/request")
    print(f"  ratio with/without: {r['ratio']:.3f}; one api_request() alone: "
          f"{r['observe_us']:.2f} µs")


if __name__ == "__main__":
    main()
