"""Tenancy for every action of the API's own table (`entrypoints/api/actions.py` ACTIONS).

Account B calls each action with account A's IDs (instances, disks, snapshots, snapshot
groups, A's private image, tasks, invocations, as the action takes them). B gets the
resource's NotFound code, an empty list (Describe*), or ECS's "an unknown ID is ignored"
success (DeleteSnapshot, DeleteDisk); no answer names an ID of A that B did not send; and
nothing of A changes: every row of A (instances, disks, snapshots, snapshot groups, tasks,
invocations, images), the internal snapshots in A's disk files, and A's running VMs are
compared before and after each call.

Every action needs a case here: a new action in ACTIONS without one fails
`test_every_action_has_a_tenancy_case`. In-process (starlette's TestClient on create_app,
the compute double, real qcow2 files): no VM.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from ecsnap import bootstrap, config
from ecsnap.adapters.store.base import Repository
from ecsnap.entrypoints.api.actions import ACTIONS
from ecsnap.entrypoints.api.app import create_app
from ecsnap.service import accounts, images, regions, setup
from ecsnap.service.context import ServiceContext
from tests import qcow
from tests.api.test_app import Caller, caller
from tests.conftest import REGION
from tests.doubles import FileBackedCompute

NANO = "ecs.t5-lc2m1.nano"


@dataclass
class World:
    ctx: ServiceContext
    compute: FileBackedCompute
    a: Caller
    b: Caller
    a_account: str
    b_account: str
    ids: dict[str, str]  # A's IDs by role, and B's own ("b_..."), see `world`
    a_ids: set[str] = field(default_factory=set)  # every ID A owns


def _ok(call: Caller, action: str, **params: Any) -> dict[str, Any]:
    status, body = call(action, **params)
    assert status == 200, (action, body)
    return body


def _run(call: Caller, image_id: str, *, start: bool, data_disks: int) -> str:
    extra = {f"DataDisk__{n}__Size": 20 for n in range(1, data_disks + 1)}
    if start:
        body = _ok(call, "RunInstances", ImageId=image_id, InstanceType=NANO, **extra)
        return str(body["InstanceIdSets"]["InstanceIdSet"][0])
    return str(_ok(call, "CreateInstance", ImageId=image_id, InstanceType=NANO,
                   **extra)["InstanceId"])


def _disks(call: Caller, instance_id: str) -> list[str]:
    """The instance's disks, system disk first."""
    disks = _ok(call, "DescribeDisks", InstanceId=instance_id)["Disks"]["Disk"]
    return [d["DiskId"] for d in sorted(disks, key=lambda d: d["Device"])]


def _group_snaps(call: Caller, group_id: str) -> dict[str, str]:
    [group] = _ok(call, "DescribeSnapshotGroups",
                  SnapshotGroupId__1=group_id)["SnapshotGroups"]["SnapshotGroup"]
    assert group["Status"] == "accomplished", group
    return {s["SourceDiskId"]: s["SnapshotId"] for s in group["Snapshots"]["Snapshot"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, template: Path) -> Iterator[World]:
    """A's resources: a Running instance `run` (system disk, two data disks, a snapshot
    group, a snapshot of its first data disk, a command run in it) and a Stopped instance
    `stop` (the same disks and a group: the target of the actions that need a stopped
    instance, so that a missing account check would really act), an Available disk
    `spare`, a private image, the tasks of all that. B's own: a Stopped instance, an
    Available disk and a snapshot, to pair with A's IDs in the actions that take two."""
    tmp = tmp_path_factory.mktemp("tenancy")
    settings = config.load(tmp / "data", database_url=f"sqlite:///{tmp / 'ecsnap.db'}",
                           background_tasks=False, health_gate_timeout_s=2.0)
    compute = FileBackedCompute()
    ctx = bootstrap.build(settings, compute=compute, background=False)
    regions.ensure_region(ctx, REGION, vcpus=16, memory_mib=16384)
    done = setup.initialise(ctx, REGION)
    bob = accounts.create_account(ctx, "bob", "violet-harbour-7")
    bob_key = accounts.create_access_key(ctx, "bob")
    public = images.register_image(ctx, REGION, name="tiny", os_name="Tiny Linux",
                                   template=template, size_gib=1)
    private = images.register_image(ctx, REGION, name="alice-private", os_name="Tiny Linux",
                                    template=template, size_gib=1,
                                    account_id=done.account.id)
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as client:
        a = caller(client, done.access_key.id, done.access_key.secret)
        b = caller(client, bob_key.id, bob_key.secret)
        ids: dict[str, str] = {"public_image": public.id, "image": private.id}

        run = _run(a, private.id, start=True, data_disks=2)
        run_sys, run_d1, run_d2 = _disks(a, run)
        body = _ok(a, "CreateSnapshotGroup", InstanceId=run, Name="alice-run")
        run_group, group_task = body["SnapshotGroupId"], body["TaskId"]
        run_snaps = _group_snaps(a, run_group)
        snap = _ok(a, "CreateSnapshot", DiskId=run_d1, SnapshotName="alice-d1")["SnapshotId"]
        invoke = _ok(a, "RunCommand", Type="RunShellScript", CommandContent="echo hi",
                     InstanceId__1=run)["InvokeId"]

        stop = _run(a, private.id, start=False, data_disks=2)
        stop_sys, stop_d1, stop_d2 = _disks(a, stop)
        stop_group = _ok(a, "CreateSnapshotGroup", InstanceId=stop)["SnapshotGroupId"]
        stop_snaps = _group_snaps(a, stop_group)
        spare = _ok(a, "CreateDisk", Size=20, DiskName="alice-spare")["DiskId"]
        policy = _ok(a, "CreateAutoSnapshotPolicy", TimePoints='["2"]', RepeatWeekdays='["1"]',
                     RetentionDays=-1)["AutoSnapshotPolicyId"]
        _ok(a, "ApplyAutoSnapshotPolicy", AutoSnapshotPolicyId=policy,
            DiskIds=json.dumps([spare]))
        ids["policy"] = policy
        ids.update(run=run, run_sys=run_sys, run_d1=run_d1, run_d2=run_d2,
                   run_group=run_group, run_sys_snap=run_snaps[run_sys],
                   run_d1_snap=run_snaps[run_d1], snap=snap, invoke=invoke, task=group_task,
                   stop=stop, stop_sys=stop_sys, stop_d1=stop_d1, stop_d2=stop_d2,
                   stop_group=stop_group, stop_sys_snap=stop_snaps[stop_sys],
                   stop_d1_snap=stop_snaps[stop_d1], stop_d2_snap=stop_snaps[stop_d2],
                   spare=spare)
        # a custom image of A's, from the stopped instance's system-disk snapshot
        ids["custom"] = _ok(a, "CreateImage", SnapshotId=ids["stop_sys_snap"],
                            ImageName="alice-custom")["ImageId"]

        b_inst = _run(b, public.id, start=False, data_disks=1)
        b_sys, b_d1 = _disks(b, b_inst)
        ids.update(b_inst=b_inst, b_sys=b_sys, b_d1=b_d1,
                   b_disk=_ok(b, "CreateDisk", Size=20)["DiskId"],
                   b_snap=_ok(b, "CreateSnapshot", DiskId=b_d1)["SnapshotId"])
        ids["b_policy"] = _ok(b, "CreateAutoSnapshotPolicy", TimePoints='["4"]',
                              RepeatWeekdays='["3"]', RetentionDays=-1)["AutoSnapshotPolicyId"]
        w = World(ctx, compute, a, b, done.account.id, bob.id, ids)
        w.a_ids = owned_ids(w)
        assert {v for k, v in ids.items() if not k.startswith(("b_", "public"))} <= w.a_ids
        yield w


# ---------------------------------------------------------------- what A has


def _rows(ctx: ServiceContext, account_id: str) -> list[tuple[str, str, str]]:
    with ctx.uow(readonly=True) as uow:
        repos: dict[str, Repository[Any]] = {
            "instance": uow.instances, "disk": uow.disks, "snapshot": uow.snapshots,
            "group": uow.snapshot_groups, "task": uow.tasks, "invocation": uow.invocations,
            "image": uow.images, "policy": uow.auto_snapshot_policies}
        rows = []
        for kind, repo in repos.items():
            for obj in repo.find():
                if getattr(obj, "account_id", None) != account_id:
                    continue
                fields = sorted((k, repr(v)) for k, v in vars(obj).items()
                                if not k.startswith("_"))
                rows.append((kind, str(obj.id), repr(fields)))
    return sorted(rows)


def owned_ids(w: World) -> set[str]:
    found = {row_id for _, row_id, _ in _rows(w.ctx, w.a_account)}
    with w.ctx.uow(readonly=True) as uow:  # a RunCommand's InvokeId and CommandId too
        for record in uow.invocations.find(account_id=w.a_account):
            found |= {record.invoke_id, record.command_id}
    return found


def fingerprint(w: World) -> dict[str, Any]:
    """Every row of A, the internal snapshots in A's disk files, A's running VMs."""
    with w.ctx.uow(readonly=True) as uow:
        storage = w.ctx.storage(uow, REGION)
        disks = [d.id for d in uow.disks.find(account_id=w.a_account)]
    files = {d: qcow.snapshots(storage.path(d)) for d in sorted(disks)
             if Path(storage.path(d)).exists()}
    return {"rows": _rows(w.ctx, w.a_account), "files": files,
            "vms": sorted(i for i in w.compute.vms if i in w.a_ids)}


# ---------------------------------------------------------------- expectations


Params = Callable[[dict[str, str]], dict[str, Any]]


@dataclass(frozen=True)
class Case:
    params: Params
    code: str | None = None  # the error B gets
    status: int = 404
    empty: tuple[str, ...] = ()  # the path of the list that must be empty
    ignored: bool = False  # 200, and nothing happens (ECS ignores the unknown ID)
    same_as_owner: bool = False  # no resource of any account: B gets what A gets
    also: tuple[str, ...] = ()  # further codes the message must name (per-disk failures)
    # otherwise: 200; like every answer it must name no ID of A's that B did not send


def nf(kind: str, params: Params, *, also: tuple[str, ...] = ()) -> Case:
    code = {"i": "InvalidInstanceId.NotFound", "d": "InvalidDiskId.NotFound",
            "s": "InvalidSnapshotId.NotFound", "g": "InvalidSnapshotGroupId.NotFound",
            "m": "InvalidImageId.NotFound", "t": "InvalidTaskId.NotFound"}[kind]
    return Case(params, code=code, status=400 if kind == "t" else 404, also=also)


def empty(path: str, params: Params) -> Case:
    return Case(params, empty=tuple(path.split(".")))


def disks_of(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, (disk, snap) in enumerate(pairs, 1):
        out[f"Disk__{n}__DiskId"], out[f"Disk__{n}__SnapshotId"] = disk, snap
    return out


def _stop_pairs(i: dict[str, str]) -> list[tuple[str, str]]:
    return [(i["stop_sys"], i["stop_sys_snap"]), (i["stop_d1"], i["stop_d1_snap"]),
            (i["stop_d2"], i["stop_d2_snap"])]


BOTH = ("InvalidDiskId.NotFound",)  # A's disk and A's snapshot: both are unknown to B

CASES: dict[str, list[Case]] = {
    # no resource of an account: B gets exactly what A gets
    "DescribeRegions": [Case(lambda i: {}, same_as_owner=True)],
    "DescribeZones": [Case(lambda i: {}, same_as_owner=True)],
    "DescribeInstanceTypes": [Case(lambda i: {}, same_as_owner=True)],
    "DescribeImages": [
        empty("Images.Image", lambda i: {"ImageId": i["image"]}),
        empty("Images.Image", lambda i: {"ImageId": i["image"], "ImageOwnerAlias": "self"}),
        empty("Images.Image", lambda i: {"ImageName": "alice-private"}),
        Case(lambda i: {}),  # the public image and B's own only
        empty("Images.Image", lambda i: {"ImageId": i["custom"], "ImageOwnerAlias": "self",
                                         "Status": "Creating,Available,CreateFailed"}),
        empty("Images.Image", lambda i: {"SnapshotId": i["stop_sys_snap"]}),
    ],
    "CreateImage": [nf("s", lambda i: {"SnapshotId": i["stop_sys_snap"]}),
                    nf("i", lambda i: {"InstanceId": i["run"]}),
                    nf("i", lambda i: {"InstanceId": i["stop"], "ImageName": "stolen"})],
    "DeleteImage": [nf("m", lambda i: {"ImageId": i["custom"]}),
                    nf("m", lambda i: {"ImageId": i["custom"], "Force": "true"}),
                    nf("m", lambda i: {"ImageId": i["image"], "Force": "true"})],
    "RunInstances": [nf("m", lambda i: {"ImageId": i["image"], "InstanceType": NANO})],
    "CreateInstance": [nf("m", lambda i: {"ImageId": i["image"], "InstanceType": NANO})],
    "DescribeInstances": [
        empty("Instances.Instance", lambda i: {"InstanceIds": json.dumps([i["run"],
                                                                          i["stop"]])}),
        empty("Instances.Instance", lambda i: {"ImageId": i["image"]}),
        Case(lambda i: {}),  # B's own only
    ],
    "DescribeInstanceStatus": [
        empty("InstanceStatuses.InstanceStatus",
              lambda i: {"InstanceId__1": i["run"], "InstanceId__2": i["stop"]})],
    "StartInstance": [nf("i", lambda i: {"InstanceId": i["stop"]})],
    "StopInstance": [nf("i", lambda i: {"InstanceId": i["run"]}),
                     nf("i", lambda i: {"InstanceId": i["run"], "ForceStop": "true",
                                        "StoppedMode": "StopCharging"})],
    "StartInstances": [nf("i", lambda i: {"InstanceId__1": i["stop"]})],
    "StopInstances": [nf("i", lambda i: {"InstanceId__1": i["run"], "ForceStop": "true"})],
    "RebootInstance": [nf("i", lambda i: {"InstanceId": i["run"], "ForceStop": "true"})],
    "DeleteInstance": [nf("i", lambda i: {"InstanceId": i["stop"]}),
                       nf("i", lambda i: {"InstanceId": i["run"], "Force": "true"})],
    "CreateDisk": [],  # filled in below: it takes no ID of another resource
    "AttachDisk": [nf("i", lambda i: {"InstanceId": i["stop"], "DiskId": i["b_disk"]}),
                   nf("d", lambda i: {"InstanceId": i["b_inst"], "DiskId": i["spare"]}),
                   nf("i", lambda i: {"InstanceId": i["run"], "DiskId": i["spare"]})],
    "DetachDisk": [nf("i", lambda i: {"InstanceId": i["stop"], "DiskId": i["stop_d1"]}),
                   nf("d", lambda i: {"InstanceId": i["b_inst"], "DiskId": i["stop_d1"]}),
                   nf("d", lambda i: {"InstanceId": i["b_inst"], "DiskId": i["run_d2"]})],
    "DeleteDisk": [Case(lambda i: {"DiskId": i["spare"]}, ignored=True)],
    "ResizeDisk": [nf("d", lambda i: {"DiskId": i["stop_d1"], "NewSize": 40}),
                   nf("d", lambda i: {"DiskId": i["spare"], "NewSize": 40})],
    "ReInitDisk": [nf("d", lambda i: {"DiskId": i["stop_sys"]}),
                   nf("d", lambda i: {"DiskId": i["stop_d2"]})],
    "ReplaceSystemDisk": [
        nf("i", lambda i: {"InstanceId": i["stop"], "ImageId": i["public_image"]}),
        nf("m", lambda i: {"InstanceId": i["b_inst"], "ImageId": i["image"]})],
    "DescribeDisks": [
        empty("Disks.Disk", lambda i: {"DiskIds": json.dumps([i["stop_sys"], i["spare"]])}),
        empty("Disks.Disk", lambda i: {"InstanceId": i["stop"]}),
        Case(lambda i: {}),  # B's own only
    ],
    "CreateSnapshot": [nf("d", lambda i: {"DiskId": i["stop_d1"]}),
                       nf("d", lambda i: {"DiskId": i["run_d1"]}),
                       nf("d", lambda i: {"DiskId": i["spare"]})],
    "DescribeSnapshotFiles": [nf("s", lambda i: {"SnapshotId": i["snap"]}),
                              nf("s", lambda i: {"SnapshotId": i["stop_d1_snap"],
                                                 "Path": "/etc"})],
    "DescribeSnapshots": [
        empty("Snapshots.Snapshot", lambda i: {"SnapshotIds": json.dumps([i["snap"]])}),
        empty("Snapshots.Snapshot", lambda i: {"DiskId": i["run_d1"]}),
        empty("Snapshots.Snapshot", lambda i: {"InstanceId": i["run"]}),
        empty("Snapshots.Snapshot", lambda i: {"SnapshotName": "alice-d1"}),
        Case(lambda i: {}),  # B's own only
    ],
    "DeleteSnapshot": [Case(lambda i: {"SnapshotId": i["snap"]}, ignored=True),
                       Case(lambda i: {"SnapshotId": i["stop_d1_snap"], "Force": "true"},
                            ignored=True)],
    "ModifySnapshotAttribute": [
        nf("s", lambda i: {"SnapshotId": i["snap"], "SnapshotName": "bobs"}),
        nf("s", lambda i: {"SnapshotId": i["stop_d1_snap"], "Description": "bob was here"})],
    "CreateSnapshotGroup": [nf("i", lambda i: {"InstanceId": i["run"]}),
                            nf("i", lambda i: {"InstanceId": i["stop"]})],
    "DescribeSnapshotGroups": [
        empty("SnapshotGroups.SnapshotGroup", lambda i: {"SnapshotGroupId__1": i["run_group"]}),
        empty("SnapshotGroups.SnapshotGroup", lambda i: {"InstanceId": i["stop"]}),
        empty("SnapshotGroups.SnapshotGroup", lambda i: {"Name": "alice-run"}),
        empty("SnapshotGroups.SnapshotGroup", lambda i: {}),
    ],
    "ModifySnapshotGroup": [nf("g", lambda i: {"SnapshotGroupId": i["run_group"],
                                               "Name": "bobs"})],
    "DeleteSnapshotGroup": [nf("g", lambda i: {"SnapshotGroupId": i["stop_group"]})],
    "ResetDisks": [
        nf("s", lambda i: disks_of(_stop_pairs(i)), also=BOTH),
        nf("s", lambda i: {**disks_of(_stop_pairs(i)), "AutoStartInstance": "true",
                           "SafetySnapshot": "false"}, also=BOTH),
        # B's own disk with A's snapshot, A's disk with B's snapshot
        nf("s", lambda i: disks_of([(i["b_d1"], i["stop_d1_snap"])])),
        nf("d", lambda i: disks_of([(i["stop_d1"], i["b_snap"])])),
    ],
    "ResetDisk": [nf("s", lambda i: {"DiskId": i["stop_d1"], "SnapshotId": i["stop_d1_snap"]},
                     also=BOTH)],
    "PreviewResetDisks": [nf("s", lambda i: disks_of(_stop_pairs(i)), also=BOTH)],
    "RestoreSnapshotFiles": [
        nf("i", lambda i: {"InstanceId": i["stop"], "SnapshotId": i["stop_sys_snap"],
                           "Path__1": "/etc/hostname"}),
        nf("i", lambda i: {"InstanceId": i["run"], "SnapshotId": i["snap"],
                           "Path__1": "/etc/hostname", "TargetPath": "/tmp/x"})],
    "DescribeTasks": [empty("TaskSet.Task", lambda i: {"TaskIds": i["task"]}),
                      Case(lambda i: {"TaskAction": "TakeSnapshots"})],  # B's own only
    "DescribeTaskAttribute": [nf("t", lambda i: {"TaskId": i["task"]}),
                              nf("t", lambda i: {"TaskId": i["invoke"]})],
    "RunCommand": [nf("i", lambda i: {"Type": "RunShellScript", "CommandContent": "touch /x",
                                      "InstanceId__1": i["run"]})],
    "DescribeInvocationResults": [
        empty("Invocation.InvocationResults.InvocationResult",
              lambda i: {"InvokeId": i["invoke"]}),
        empty("Invocation.InvocationResults.InvocationResult",
              lambda i: {"InstanceId": i["run"]})],
    "DescribeInvocations": [empty("Invocations.Invocation", lambda i: {"InvokeId": i["invoke"]}),
                            empty("Invocations.Invocation", lambda i: {"InstanceId": i["run"]})],
}
_NO_POLICY = "InvalidAutoSnapshotPolicyId.NotFound"
CASES.update({
    # B creates its own policy, which A does not see
    "CreateAutoSnapshotPolicy": [Case(lambda i: {"TimePoints": '["3"]',
                                                 "RepeatWeekdays": '["2"]',
                                                 "RetentionDays": 3})],
    "DescribeAutoSnapshotPolicyEx": [
        empty("AutoSnapshotPolicies.AutoSnapshotPolicy",
              lambda i: {"AutoSnapshotPolicyId": i["policy"]}),
        Case(lambda i: {})],  # B's own only
    "ModifyAutoSnapshotPolicyEx": [Case(lambda i: {"AutoSnapshotPolicyId": i["policy"],
                                                   "RetentionDays": 5}, code=_NO_POLICY)],
    "DeleteAutoSnapshotPolicy": [Case(lambda i: {"AutoSnapshotPolicyId": i["policy"]},
                                      code=_NO_POLICY)],
    "ApplyAutoSnapshotPolicy": [
        Case(lambda i: {"AutoSnapshotPolicyId": i["policy"],
                        "DiskIds": json.dumps([i["b_disk"]])}, code=_NO_POLICY),
        nf("d", lambda i: {"AutoSnapshotPolicyId": i["b_policy"],
                           "DiskIds": json.dumps([i["spare"]])})],
    "CancelAutoSnapshotPolicy": [nf("d", lambda i: {"DiskIds": json.dumps([i["spare"]])})],
})
# CreateDisk: without a SnapshotId B gets its own disk, which A does not see; A's snapshot
# does not exist for B (nor in RunInstances' data disks); A's fingerprint is checked as for
# every case
CASES["CreateDisk"] = [Case(lambda i: {"Size": 20, "DiskName": "alice-spare"}),
                       nf("s", lambda i: {"SnapshotId": i["snap"]}),
                       nf("s", lambda i: {"SnapshotId": i["snap"], "Size": 40})]
CASES["RunInstances"] = [*CASES["RunInstances"], Case(lambda i: {
    "ImageId": i["public_image"], "InstanceType": NANO,
    "DataDisk__1__SnapshotId": i["snap"]}, code="InvalidDataDiskSnapshotId.NotFound")]


def test_every_action_has_a_tenancy_case() -> None:
    missing = sorted(set(ACTIONS) - set(CASES))
    assert not missing, f"actions without a tenancy case in {__name__}.CASES: {missing}"
    assert not sorted(set(CASES) - set(ACTIONS)), "cases for actions that do not exist"
    assert all(CASES[name] for name in ACTIONS), "an action with an empty list of cases"


def _no_message(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: _no_message(v) for k, v in body.items() if k not in ("Message", "ErrorMsg")}
    if isinstance(body, list):
        return [_no_message(v) for v in body]
    return body


def _dig(body: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = body
    for key in path:
        value = value[key]
    return value


def _without_ids(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("RequestId",)}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_another_accounts_ids(world: World, action: str) -> None:
    w = world
    for n, case in enumerate(CASES.get(action, [])):
        params = case.params(w.ids)
        sent = {str(v) for v in params.values()}
        before = fingerprint(w)
        status, body = w.b(action, **params)
        where = f"{action} case {n} {params}: {status} {body}"
        if case.code is not None:
            assert (status, body.get("Code")) == (case.status, case.code), where
            for code in case.also:
                assert code in body["Message"], where
        else:
            assert status == 200, where
        if case.empty:
            assert _dig(body, case.empty) == [], where
            if "TotalCount" in body:
                assert body["TotalCount"] == 0, where
        if case.same_as_owner:
            assert _without_ids(body) == _without_ids(w.a(action, **params)[1]), where
        # no answer names an ID of A's that B did not send
        shown = json.dumps(_no_message(body))
        leaked = sorted(i for i in w.a_ids - sent if i in shown)
        assert not leaked, f"{where}: names A's {leaked}"
        assert fingerprint(w) == before, f"{where}: changed A's resources"
        if action == "CreateDisk" and case.code is None:  # B's new disk is B's only
            new = str(body["DiskId"])
            assert _ok(w.a, "DescribeDisks", DiskIds=json.dumps([new]))["Disks"]["Disk"] == []
            assert [d["DiskId"] for d in _ok(w.b, "DescribeDisks", DiskIds=json.dumps(
                [new]))["Disks"]["Disk"]] == [new]


def test_the_owner_can_do_what_the_other_account_cannot(world: World) -> None:
    """The refusals above are about the account: the same IDs work for their owner (run
    last in this module: it changes A's resources)."""
    w, i = world, world.ids
    assert _ok(w.a, "DescribeSnapshots", SnapshotIds=json.dumps([i["snap"]]))[
        "TotalCount"] == 1
    _ok(w.a, "ModifySnapshotAttribute", SnapshotId=i["snap"], SnapshotName="renamed")
    assert _ok(w.a, "DescribeTaskAttribute", TaskId=i["task"])["TaskStatus"] == "Finished"
    assert len(_ok(w.a, "DescribeInvocationResults", InvokeId=i["invoke"])[
        "Invocation"]["InvocationResults"]["InvocationResult"]) == 1
    reset = _ok(w.a, "ResetDisks", **disks_of(_stop_pairs(i)))
    assert _ok(w.a, "DescribeTaskAttribute", TaskId=reset["TaskId"])["TaskStatus"] == \
        "Finished"
    _ok(w.a, "ResizeDisk", DiskId=i["stop_d1"], NewSize=40)
    _ok(w.a, "DeleteSnapshot", SnapshotId=i["snap"])
    assert _ok(w.a, "DescribeSnapshots", SnapshotIds=json.dumps([i["snap"]]))[
        "TotalCount"] == 0
    _ok(w.a, "DeleteDisk", DiskId=i["spare"])
    assert _ok(w.a, "DescribeDisks", DiskIds=json.dumps([i["spare"]]))["Disks"]["Disk"] == []
