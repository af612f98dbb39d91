"""A hung agent stopped in the middle of a transaction (SIGSTOP between its host row's
`FOR SHARE` and its commit) keeps that row locked; a peer's fence (an UPDATE of the row)
would wait for ever. The agents' database sessions end when idle inside a transaction for
the heartbeat timeout (`idle_in_transaction_session_timeout`), so the fence goes through."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

from ecsnap import bootstrap, config
from tests.cluster.conftest import HOST_TIMEOUT_S, Cluster


def test_a_peer_fences_an_agent_hung_inside_a_transaction(cluster: Cluster) -> None:
    settings = config.load(Path(cluster.data_dir), background_tasks=False)
    hung = bootstrap.build_agent(settings, "hung", vcpus=2, memory_mib=2048)
    hung.register()
    # hung in a transaction that holds its host row (as every agent commit does first)
    uow = hung.ctx.uow()
    uow.__enter__()
    assert uow.hold_epoch("hung", hung.epoch)

    peer = bootstrap.build_agent(settings, "peer", vcpus=2, memory_mib=2048)
    peer.register()
    fenced: list[str] = []
    began = time.monotonic()

    def check() -> None:
        while not fenced and time.monotonic() - began < 30:
            with peer.ctx.uow() as now:
                at = now.clock()
            fenced.extend(peer.check_peers(at))
            time.sleep(0.2)

    worker = threading.Thread(target=check, daemon=True)
    worker.start()
    worker.join(40)
    took = time.monotonic() - began
    host = cluster.host("hung")
    assert fenced == ["hung"] and host is not None and host.state.value == "Fenced", took
    # its heartbeat grew stale after HOST_TIMEOUT_S; its session ended after as long
    assert took < 3 * HOST_TIMEOUT_S + 5, took
    with contextlib.suppress(Exception):  # its session was ended by the server
        uow.__exit__(None, None, None)
