"""A fenced host's Ceph clients are blocklisted (ClientFencing on the RBD backend), on the
single-node Ceph of the RBD tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ecsnap.adapters.storage.base import ClientFencing
from ecsnap.adapters.storage.rbd import RbdBackend
from tests.ceph import CephCluster, shared


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with shared(tmp_path_factory) as cluster:
        yield cluster


def test_blocklist_shuts_the_addresses_out(ceph: CephCluster) -> None:
    backend = RbdBackend.from_spec(ceph.spec())
    assert isinstance(backend, ClientFencing)
    try:
        backend.blocklist(["192.0.2.7:0/1234", "192.0.2.8:0/5678"])
        backend.blocklist(["192.0.2.7:0/1234"])  # idempotent
        listed = ceph.mon_command({"prefix": "osd blocklist ls", "format": "json"})
        assert "192.0.2.7:0/1234" in listed and "192.0.2.8:0/5678" in listed
    finally:
        for addr in ("192.0.2.7:0/1234", "192.0.2.8:0/5678"):
            ceph.mon_command({"prefix": "osd blocklist", "blocklistop": "rm", "addr": addr})
        backend.close()
