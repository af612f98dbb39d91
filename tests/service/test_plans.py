"""Plans are journaled with a version: what this release writes it reads back exactly, what
release 0.1 wrote (unversioned, step names in `steps`) it still reads, and a journal from a
newer release is refused rather than misread."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ecsnap.service.disks import AttachDiskPlan, ReInitDiskPlan
from ecsnap.service.instances import DeleteInstancePlan, RunInstancePlan
from ecsnap.service.operation import Plan
from ecsnap.service.registry import OPERATIONS
from ecsnap.service.rollback import ResetDisksPlan
from ecsnap.service.snapshots import DeleteSnapshotsPlan, TakeSnapshotsPlan


def sample(plan_type: type[Plan]) -> Plan:
    """A plan of the type with a value in every field (tuples of pairs where it takes them)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(plan_type):
        hint = str(f.type)
        if "bool" in hint:
            values[f.name] = True
        elif "int" in hint:
            values[f.name] = 7
        elif "tuple[Pair" in hint or "tuple[tuple" in hint:
            values[f.name] = (("d-1", "s-1"), ("d-2", "s-2"))
        elif "tuple[str" in hint:
            values[f.name] = ("d-1", "d-2")
        else:
            values[f.name] = f"{f.name}-value"
    return plan_type(**values)


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.action)
def test_every_plan_reads_back_what_it_wrote(op: Any) -> None:
    plan = sample(op.plan_type)
    journal = plan.to_journal()
    assert journal["version"] == op.plan_type.VERSION
    assert op.plan_type.from_journal(journal) == plan


def test_a_journal_of_a_newer_release_is_refused() -> None:
    journal = {**sample(ResetDisksPlan).to_journal(), "version": ResetDisksPlan.VERSION + 1}
    with pytest.raises(ValueError, match="newer than this release"):
        ResetDisksPlan.from_journal(journal)


# What release 0.1 journaled, field by field as its handlers wrote them.
V0_RESET = {"steps": ["safety", "revert", "start", "health_gate"],
            "locks": [["instance", "i-1"], ["disk", "d-1"]], "instance_id": "i-1",
            "group_id": "ssg-safe", "items": [["d-1", "s-safe"]], "quiesce": True,
            "pairs": [["d-1", "s-old"]], "safety_group_id": "ssg-safe", "keep_safety": True,
            "auto_start": True, "stopped_mode": "KeepCharging"}


def test_release_0_1_journals_are_read() -> None:
    assert ResetDisksPlan.from_journal(V0_RESET, "i-1") == ResetDisksPlan(
        "i-1", (("d-1", "s-old"),), (("d-1", "s-safe"),), "ssg-safe", True, True)
    assert TakeSnapshotsPlan.from_journal(
        {"steps": ["transaction"], "locks": [], "instance_id": "i-1", "group_id": "ssg-1",
         "items": [["d-1", "s-1"]], "quiesce": False}, "ssg-1") == \
        TakeSnapshotsPlan("i-1", "ssg-1", (("d-1", "s-1"),), False, True)
    assert RunInstancePlan.from_journal(
        {"steps": ["create_disk:d-1", "create_disk:d-2", "boot"], "locks": [],
         "start": True, "template": "/t.qcow2"}, "i-1") == \
        RunInstancePlan("i-1", ("d-1", "d-2"), True, "/t.qcow2")
    assert DeleteInstancePlan.from_journal(
        {"steps": ["poweroff", "release_disk:d-2"],
         "locks": [["instance", "i-1"], ["disk", "d-1"], ["disk", "d-2"]]}, "i-1") == \
        DeleteInstancePlan("i-1", ("d-1", "d-2"), ("d-2",))
    assert DeleteSnapshotsPlan.from_journal(
        {"steps": ["delete:s-1"], "locks": [["disk", "d-1"]], "group_id": None,
         "items": [["d-1", "s-1"]]}, "s-1") == \
        DeleteSnapshotsPlan(None, (("d-1", "s-1"),), ("d-1",))
    assert AttachDiskPlan.from_journal(
        {"steps": ["hotplug"], "locks": [], "instance_id": "i-1", "device": "/dev/xvdb",
         "delete_with_instance": False}, "d-1") == \
        AttachDiskPlan("d-1", "i-1", "/dev/xvdb", False, True)
    assert ReInitDiskPlan.from_journal(
        {"steps": ["reinit"], "locks": [], "instance_id": "i-1"}, "d-1") == \
        ReInitDiskPlan("d-1", "i-1", False)
