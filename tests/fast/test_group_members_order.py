"""A snapshot group's members are listed system disk first, then by (created, id): the
listing moves the system disk's snapshot to the front of members the database gave in
(created, id) order, which must be what sorting them gives."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from hypothesis import given
from hypothesis import strategies as st

from ecsnap.domain.model import DiskType, SnapshotStatus
from ecsnap.service.snapshots import _system_first, _system_first_of_ordered


class Member(NamedTuple):  # the columns a listing reads (snapshots.MEMBER_COLUMNS)
    id: str
    source_disk_type: DiskType
    created: datetime
    group_id: str | None = "ssg-1"
    source_disk_id: str = "d-1"
    progress: int = 100
    status: SnapshotStatus = SnapshotStatus.ACCOMPLISHED


T0 = datetime(2026, 12, 1)


@given(st.lists(st.tuples(st.integers(0, 3), st.text("ab", min_size=1, max_size=3)),
                max_size=6, unique_by=lambda m: m[1]),
       st.data())
def test_the_system_disk_first_then_creation_order(members: list[tuple[int, str]],
                                                   data: st.DataObject) -> None:
    rows = [Member(f"s-{name}", DiskType.DATA, T0 + timedelta(seconds=sec))
            for sec, name in members]
    if rows:
        system = data.draw(st.integers(-1, len(rows) - 1))  # -1: no system disk
        if system >= 0:
            rows[system] = rows[system]._replace(source_disk_type=DiskType.SYSTEM)
    ordered = sorted(rows, key=lambda m: (m.created, m.id))  # as the database gives them
    assert _system_first_of_ordered(ordered) == _system_first(ordered)
