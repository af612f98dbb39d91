"""Conformance with the official SDKs, generated from the SDKs themselves.

For every action of the API's table (`actions.ACTIONS`) the new SDK's typed request
(`alibabacloud_ecs20140526.models.<Action>Request`) is built with only the parameters ECS
requires (those its model marks "This parameter is required.", plus the few ECS-API.md
requires that the model leaves conditional), sent through the unchanged client to a live
server, and its answer read back into the SDK's typed response. The same requests go
through the old SDK (`aliyunsdkecs` request classes, `AcsClient`). Then, per action:

* every field ecsnap answers is one the SDK's model declares (or a documented ecsnap
  extension), with the model's type; the fields ECS documents are never None;
* every parameter the SDK's request model can send (found by building a request with
  every field set and capturing what the client puts on the wire) is read by the action,
  or declared cosmetic, refused (`UnsupportedParameter` naming it) or a constant filter
  in the action's policy; each refusal and each constant filter is sent and checked;
* list actions page with PageNumber/PageSize and with NextToken/MaxResults wherever the
  SDK's model offers them.

The server is `ecsnap`'s real app (real database, real qcow2 files) on 127.0.0.1 in this
process, with the compute test double for the VMs.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import threading
import time
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ecsnap import bootstrap, config
from ecsnap.adapters.compute.base import ExecResult
from ecsnap.entrypoints.api.actions import (
    ACTIONS,
    COMMON_IGNORED,
    COMMON_REFUSED,
    POLICIES,
    Call,
)
from ecsnap.entrypoints.cli.client import ApiClient, Credentials
from ecsnap.service import images, setup
from tests.doubles import FileBackedCompute
from tests.live import free_port

REGION = "local-1"
ZONE = f"{REGION}-a"
TYPE = "ecs.t5-lc2m1.nano"
Values = dict[str, Any]


# ------------------------------------------------------------------ the SDKs' own models


def sdk_models() -> Any:
    from alibabacloud_ecs20140526 import models

    return models


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def request_class(action: str) -> Any:
    return getattr(sdk_models(), f"{action}Request", None)


def body_class(action: str) -> Any:
    return getattr(sdk_models(), f"{action}ResponseBody", None)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The attributes of an SDK model with their declared types."""
    namespace = {**vars(typing), **vars(sdk_models()), "main_models": sdk_models()}
    hints = typing.get_type_hints(cls.__init__, namespace)  # type: ignore[misc]
    return {k: v for k, v in hints.items() if k != "return"}


def _is_model(t: Any) -> bool:
    from darabonba.model import DaraModel

    return isinstance(t, type) and issubclass(t, DaraModel)


def _sample(t: Any) -> Any:
    if typing.get_origin(t) is list:
        return [_sample(typing.get_args(t)[0])]
    if typing.get_origin(t) is dict:
        return {"k": "v"}
    if _is_model(t):
        return full_model(t)
    return {str: "s", int: 7, bool: True, float: 1.5}.get(t, "s")


def full_model(cls: Any) -> Any:
    """An instance of the model with every field set (nested models too)."""
    return cls(**{name: _sample(t) for name, t in field_types(cls).items()})


@functools.cache
def wire_names(cls: type) -> dict[str, str]:
    """attribute -> the name the SDK reads and writes (to_map / from_map)."""
    base = cls().to_map()
    names = {}
    for attr, t in field_types(cls).items():
        changed = [k for k, v in cls(**{attr: _sample(t)}).to_map().items()
                   if base.get(k, object()) != v]
        assert len(changed) == 1, (cls, attr, changed)
        names[attr] = changed[0]
    return names


def required_fields(cls: type) -> set[str]:
    """The attributes the model's documentation says "This parameter is required." of."""
    found, comment = set(), []
    for line in inspect.getsource(cls.__init__).splitlines():  # type: ignore[misc]
        text = line.strip()
        if text.startswith("#"):
            comment.append(text)
        elif text.startswith("self."):
            if "# This parameter is required." in comment:
                found.add(text.split("=")[0].strip().removeprefix("self."))
            comment = []
    return found


class _Captured(Exception):
    def __init__(self, query: dict[str, Any]) -> None:
        super().__init__("captured")
        self.query = query


def wire_query(action: str, request: Any) -> dict[str, Any]:
    """The parameters the new SDK's client puts on the wire for `request` (decoded, one
    string-able value per name), captured before anything is sent."""
    from alibabacloud_ecs20140526.client import Client
    from alibabacloud_tea_openapi import models as open_api

    client = Client(open_api.Config(access_key_id="id", access_key_secret="secret",
                                    endpoint="127.0.0.1:9", protocol="http"))

    def capture(params: Any, req: Any, runtime: Any) -> Any:
        raise _Captured(dict(req.query or {}))

    client.call_api = capture
    try:
        getattr(client, snake(action))(request)
    except _Captured as captured:
        return captured.query
    raise AssertionError("the client sent nothing")


def index_pattern(name: str) -> str:
    return re.sub(r"(?<=\.)[1-9][0-9]*(?=\.|$)", "N", name)


@functools.cache
def sdk_parameters(action: str) -> frozenset[str]:
    """Every parameter the SDK can send for `action`, list indices written N."""
    cls = request_class(action)
    return frozenset(index_pattern(k) for k in wire_query(action, full_model(cls)))


def type_at(cls: Any, name: str) -> Any:
    """The declared type of the wire parameter `name` (`DataDisk.N.Encrypted`)."""
    parts = name.split(".")
    t: Any = cls
    while parts:
        part = parts.pop(0)
        if part == "N":
            continue
        assert _is_model(t), (cls, name)
        attr = {w: a for a, w in wire_names(t).items()}[part]
        t = field_types(t)[attr]
        while typing.get_origin(t) is list:
            t = typing.get_args(t)[0]
    return t


def with_parameter(request: Any, name: str, value: Any) -> Any:
    """A copy of the typed `request` with the wire parameter `name` (`DataDisk.N.Size`,
    `InstanceId.N`, `SystemDisk.Size`) set to `value` (index 1)."""
    data = request.to_map()
    parts = name.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1 or (i == len(parts) - 2 and parts[-1] == "N")
        is_list = i + 1 < len(parts) and parts[i + 1] == "N"
        if part == "N":
            continue
        if last:
            node[part] = [value] if is_list else value
            break
        if is_list:
            items = node.setdefault(part, [])
            if not items:
                items.append({})
            node = items[0]
        else:
            node = node.setdefault(part, {})
    return type(request)().from_map(data)


def concrete(name: str) -> str:
    return re.sub(r"\.N(?=\.|$)", ".1", name)


# ------------------------------------------------------------------ typed responses


# Fields ECS documents for each answer (shared/reference/ECS-API.md): never None here.
DOCUMENTED: dict[str, tuple[str, ...]] = {
    "DescribeRegionsResponseBodyRegionsRegion": (
        "RegionId", "LocalName", "RegionEndpoint", "Status"),
    "DescribeZonesResponseBodyZonesZone": (
        "ZoneId", "LocalName", "AvailableResourceCreation", "AvailableDiskCategories",
        "AvailableInstanceTypes", "AvailableResources"),
    "DescribeInstanceTypesResponseBodyInstanceTypesInstanceType": (
        "InstanceTypeId", "InstanceTypeFamily", "CpuCoreCount", "MemorySize"),
    "DescribeInstancesResponseBodyInstancesInstance": (
        "InstanceId", "InstanceName", "Description", "HostName", "RegionId", "ZoneId",
        "Status", "StoppedMode", "OperationLocks", "InstanceType", "InstanceTypeFamily",
        "Cpu", "Memory", "ImageId", "OSName", "OSNameEn", "OSType", "CreationTime",
        "StartTime", "ExpiredTime", "InstanceChargeType", "InternetChargeType",
        "InternetMaxBandwidthIn", "InternetMaxBandwidthOut", "InstanceNetworkType",
        "IoOptimized", "DeviceAvailable", "DeletionProtection", "SerialNumber", "Tags",
        "SecurityGroupIds", "PublicIpAddress", "InnerIpAddress", "VpcAttributes",
        "NetworkInterfaces"),
    "DescribeInstanceStatusResponseBodyInstanceStatusesInstanceStatus": (
        "InstanceId", "Status"),
    "StartInstancesResponseBodyInstanceResponsesInstanceResponse": (
        "InstanceId", "PreviousStatus", "CurrentStatus", "Code", "Message"),
    "StopInstancesResponseBodyInstanceResponsesInstanceResponse": (
        "InstanceId", "PreviousStatus", "CurrentStatus", "Code", "Message"),
    "DescribeDisksResponseBodyDisksDisk": (
        "DiskId", "DiskName", "Description", "RegionId", "ZoneId", "Type", "Category",
        "Size", "Status", "InstanceId", "Device", "AttachedTime", "DetachedTime",
        "CreationTime", "ExpiredTime", "Portable", "DeleteWithInstance",
        "DeleteAutoSnapshot", "EnableAutoSnapshot", "EnableAutomatedSnapshotPolicy",
        "SourceSnapshotId", "ImageId", "DiskChargeType", "Encrypted", "PerformanceLevel",
        "SerialNumber", "OperationLocks"),
    "DescribeSnapshotsResponseBodySnapshotsSnapshot": (
        "SnapshotId", "SnapshotName", "Description", "SourceDiskId", "SourceDiskType",
        "SourceDiskSize", "SourceStorageType", "Status", "Progress", "RemainTime",
        "CreationTime", "LastModifiedTime", "RetentionDays", "InstantAccess",
        "InstantAccessRetentionDays", "SnapshotType", "Usage", "Category", "Encrypted",
        "ProductCode", "SnapshotSN", "Tags"),
    "DescribeSnapshotGroupsResponseBodySnapshotGroupsSnapshotGroup": (
        "SnapshotGroupId", "Name", "Description", "InstanceId", "CreationTime", "Status",
        "ProgressStatus", "Snapshots"),
    "DescribeSnapshotGroupsResponseBodySnapshotGroupsSnapshotGroupSnapshotsSnapshot": (
        "SnapshotId", "SourceDiskId", "SourceDiskType", "Progress", "InstantAccess",
        "InstantAccessRetentionDays"),
    "DescribeImagesResponseBodyImagesImage": (
        "ImageId", "ImageName", "ImageFamily", "ImageVersion", "Description", "Status",
        "Progress", "Size", "CreationTime", "ImageOwnerAlias", "OSType", "OSName",
        "OSNameEn", "Platform", "Architecture", "Usage", "IsSupportCloudinit",
        "IsSupportIoOptimized", "IsCopied", "IsSubscribed", "IsSelfShared",
        "DiskDeviceMappings"),
    "DescribeTasksResponseBodyTaskSetTask": (
        "TaskId", "TaskAction", "TaskStatus", "CreationTime", "FinishedTime",
        "SupportCancel"),
    "DescribeTaskAttributeResponseBody": (
        "TaskId", "TaskAction", "TaskStatus", "TaskProcess", "CreationTime",
        "FinishedTime", "SupportCancel", "TotalCount", "SuccessCount", "FailedCount",
        "RegionId", "OperationProgressSet"),
    "DescribeInvocationResultsResponseBodyInvocationInvocationResultsInvocationResult": (
        "CommandId", "InvokeId", "InstanceId", "InvocationStatus", "InvokeRecordStatus",
        "ExitCode", "Output", "Dropped", "ErrorCode", "ErrorInfo", "StartTime",
        "FinishedTime", "StopTime", "Repeats", "Username"),
    "DescribeInvocationsResponseBodyInvocationsInvocation": (
        "InvokeId", "CommandId", "CommandType", "CommandContent", "InvocationStatus",
        "CreationTime", "Timed", "Frequency", "InvokeInstances"),
    "DescribeInvocationsResponseBodyInvocationsInvocationInvokeInstancesInvokeInstance": (
        "InstanceId", "InvocationStatus", "ExitCode", "Output", "StartTime", "FinishTime"),
    "RunInstancesResponseBody": ("InstanceIdSets", "TradePrice"),
    "CreateInstanceResponseBody": ("InstanceId", "TradePrice"),
    "CreateDiskResponseBody": ("DiskId",),
    "CreateImageResponseBody": ("ImageId",),
    "ReplaceSystemDiskResponseBody": ("DiskId",),
    "CreateSnapshotResponseBody": ("SnapshotId",),
    "CreateSnapshotGroupResponseBody": ("SnapshotGroupId",),
    "DeleteSnapshotGroupResponseBody": ("OperationProgressSet",),
    "ResetDisksResponseBody": ("OperationProgressSet",),
    "RunCommandResponseBody": ("CommandId", "InvokeId"),
}
for _name in ("DescribeInstances", "DescribeDisks", "DescribeSnapshots"):
    DOCUMENTED[f"{_name}ResponseBody"] = ("TotalCount", "PageNumber", "PageSize", "NextToken")
for _name in ("DescribeInstanceStatus", "DescribeImages", "DescribeTasks"):
    DOCUMENTED[f"{_name}ResponseBody"] = ("TotalCount", "PageNumber", "PageSize")
DOCUMENTED["DescribeSnapshotGroupsResponseBody"] = ("NextToken", "SnapshotGroups")
DOCUMENTED["DescribeInstanceTypesResponseBody"] = ("NextToken", "InstanceTypes")
DOCUMENTED["DescribeInvocationsResponseBody"] = ("TotalCount", "PageNumber", "PageSize",
                                                  "NextToken", "Invocations")
DOCUMENTED["DescribeInvocationResultsResponseBodyInvocation"] = (
    "TotalCount", "PageNumber", "PageSize", "NextToken", "InvocationResults")

# Fields ecsnap answers beyond the SDK's models: its documented extensions (README,
# "ecsnap's extensions to the ECS API"), per model.
EXTENSIONS: dict[str, set[str]] = {
    "CreateSnapshotGroupResponseBody": {"TaskId"},
    "DeleteSnapshotGroupResponseBody": {"TaskId"},
    "ResetDisksResponseBody": {"SafetySnapshotGroupId", "TaskId"},
    "ResetDiskResponseBody": {"SafetySnapshotGroupId", "TaskId"},
    "DescribeSnapshotGroupsResponseBodySnapshotGroupsSnapshotGroup": {
        "ConsistencyLevel", "FreezeWindowMs", "Purpose"},
    "DescribeTaskAttributeResponseBody": {"Result", "ResourceId"},
    "DescribeTasksResponseBodyTaskSetTask": {"TaskProcess", "ResourceId"},
    "DescribeSnapshotsResponseBodySnapshotsSnapshot": {"InstanceId", "SnapshotGroupId"},
    "DescribeInstancesResponseBodyInstancesInstance": {"HostId"},  # the placement's host
}


def assert_typed(body: Any, raw: Any, where: str) -> None:
    assert body is not None, f"the SDK could not read the answer: {raw}"
    problems = typed_problems(body, raw, where)
    assert not problems, "\n".join(problems)


def _type_ok(t: Any, value: Any) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if t is str:
        return isinstance(value, str)
    if typing.get_origin(t) is dict:
        return isinstance(value, dict)
    return True


def typed_problems(model: Any, raw: Any, path: str) -> list[str]:
    """What of the raw answer `raw` the typed `model` (its from_map) does not carry with the
    SDK's declared type, and the documented fields it lacks."""
    cls: Any = type(model)
    types, wires = field_types(cls), wire_names(cls)
    attr_of = {w: a for a, w in wires.items()}
    problems = []
    if not isinstance(raw, dict):
        return [f"{path}: {raw!r} where the SDK's {cls.__name__} expects an object"]
    for key, value in raw.items():
        where = f"{path}.{key}"
        attr = attr_of.get(key)
        if attr is None:
            if key not in EXTENSIONS.get(cls.__name__, set()):
                problems.append(f"{where}: not a field of the SDK's {cls.__name__}")
            continue
        problems += _value_problems(types[attr], getattr(model, attr), value, where)
    for key in DOCUMENTED.get(cls.__name__, ()):
        if getattr(model, attr_of[key]) is None:
            problems.append(f"{path}.{key}: missing (None in the SDK's {cls.__name__})")
    return problems


def _value_problems(t: Any, typed: Any, raw: Any, where: str) -> list[str]:
    if raw is None:
        return [f"{where}: null"]
    if typing.get_origin(t) is list:
        if not isinstance(raw, list) or not isinstance(typed, list):
            return [f"{where}: {type(raw).__name__} where the SDK expects a list"]
        item_type = typing.get_args(t)[0]
        return [p for i, (a, b) in enumerate(zip(typed, raw, strict=True))
                for p in _value_problems(item_type, a, b, f"{where}[{i}]")]
    if _is_model(t):
        if typed is None:
            return [f"{where}: not readable as the SDK's {t.__name__}"]
        return typed_problems(typed, raw, where)
    if not _type_ok(t, raw):
        return [f"{where}: {raw!r} ({type(raw).__name__}) where the SDK declares "
                f"{getattr(t, '__name__', t)}"]
    return []


# ------------------------------------------------------------------ the live server


class Compute(FileBackedCompute):
    """The compute double, with a guest that answers Cloud Assistant commands."""

    def guest_exec(self, instance_id: str, command: str, *, timeout: float = 60.0,
                   working_dir: str = "/root") -> ExecResult:
        return ExecResult(0, b"hello\n")


@dataclass
class Live:
    port: int
    key_id: str
    secret: str
    image_id: str
    other_image_id: str
    reads: dict[str, set[str]]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, template: Path) -> Iterator[Live]:
    import uvicorn

    from ecsnap.entrypoints.api.app import create_app

    data = tmp_path_factory.mktemp("conformance") / "data"
    settings = config.load(data, background_tasks=False, health_gate_timeout_s=2.0,
                           region_vcpus=4096, region_memory_mib=4 * 1024 * 1024,
                           default_quotas={"instances": -1, "vcpus": -1, "memory_mib": -1,
                                           "disks": -1, "disk_gib": -1, "snapshots": -1})
    ctx = bootstrap.build(settings, compute=Compute(), background=False)
    done = setup.initialise(ctx, REGION)
    image = images.register_image(ctx, REGION, name="tiny", os_name="Tiny Linux",
                                  template=template, size_gib=1)
    other = images.register_image(ctx, REGION, name="tiny-2", os_name="Tiny Linux",
                                  template=template, size_gib=1, unique=True)
    reads: dict[str, set[str]] = {}

    def recording(name: str, run: Callable[[Call], dict[str, Any]]
                  ) -> Callable[[Call], dict[str, Any]]:
        def call(c: Call) -> dict[str, Any]:
            try:
                return run(c)
            finally:
                reads.setdefault(name, set()).update(c.p.read_names())
        return call

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    with pytest.MonkeyPatch.context() as patch:
        for name, run in list(ACTIONS.items()):
            patch.setitem(ACTIONS, name, recording(name, run))
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "no server"
            time.sleep(0.02)
        try:
            yield Live(port, done.access_key.id, done.access_key.secret, image.id, other.id,
                       reads)
        finally:
            server.should_exit = True
            thread.join(30)
            ctx.runner.shutdown()


# ------------------------------------------------------------------ the two SDKs


class SdkError(Exception):
    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.code, self.status, self.message = code, status, message


class NewSdk:
    """alibabacloud-ecs20140526, the typed client, unchanged (its call_api is wrapped only
    to keep a copy of the raw answer beside the typed one)."""

    name = "new"

    def __init__(self, live: Live) -> None:
        from alibabacloud_ecs20140526.client import Client
        from alibabacloud_tea_openapi import models as open_api

        self.client = Client(open_api.Config(
            access_key_id=live.key_id, access_key_secret=live.secret, region_id=REGION,
            endpoint=f"127.0.0.1:{live.port}", protocol="http"))
        self.raw: Any = None
        call_api = self.client.call_api

        def keep(params: Any, request: Any, runtime: Any) -> Any:
            answer = call_api(params, request, runtime)
            self.raw = answer.get("body")
            return answer

        self.client.call_api = keep

    def send(self, action: str, request: Any) -> tuple[Any, Any]:
        """(raw JSON answer, typed body)."""
        from alibabacloud_tea_openapi.exceptions import ClientException, ServerException

        try:
            response = getattr(self.client, snake(action))(request)
        except (ClientException, ServerException) as exc:
            raise SdkError(str(exc.code), int(exc.status_code),
                           str((exc.data or {}).get("Message", ""))) from exc
        return self.raw, response.body

    def send_extension(self, action: str, query: Values) -> Any:
        """An ecsnap action the SDK has no model of, through the SDK's generic call_api."""
        from alibabacloud_tea_openapi import models as open_api
        from alibabacloud_tea_openapi.exceptions import ClientException
        from alibabacloud_tea_util import models as util_models

        params = open_api.Params(action=action, version="2014-05-26", protocol="HTTP",
                                 pathname="/", method="POST", auth_type="AK", style="RPC",
                                 req_body_type="formData", body_type="json")
        try:
            answer = self.client.call_api(params, open_api.OpenApiRequest(query=query),
                                          util_models.RuntimeOptions())
        except ClientException as exc:
            raise SdkError(str(exc.code), int(exc.status_code),
                           str((exc.data or {}).get("Message", ""))) from exc
        return answer["body"]


class OldSdk:
    """aliyun-python-sdk-ecs request classes with aliyunsdkcore's AcsClient, sending the
    same parameters the new SDK's request puts on the wire."""

    name = "old"

    def __init__(self, live: Live) -> None:
        from aliyunsdkcore.client import AcsClient

        self.client = AcsClient(live.key_id, live.secret, REGION, auto_retry=False)
        self.client.add_endpoint(REGION, "Ecs", f"127.0.0.1:{live.port}")

    def send(self, action: str, request: Any) -> tuple[Any, Any]:
        import importlib

        from aliyunsdkcore.acs_exception.exceptions import ServerException

        module = importlib.import_module(f"aliyunsdkecs.request.v20140526.{action}Request")
        old = getattr(module, f"{action}Request")()
        old.set_protocol_type("http")
        for name, value in wire_query(action, request).items():
            setter = getattr(old, f"set_{name}", None)
            if "." not in name and setter is not None and not isinstance(value, list | dict):
                setter(value)
            else:
                old.add_query_param(name, value)
        try:
            raw = json.loads(self.client.do_action_with_exception(old))
        except ServerException as exc:
            raise SdkError(exc.get_error_code(), exc.get_http_status(),
                           exc.get_error_msg()) from exc
        return raw, body_class(action)().from_map(raw)


def old_sdk_has(action: str) -> bool:
    import importlib

    try:
        importlib.import_module(f"aliyunsdkecs.request.v20140526.{action}Request")
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------ resources to act on


class World:
    """Fresh resources for each request, made through ecsnap's own API client."""

    def __init__(self, live: Live) -> None:
        self.live = live
        self.api = ApiClient(Credentials(live.key_id, live.secret, REGION, live.endpoint))
        self.image_id = live.image_id

    def call(self, action: str, **params: Any) -> dict[str, Any]:
        return self.api.call(action, {k.replace("__", "."): v for k, v in params.items()})

    def until(self, what: str, check: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def status(self, instance_id: str) -> str:
        body = self.call("DescribeInstances", InstanceIds=json.dumps([instance_id]))
        return str(body["Instances"]["Instance"][0]["Status"])

    def running(self) -> str:
        body = self.call("RunInstances", ImageId=self.image_id, InstanceType=TYPE,
                         DataDisk__1__Size=20)
        instance_id = str(body["InstanceIdSets"]["InstanceIdSet"][0])
        self.until("Running", lambda: self.status(instance_id) == "Running")
        return instance_id

    def stopped(self) -> str:
        instance_id = self.running()
        self.call("StopInstance", InstanceId=instance_id, StoppedMode="KeepCharging")
        self.until("Stopped", lambda: self.status(instance_id) == "Stopped")
        return instance_id

    def disks(self, instance_id: str) -> list[str]:
        body = self.call("DescribeDisks", InstanceId=instance_id)
        return [str(d["DiskId"]) for d in sorted(body["Disks"]["Disk"],
                                                 key=lambda d: str(d["Device"]))]

    def available_disk(self) -> str:
        return str(self.call("CreateDisk", ZoneId=ZONE, Size=20)["DiskId"])

    def snapshot(self, disk_id: str) -> str:
        snap_id = str(self.call("CreateSnapshot", DiskId=disk_id)["SnapshotId"])
        self.until("snapshot", lambda: self.call(
            "DescribeSnapshots", SnapshotIds=json.dumps([snap_id]))["Snapshots"]["Snapshot"]
            [0]["Status"] == "accomplished")
        return snap_id

    def group(self, instance_id: str) -> tuple[str, dict[str, str]]:
        body = self.call("CreateSnapshotGroup", InstanceId=instance_id)
        group_id = str(body["SnapshotGroupId"])

        def members() -> dict[str, str] | None:
            [g] = self.call("DescribeSnapshotGroups", SnapshotGroupId__1=group_id
                            )["SnapshotGroups"]["SnapshotGroup"]
            if g["Status"] != "accomplished":
                return None
            return {s["SourceDiskId"]: s["SnapshotId"] for s in g["Snapshots"]["Snapshot"]}

        self.until("group", lambda: members() is not None)
        return group_id, members() or {}

    def custom_image(self, instance_id: str | None = None) -> str:
        """An Available custom image of a system disk's snapshot (or of `instance_id`)."""
        source = {"InstanceId": instance_id} if instance_id else \
            {"SnapshotId": self.snapshot(self.disks(self.stopped())[0])}
        image_id = str(self.call("CreateImage", **source)["ImageId"])
        self.until("image", lambda: self.call(
            "DescribeImages", ImageId=image_id, ImageOwnerAlias="self")["Images"]["Image"]
            [0]["Status"] == "Available")
        return image_id

    def policy(self, name: str = "") -> str:
        return str(self.call("CreateAutoSnapshotPolicy", RegionId=REGION, TimePoints='["2"]',
                             RepeatWeekdays='["1"]', RetentionDays=-1,
                             AutoSnapshotPolicyName=name)["AutoSnapshotPolicyId"])

    def task(self) -> str:
        instance_id = self.stopped()
        return str(self.call("CreateSnapshotGroup", InstanceId=instance_id)["TaskId"])

    def invocation(self, instance_id: str | None = None) -> tuple[str, str]:
        body = self.call("RunCommand", Type="RunShellScript", CommandContent="echo hello",
                         InstanceId__1=instance_id or self.running())

        def done() -> bool:
            rows = self.call("DescribeInvocationResults", InvokeId=body["InvokeId"]
                             )["Invocation"]["InvocationResults"]["InvocationResult"]
            return bool(rows) and rows[0]["InvokeRecordStatus"] != "Running"

        self.until("invocation", done)
        return str(body["InvokeId"]), str(body["CommandId"])


# ------------------------------------------------------------------ what each action needs


@dataclass(frozen=True)
class Probe:
    """A request with optional parameters the action implements: `make` builds its
    parameters (required ones included); `code`: the error it answers, None for success."""

    make: Callable[[World], Values]
    code: str | None = None


@dataclass(frozen=True)
class Spec:
    required: Callable[[World], Values]
    probes: tuple[Probe, ...] = ()
    extension: bool = False  # an ecsnap action: the SDKs have no model of it
    code: str | None = None  # the error ECS answers to the minimal request


def _m() -> Any:
    return sdk_models()


def _tag(cls: str) -> list[Any]:
    return [getattr(_m(), cls)(key="team", value="blue")]


def _with(required: Callable[[World], Values], code: str | None = None,
          **extra: Callable[[World], Any] | Any) -> Probe:
    def make(w: World) -> Values:
        values = required(w)
        for key, value in extra.items():
            values[key] = value(w) if callable(value) else value
        return values
    return Probe(make, code)


def _run_request(prefix: str) -> Callable[[World], Values]:
    def make(w: World) -> Values:
        return {"region_id": REGION, "image_id": w.image_id, "instance_type": TYPE}
    return make


def _instance_probe(prefix: str) -> Probe:
    m = _m()
    return _with(_run_request(prefix), zone_id=ZONE, instance_name="conformance",
                 description="made by the conformance test", host_name="conf-host",
                 system_disk=getattr(m, f"{prefix}RequestSystemDisk")(
                     size=20, category="cloud_essd", disk_name="system"),
                 data_disk=[getattr(m, f"{prefix}RequestDataDisk")(
                     size=20, category="cloud_essd", disk_name="data", description="data disk",
                     delete_with_instance=False)],
                 tag=_tag(f"{prefix}RequestTag"),
                 client_token=lambda w: f"token-{time.monotonic_ns()}")


def _snapshot_disk_probe(prefix: str) -> Probe:
    """A data disk from a data disk's snapshot (its size: the snapshot's)."""
    return _with(_run_request(prefix), data_disk=lambda w: [
        getattr(_m(), f"{prefix}RequestDataDisk")(snapshot_id=w.snapshot(w.available_disk()))])


def _region(w: World) -> Values:
    return {"region_id": REGION}


def _reset_items(w: World) -> tuple[str, list[tuple[str, str]]]:
    instance_id = w.stopped()
    _, members = w.group(instance_id)
    return instance_id, sorted(members.items())


def _reset_disks(w: World) -> Values:
    _, items = _reset_items(w)
    return {"region_id": REGION, "disk": [_m().ResetDisksRequestDisk(disk_id=d, snapshot_id=s)
                                          for d, s in items]}


def _json_ids(ids: list[str]) -> str:
    return json.dumps(ids)


def _policy_values(w: World) -> Values:
    return {"region_id": REGION, "time_points": '["2"]', "repeat_weekdays": '["1","7"]',
            "retention_days": -1}


def _a_policy(w: World) -> Values:
    return {"region_id": REGION, "auto_snapshot_policy_id": w.policy()}


def _used_image(w: World) -> Values:
    """A custom image an instance was made from."""
    image_id = w.custom_image()
    w.call("RunInstances", ImageId=image_id, InstanceType=TYPE)
    return {"region_id": REGION, "image_id": image_id}


def _a_disk(w: World) -> Values:
    return {"region_id": REGION, "disk_ids": _json_ids([w.available_disk()])}


SPECS: dict[str, Spec] = {
    "DescribeRegions": Spec(lambda w: {}),
    "DescribeZones": Spec(_region),
    "DescribeInstanceTypes": Spec(lambda w: {}, (
        _with(lambda w: {}, instance_types=[TYPE]),
        _with(lambda w: {}, max_results=1, next_token=""),
        _with(lambda w: {}, instance_type_family="ecs.t5", instance_type_families=["ecs.t5"],
              minimum_cpu_core_count=1, maximum_cpu_core_count=64,
              minimum_memory_size=0.5, maximum_memory_size=512.0,
              cpu_architecture="X86", cpu_architectures=["X86"]),
    )),
    "DescribeImages": Spec(_region, (
        _with(_region, image_id=lambda w: w.image_id, image_name="tiny*",
              image_owner_alias="system", page_number=1, page_size=10, status="Available",
              architecture="x86_64", ostype="linux"),
        _with(_region, "DryRunOperation", dry_run=True),
    )),
    "RunInstances": Spec(_run_request("RunInstances"), (
        _instance_probe("RunInstances"),
        _snapshot_disk_probe("RunInstances"),
        _with(_run_request("RunInstances"), amount=2, min_amount=1),
        _with(_run_request("RunInstances"), "DryRunOperation", dry_run=True),
    )),
    "CreateInstance": Spec(_run_request("CreateInstance"), (
        _instance_probe("CreateInstance"),
        _snapshot_disk_probe("CreateInstance"),
        _with(_run_request("CreateInstance"), "DryRunOperation", dry_run=True),
    )),
    "DescribeInstances": Spec(_region, (
        _with(_region, instance_ids=lambda w: _json_ids([w.running()]), status="Running",
              zone_id=ZONE, instance_name="i-*", image_id=lambda w: w.image_id,
              instance_type=TYPE, tag=_tag("DescribeInstancesRequestTag"), page_number=1,
              page_size=10),
        _with(_region, max_results=10, next_token=""),
        _with(_region, "DryRunOperation", dry_run=True),
    )),
    "DescribeInstanceStatus": Spec(_region, (
        _with(_region, instance_id=lambda w: [w.running()], zone_id=ZONE, page_number=1,
              page_size=10),
    )),
    "StartInstance": Spec(lambda w: {"instance_id": w.stopped()}, (
        _with(lambda w: {"instance_id": w.stopped()}, "DryRunOperation", dry_run=True),
    )),
    "StopInstance": Spec(lambda w: {"instance_id": w.running()}, (
        _with(lambda w: {"instance_id": w.running()}, force_stop=False,
              stopped_mode="StopCharging"),
        _with(lambda w: {"instance_id": w.running()}, "DryRunOperation", dry_run=True),
    )),
    "StartInstances": Spec(lambda w: {"region_id": REGION, "instance_id": [w.stopped()]}, (
        _with(lambda w: {"region_id": REGION, "instance_id": [w.stopped()]},
              batch_optimization="SuccessFirst"),
        _with(lambda w: {"region_id": REGION, "instance_id": [w.stopped()]},
              "DryRunOperation", dry_run=True),
    )),
    "StopInstances": Spec(lambda w: {"region_id": REGION, "instance_id": [w.running()]}, (
        _with(lambda w: {"region_id": REGION, "instance_id": [w.running()]},
              force_stop=True, stopped_mode="KeepCharging", batch_optimization="AllTogether"),
        _with(lambda w: {"region_id": REGION, "instance_id": [w.running()]},
              "DryRunOperation", dry_run=True),
    )),
    "RebootInstance": Spec(lambda w: {"instance_id": w.running()}, (
        _with(lambda w: {"instance_id": w.running()}, force_stop=True),
        _with(lambda w: {"instance_id": w.running()}, "DryRunOperation", dry_run=True),
    )),
    "DeleteInstance": Spec(lambda w: {"instance_id": w.stopped()}, (
        _with(lambda w: {"instance_id": w.running()}, force=True),
    )),
    "CreateDisk": Spec(lambda w: {"region_id": REGION, "zone_id": ZONE, "size": 20}, (
        _with(lambda w: {"region_id": REGION, "zone_id": ZONE, "size": 20},
              disk_category="cloud_essd", disk_name="conformance", description="a disk",
              tag=_tag("CreateDiskRequestTag"),
              client_token=lambda w: f"token-{time.monotonic_ns()}"),
        _with(lambda w: {"region_id": REGION, "zone_id": ZONE, "size": 20},
              snapshot_id=lambda w: w.snapshot(w.available_disk())),
    )),
    "CreateImage": Spec(lambda w: {"region_id": REGION,
                                   "snapshot_id": w.snapshot(w.disks(w.stopped())[0])}, (
        _with(lambda w: {"region_id": REGION, "instance_id": w.running()},
              image_name="conformance", description="a custom image", platform="Debian",
              architecture="x86_64", image_version="1",
              client_token=lambda w: f"token-{time.monotonic_ns()}"),
        _with(lambda w: {"region_id": REGION,
                         "snapshot_id": w.snapshot(w.disks(w.stopped())[1])},
              "OperationDenied"),  # a data disk's snapshot
        _with(_region, "UnsupportedParameter", snapshot_id="s-x", image_family="f"),
    )),
    "DeleteImage": Spec(lambda w: {"region_id": REGION, "image_id": w.custom_image()}, (
        _with(_used_image, "ImageUsingByInstance"),
        _with(_used_image, force=True),
    )),
    "AttachDisk": Spec(lambda w: {"instance_id": w.stopped(), "disk_id": w.available_disk()},
                       (_with(lambda w: {"instance_id": w.stopped(),
                                         "disk_id": w.available_disk()},
                              delete_with_instance=True),)),
    "DetachDisk": Spec(lambda w: (lambda i: {"instance_id": i, "disk_id": w.disks(i)[1]})(
        w.stopped())),
    "DeleteDisk": Spec(lambda w: {"disk_id": w.available_disk()}),
    "ResizeDisk": Spec(lambda w: {"disk_id": w.available_disk(), "new_size": 30}, (
        _with(lambda w: {"disk_id": w.available_disk(), "new_size": 30}, type="offline",
              client_token=lambda w: f"token-{time.monotonic_ns()}"),
    )),
    "ReInitDisk": Spec(lambda w: {"disk_id": w.disks(w.stopped())[0]}, (
        _with(lambda w: {"disk_id": w.disks(w.stopped())[0]}, auto_start_instance=True),
    )),
    "ReplaceSystemDisk": Spec(lambda w: {"instance_id": w.stopped(), "image_id": w.image_id}, (
        _with(lambda w: {"instance_id": w.stopped(), "image_id": w.image_id},
              system_disk=lambda w: _m().ReplaceSystemDiskRequestSystemDisk(size=20),
              client_token=lambda w: f"token-{time.monotonic_ns()}"),
    )),
    "DescribeDisks": Spec(_region, (
        _with(_region, disk_ids=lambda w: _json_ids([w.available_disk()]), disk_type="data",
              status="Available", category="cloud_essd", zone_id=ZONE, disk_name="d",
              tag=_tag("DescribeDisksRequestTag"), page_number=1, page_size=10),
        _with(_region, instance_id=lambda w: w.running(), max_results=10, next_token=""),
        _with(_region, "DryRunOperation", dry_run=True),
    )),
    "CreateSnapshot": Spec(lambda w: {"disk_id": w.available_disk()}, (
        _with(lambda w: {"disk_id": w.available_disk()}, snapshot_name="conformance",
              description="a snapshot", retention_days=3, tag=_tag("CreateSnapshotRequestTag"),
              client_token=lambda w: f"token-{time.monotonic_ns()}"),
    )),
    "DescribeSnapshotFiles": Spec(lambda w: {"RegionId": REGION,
                                             "SnapshotId": _reset_items(w)[1][0][1]},
                                  extension=True),
    "RestoreSnapshotFiles": Spec(lambda w: (lambda i: {
        "RegionId": REGION, "InstanceId": i[0], "SnapshotId": i[1][0][1],
        "Path.1": "/etc/hostname"})(_reset_items(w)), extension=True,
        # the conformance world's disks hold no file system (its template is a pattern)
        code="OperationDenied.UnsupportedFileSystem"),
    "DescribeSnapshots": Spec(_region, (
        _with(_region, snapshot_ids=lambda w: _json_ids([]), disk_id="d-x", instance_id="i-x",
              status="accomplished", snapshot_name="s", source_disk_type="Data",
              tag=_tag("DescribeSnapshotsRequestTag"), page_number=1, page_size=10),
        _with(_region, max_results=10, next_token=""),
        _with(_region, "DryRunOperation", dry_run=True),
    )),
    "DeleteSnapshot": Spec(lambda w: {"snapshot_id": w.snapshot(w.available_disk())}, (
        _with(lambda w: {"snapshot_id": w.snapshot(w.available_disk())}, force=True),
    )),
    "ModifySnapshotAttribute": Spec(
        lambda w: {"snapshot_id": w.snapshot(w.available_disk())},
        (_with(lambda w: {"snapshot_id": w.snapshot(w.available_disk())},
               snapshot_name="renamed", description="described"),),
        code="NoAttributeToModify"),  # ECS-API.md: nothing to change
    "CreateAutoSnapshotPolicy": Spec(_policy_values, (
        _with(_policy_values, auto_snapshot_policy_name="nightly",
              tag=_tag("CreateAutoSnapshotPolicyRequestTag")),
        _with(_policy_values, "InvalidTimePoints.Malformed", time_points='["24"]'),
    )),
    "ModifyAutoSnapshotPolicyEx": Spec(_a_policy, (
        _with(_a_policy, auto_snapshot_policy_name="weekly", time_points='["3","15"]',
              repeat_weekdays='["6","7"]', retention_days=30),
        _with(_a_policy, "InvalidRetentionDays.Malformed", retention_days=0),
    )),
    "DescribeAutoSnapshotPolicyEx": Spec(_region, (
        _with(_region, auto_snapshot_policy_id=lambda w: w.policy(),
              auto_snapshot_policy_name="p", tag=_tag("DescribeAutoSnapshotPolicyExRequestTag"),
              page_number=1, page_size=10),
    )),
    "DeleteAutoSnapshotPolicy": Spec(_a_policy, (
        _with(lambda w: {"region_id": REGION, "auto_snapshot_policy_id": "sp-nope"},
              "InvalidAutoSnapshotPolicyId.NotFound"),
    )),
    "ApplyAutoSnapshotPolicy": Spec(lambda w: {**_a_policy(w), **_a_disk(w)}, (
        _with(lambda w: {**_a_policy(w), "disk_ids": '["d-nope"]'}, "InvalidDiskId.NotFound"),
    )),
    "CancelAutoSnapshotPolicy": Spec(_a_disk, (
        _with(_a_disk, auto_snapshot_policy_id=lambda w: w.policy()),
    )),
    "CreateSnapshotGroup": Spec(lambda w: {"region_id": REGION, "instance_id": w.stopped()}, (
        _with(lambda w: {"region_id": REGION, "instance_id": w.stopped()}, name="conformance",
              description="an instance snapshot", tag=_tag("CreateSnapshotGroupRequestTag")),
        _with(lambda w: (lambda i: {"region_id": REGION, "instance_id": i,
                                    "exclude_disk_id": w.disks(i)[1:]})(w.stopped())),
        _with(lambda w: (lambda i: {"region_id": REGION, "instance_id": i,
                                    "disk_id": w.disks(i)[:1]})(w.stopped())),
    )),
    "DescribeSnapshotGroups": Spec(_region, (
        _with(_region, snapshot_group_id=["ssg-x"], instance_id="i-x", name="n",
              status=["accomplished"], max_results=10, next_token=""),
    )),
    "ModifySnapshotGroup": Spec(
        lambda w: {"region_id": REGION, "snapshot_group_id": w.group(w.stopped())[0]},
        (_with(lambda w: {"region_id": REGION, "snapshot_group_id": w.group(w.stopped())[0]},
               name="renamed", description="described"),)),
    "DeleteSnapshotGroup": Spec(
        lambda w: {"region_id": REGION, "snapshot_group_id": w.group(w.stopped())[0]}),
    "ResetDisks": Spec(_reset_disks, (_with(_reset_disks, "DryRunOperation", dry_run=True),)),
    "ResetDisk": Spec(lambda w: (lambda i: {"disk_id": i[1][0][0], "snapshot_id": i[1][0][1]})(
        _reset_items(w))),
    "PreviewResetDisks": Spec(lambda w: (lambda i: {
        "RegionId": REGION, "Disk.1.DiskId": i[1][0][0], "Disk.1.SnapshotId": i[1][0][1]})(
        _reset_items(w)), extension=True),
    "DescribeTasks": Spec(_region, (
        _with(_region, task_ids=lambda w: w.task(), task_action="CreateSnapshotGroup",
              task_status="Finished", page_number=1, page_size=10),
    )),
    "DescribeTaskAttribute": Spec(lambda w: {"region_id": REGION, "task_id": w.task()}),
    "RunCommand": Spec(lambda w: {"region_id": REGION, "type": "RunShellScript",
                                  "command_content": "echo hello",
                                  "instance_id": [w.running()]}, (
        _with(lambda w: {"region_id": REGION, "type": "RunShellScript",
                         "command_content": "ZWNobyBoZWxsbw==", "instance_id": [w.running()]},
              content_encoding="Base64", name="hello", timeout=30, working_dir="/tmp",
              repeat_mode="Once", timed=False),
    )),
    "DescribeInvocationResults": Spec(_region, (
        _with(_region, invoke_id=lambda w: w.invocation()[0], instance_id="i-x",
              command_id="c-x", invoke_record_status="Finished", content_encoding="PlainText",
              page_number=1, page_size=10),
        _with(_region, max_results=10, next_token=""),
    )),
    "DescribeInvocations": Spec(_region, (
        _with(_region, invoke_id=lambda w: w.invocation()[0], instance_id="i-x",
              command_id="c-x", content_encoding="PlainText", page_number=1, page_size=10,
              invoke_status="Success", command_type="RunShellScript", command_name="n",
              include_output=True),
        _with(_region, max_results=10, next_token=""),
    )),
}

# Required by ECS (shared/reference/ECS-API.md) where the SDK's model leaves them
# conditional: ecsnap has no launch templates or image families (CreateDisk: Size, or
# SnapshotId, which a probe sends).
ECS_REQUIRED: dict[str, set[str]] = {
    "RunInstances": {"image_id", "instance_type"},
    "CreateInstance": {"image_id"},
    "CreateSnapshotGroup": {"instance_id"},
    "RunCommand": {"instance_id"},
    "ReplaceSystemDisk": {"image_id"},
    "CreateDisk": {"zone_id", "size"},
    "CreateImage": {"snapshot_id"},  # or InstanceId, which a probe sends
}


@pytest.fixture(scope="module")
def world(live: Live) -> World:
    return World(live)


def test_every_action_has_a_conformance_spec() -> None:
    assert set(SPECS) == set(ACTIONS)
    for action, spec in SPECS.items():
        assert spec.extension == (request_class(action) is None), action


# ------------------------------------------------------------------ the minimal request


SDK_ACTIONS = sorted(a for a in ACTIONS if not SPECS[a].extension)


@pytest.mark.parametrize(("action", "flavour"), [
    (a, f) for a in SDK_ACTIONS for f in ("new", "old") if f == "new" or old_sdk_has(a)])
def test_minimal_request_through_the_sdk(live: Live, world: World, action: str,
                                         flavour: str) -> None:
    """Only what ECS requires; the answer reads into the SDK's typed response model (the
    old SDK for the actions it has)."""
    cls = request_class(action)
    values = SPECS[action].required(world)
    assert set(values) == required_fields(cls) | ECS_REQUIRED.get(action, set()), \
        "the minimal request is exactly what the SDK's model and ECS require"
    sdk = NewSdk(live) if flavour == "new" else OldSdk(live)
    if SPECS[action].code:
        with pytest.raises(SdkError) as caught:
            sdk.send(action, cls(**values))
        assert caught.value.code == SPECS[action].code
        return
    raw, body = sdk.send(action, cls(**values))
    assert_typed(body, raw, action)


def test_extension_preview_reset_disks(live: Live, world: World) -> None:
    raw = NewSdk(live).send_extension("PreviewResetDisks",
                                      SPECS["PreviewResetDisks"].required(world))
    assert raw["Allowed"] is True
    [disk] = raw["Disks"]["Disk"]
    assert isinstance(disk["BytesWrittenSinceSnapshot"], int)
    assert disk["Failures"] == {"Failure": []}


def test_extension_restore_snapshot_files(live: Live, world: World) -> None:
    """Its parameters reach the service through the SDK's generic call (the conformance
    world's disks hold no file system: the answer is that ECS-style error)."""
    spec = SPECS["RestoreSnapshotFiles"]
    with pytest.raises(SdkError) as caught:
        NewSdk(live).send_extension("RestoreSnapshotFiles", spec.required(world))
    assert (caught.value.code, caught.value.status) == (spec.code, 403)


def test_region_is_inferred_where_the_sdk_cannot_send_it(live: Live) -> None:
    """The new SDK's DescribeInstanceTypesRequest has no RegionId: the default region's
    catalogue is answered (settings `default_region`)."""
    assert "region_id" not in field_types(request_class("DescribeInstanceTypes"))
    _, body = NewSdk(live).send("DescribeInstanceTypes",
                                sdk_models().DescribeInstanceTypesRequest())
    assert TYPE in [t.instance_type_id for t in body.instance_types.instance_type]


# ------------------------------------------------------------------ every SDK parameter


@pytest.mark.parametrize("action", SDK_ACTIONS)
def test_every_sdk_parameter_is_read_or_decided(live: Live, world: World,
                                                action: str) -> None:
    """The optional parameters ecsnap implements are read (seen by the server); every other
    parameter of the SDK's model is declared cosmetic, refused or a constant filter."""
    sdk = NewSdk(live)
    cls = request_class(action)
    for probe in SPECS[action].probes:
        values = probe.make(world)
        try:
            raw, body = sdk.send(action, cls(**values))
        except SdkError as exc:
            assert exc.code == probe.code, (values, exc)
        else:
            assert probe.code is None, values
            assert_typed(body, raw, action)
    if not SPECS[action].probes:  # the minimal request reads what the action needs
        sdk.send(action, cls(**SPECS[action].required(world)))
    policy = POLICIES[action]
    decided = policy.ignored | set(policy.refused) | set(policy.constant) | set(COMMON_REFUSED)
    unread = sdk_parameters(action) - live.reads.get(action, set()) - decided
    assert unread == set(), "SDK parameters ecsnap would silently ignore"
    every = frozenset().union(*(sdk_parameters(a) for a in SDK_ACTIONS))
    assert policy.ignored | set(policy.refused) | set(policy.constant) <= \
        every | COMMON_IGNORED, "the policy names parameters no SDK model has"


def _unsupported_value(t: Any, accepted: tuple[str, ...]) -> Any:
    if t is bool:
        return "true" not in accepted
    if t is int:
        return 7
    if t is float:
        return 1.5
    return "unsupported-value"


REFUSALS = [(a, name) for a in SDK_ACTIONS
            for name in sorted((set(POLICIES[a].refused) | set(COMMON_REFUSED)) &
                               sdk_parameters(a))]


@pytest.mark.parametrize(("action", "name", "flavour"), [
    (a, n, f) for a, n in REFUSALS for f in ("new", "old") if f == "new" or old_sdk_has(a)])
def test_refused_parameter(live: Live, world: World, action: str, name: str,
                           flavour: str) -> None:
    """A parameter that would change the meaning of the call is refused, naming it."""
    cls = request_class(action)
    rule = POLICIES[action].refused.get(name) or COMMON_REFUSED[name]
    value = _unsupported_value(type_at(cls, name), rule.accepted)
    request = with_parameter(cls(**SPECS[action].required(world)), name, value)
    sdk = NewSdk(live) if flavour == "new" else OldSdk(live)
    with pytest.raises(SdkError) as caught:
        sdk.send(action, request)
    assert (caught.value.code, caught.value.status) == ("UnsupportedParameter", 400)
    assert f'"{concrete(name)}"' in caught.value.message


@pytest.mark.parametrize("action", [a for a in SDK_ACTIONS
                                    if any(r.accepted for r in POLICIES[a].refused.values())])
def test_refused_parameters_pass_with_the_value_ecsnap_implements(live: Live, world: World,
                                                                  action: str) -> None:
    cls = request_class(action)
    request = cls(**SPECS[action].required(world))
    for name, rule in POLICIES[action].refused.items():
        if rule.accepted and name in sdk_parameters(action):
            value: Any = rule.accepted[0]
            if type_at(cls, name) is bool:
                value = value == "true"
            request = with_parameter(request, name, value)
    _, body = NewSdk(live).send(action, request)
    assert body is not None


# ------------------------------------------------------------------ lists


@dataclass(frozen=True)
class Listing:
    items: str  # the path of the item list in the answer
    key: str  # the field that identifies an item
    page: str = ""  # the path of the object holding the page fields ("": the top)


LISTINGS: dict[str, Listing] = {
    "DescribeRegions": Listing("Regions.Region", "RegionId"),
    "DescribeZones": Listing("Zones.Zone", "ZoneId"),
    "DescribeInstanceTypes": Listing("InstanceTypes.InstanceType", "InstanceTypeId"),
    "DescribeImages": Listing("Images.Image", "ImageId"),
    "DescribeInstances": Listing("Instances.Instance", "InstanceId"),
    "DescribeInstanceStatus": Listing("InstanceStatuses.InstanceStatus", "InstanceId"),
    "DescribeDisks": Listing("Disks.Disk", "DiskId"),
    "DescribeSnapshots": Listing("Snapshots.Snapshot", "SnapshotId"),
    "DescribeAutoSnapshotPolicyEx": Listing("AutoSnapshotPolicies.AutoSnapshotPolicy",
                                            "AutoSnapshotPolicyId"),
    "DescribeSnapshotGroups": Listing("SnapshotGroups.SnapshotGroup", "SnapshotGroupId"),
    "DescribeTasks": Listing("TaskSet.Task", "TaskId"),
    "DescribeInvocationResults": Listing("Invocation.InvocationResults.InvocationResult",
                                         "InvokeId", "Invocation"),
    "DescribeInvocations": Listing("Invocations.Invocation", "InvokeId"),
}


def _at(data: Any, path: str) -> Any:
    for part in path.split(".") if path else []:
        data = data[part]
    return data


def test_every_list_action_is_listed() -> None:
    lists = {a for a in SDK_ACTIONS if a.startswith("Describe") and
             a not in ("DescribeTaskAttribute",)}
    assert set(LISTINGS) == lists


CONSTANT_FILTERS = [(a, name) for a in SDK_ACTIONS for name in sorted(POLICIES[a].constant)]


@pytest.mark.parametrize(("action", "name"), CONSTANT_FILTERS)
def test_constant_filter(live: Live, world: World, action: str, name: str) -> None:
    """A filter on a value every resource of ecsnap has: another value matches nothing, the
    value itself everything."""
    cls = request_class(action)
    listing = LISTINGS[action]
    sdk = NewSdk(live)
    base = cls(**SPECS[action].required(world))
    everything, _ = sdk.send(action, base)
    matching = POLICIES[action].constant[name]
    t = type_at(cls, name)
    other: Any = "no-such-value" if t is str else (7 if t is int else True)
    if t is bool and "true" in matching:
        other = False
    raw, body = sdk.send(action, with_parameter(base, name, other))
    assert_typed(body, raw, action)
    assert _at(raw, listing.items) == []
    if "TotalCount" in _at(raw, listing.page):
        assert _at(raw, listing.page)["TotalCount"] == 0
    if matching:
        value: Any = matching[0] if t is str else (matching[0] == "true" if t is bool else
                                                    int(matching[0]))
        raw, _ = sdk.send(action, with_parameter(base, name, value))
        assert len(_at(raw, listing.items)) == len(_at(everything, listing.items))


def _styles(action: str) -> list[str]:
    fields = field_types(request_class(action))
    styles = []
    if {"page_number", "page_size"} <= set(fields):
        styles.append("page")
    if {"next_token", "max_results"} <= set(fields):
        styles.append("token")
    return styles


PAGED = [(a, style) for a in sorted(LISTINGS) for style in _styles(a)]


def test_paging_styles_match_ecs() -> None:
    """ECS-API.md §3, and the SDK's models, which add NextToken to more lists."""
    styles = {a: _styles(a) for a in LISTINGS}
    assert styles["DescribeInstances"] == styles["DescribeDisks"] == \
        styles["DescribeSnapshots"] == ["page", "token"]
    assert styles["DescribeSnapshotGroups"] == ["token"]
    assert styles["DescribeTasks"] == styles["DescribeImages"] == ["page"]


def _three(make: Callable[[], str]) -> list[str]:
    return [make(), make(), make()]


def _invocations_of_one_instance(w: World) -> Values:
    instance_id = w.running()
    for _ in range(3):
        w.invocation(instance_id)
    return {"instance_id": instance_id}


def _groups_of_one_instance(w: World) -> Values:
    instance_id = w.stopped()
    for _ in range(3):
        w.group(instance_id)
    return {"instance_id": instance_id}


def _snapshots_of_one_disk(w: World) -> Values:
    disk_id = w.available_disk()
    for _ in range(3):
        w.snapshot(disk_id)
    return {"disk_id": disk_id}


def _policies_of_one_name(w: World) -> Values:
    name = f"paged-{time.monotonic_ns()}"
    for _ in range(3):
        w.policy(name)
    return {"auto_snapshot_policy_name": name}


# Filters that select a few items made for the paging test (the module's server holds
# many more); None: the whole list (a short one).
PAGING_SCOPE: dict[str, Callable[[World], Values] | None] = {
    "DescribeRegions": None, "DescribeZones": None, "DescribeInstanceTypes": None,
    "DescribeImages": None,
    "DescribeInstances": lambda w: {"instance_ids": _json_ids(_three(w.running))},
    "DescribeInstanceStatus": lambda w: {"instance_id": _three(w.running)},
    "DescribeDisks": lambda w: {"disk_ids": _json_ids(_three(w.available_disk))},
    "DescribeSnapshots": _snapshots_of_one_disk,
    "DescribeAutoSnapshotPolicyEx": _policies_of_one_name,
    "DescribeSnapshotGroups": _groups_of_one_instance,
    "DescribeTasks": lambda w: {"task_ids": ",".join(_three(w.task))},
    "DescribeInvocationResults": _invocations_of_one_instance,
    "DescribeInvocations": _invocations_of_one_instance,
}


@pytest.mark.parametrize(("action", "style"), PAGED)
def test_paging(live: Live, world: World, action: str, style: str) -> None:
    """Walking the pages one or two items at a time gives every item once."""
    cls = request_class(action)
    listing = LISTINGS[action]
    sdk = NewSdk(live)
    scope = PAGING_SCOPE[action]
    base = {**SPECS[action].required(world), **(scope(world) if scope else {})}
    raw, _ = sdk.send(action, cls(**base))
    everything = [i[listing.key] for i in _at(raw, listing.items)]
    assert 2 <= len(everything) <= 10, "a short list, in one default page"
    seen: list[str] = []
    size = 2 if len(everything) > 2 else 1
    if style == "page":
        number = 1
        while True:
            raw, body = sdk.send(action, cls(**base, page_number=number, page_size=size))
            assert_typed(body, raw, action)
            page = _at(raw, listing.page)
            assert (page["PageNumber"], page["PageSize"]) == (number, size)
            assert page["TotalCount"] == len(everything)
            items = _at(raw, listing.items)
            if not items:
                break
            seen += [i[listing.key] for i in items]
            number += 1
    else:
        token = ""
        while True:
            raw, body = sdk.send(action, cls(**base, max_results=size, next_token=token or None))
            assert_typed(body, raw, action)
            page = _at(raw, listing.page)
            assert isinstance(page["NextToken"], str)
            items = _at(raw, listing.items)
            assert 1 <= len(items) <= size
            seen += [i[listing.key] for i in items]
            token = page["NextToken"]
            if not token:
                break
    assert sorted(seen) == sorted(everything)


def test_old_sdk_list_shapes(live: Live) -> None:
    """Sanity of the generated old-SDK path: a plain list call answers typed."""
    raw, body = OldSdk(live).send("DescribeRegions", sdk_models().DescribeRegionsRequest())
    assert body.regions.region[0].region_id == REGION == raw["Regions"]["Region"][0]["RegionId"]


def test_resize_disk_client_token_replays(live: Live, world: World) -> None:
    """ResizeDisk's ClientToken: a retry answers as the first call did."""
    request = sdk_models().ResizeDiskRequest(disk_id=world.available_disk(), new_size=30,
                                             client_token=f"resize-{time.monotonic_ns()}")
    sdk = NewSdk(live)
    sdk.send("ResizeDisk", request)
    sdk.send("ResizeDisk", request)  # not InvalidDiskSize.TooSmall: the disk is 30 GiB
