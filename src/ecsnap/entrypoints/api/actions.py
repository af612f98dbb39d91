"""The ECS actions: each decodes its parameters, calls one service function, and returns
the response fields (the app adds RequestId and renders JSON or XML).

Every action states its parameter policy beside it (`@action(..., ignored=..., refused=...,
constant=...)`) for the parameters the official SDKs offer that it does not implement:

* ``ignored``: cosmetic (networking, billing hints, performance tiers, RAM identities):
  accepted and without effect, as a small system may;
* ``refused``: they would change the meaning of the call; sent with a value other than the
  one ecsnap implements, the call is refused with ``400 UnsupportedParameter`` naming them,
  before anything is done, never silently ignored;
* ``constant``: filters on an attribute every resource of ecsnap has with the same value
  (``Encrypted`` false, ``InstanceChargeType`` PostPaid): a filter naming another value
  matches nothing, exactly as ECS would answer.

``tests/e2e/test_conformance.py`` checks, from the SDK's own request models, that every
parameter the SDK can send is read, ignored by decision, refused or a constant filter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ecsnap.domain.errors import EcsError, dry_run_passed
from ecsnap.domain.model import Image
from ecsnap.entrypoints.api import views
from ecsnap.entrypoints.api.params import Params, pattern
from ecsnap.service import (
    commands,
    disks,
    idempotency,
    images,
    inspect,
    instances,
    listing,
    policies,
    regions,
    restore_files,
    rollback,
    snapshots,
    tasks_view,
)
from ecsnap.service.context import ServiceContext


@dataclass(frozen=True)
class Refused:
    """A parameter ecsnap does not implement: only the `accepted` values (those that change
    nothing, compared in any letter case) or a blank value pass."""

    why: str
    accepted: tuple[str, ...] = ()


FALSE = ("false",)

# RAM caller identities: ecsnap knows the account by the AccessKey that signed the request
COMMON_IGNORED = frozenset({"OwnerId", "OwnerAccount", "ResourceOwnerAccount",
                            "ResourceOwnerId"})
COMMON_REFUSED: Mapping[str, Refused] = {
    "ResourceGroupId": Refused("ecsnap has no resource groups"),
}


@dataclass(frozen=True)
class Policy:
    """What an action does with the SDK parameters it does not read (module docstring)."""

    ignored: frozenset[str] = frozenset()
    refused: Mapping[str, Refused] = field(default_factory=dict)
    # filter -> the values that match every resource (none: no resource matches any value)
    constant: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def check(self, p: Params) -> None:
        """``UnsupportedParameter`` naming every refused parameter given a value that is not
        accepted."""
        found = []
        for name, value in p.given():
            rule = self.refused.get(pattern(name)) or COMMON_REFUSED.get(pattern(name))
            if rule is not None and value.lower() not in {a.lower() for a in rule.accepted}:
                accepted = " or ".join(f'"{a}"' for a in rule.accepted)
                found.append(f'"{name}" ({rule.why}' +
                             (f"; only {accepted} is accepted)" if accepted else ")"))
        if found:
            raise EcsError("UnsupportedParameter", "ecsnap does not support the parameter "
                           + ", ".join(found) + ".", 400)

    def none_match(self, p: Params) -> bool:
        """True when a constant filter names a value no resource has."""
        return any(value.lower() not in self.constant[pattern(name)]
                   for name, value in p.given() if pattern(name) in self.constant)


NO_POLICY = Policy()


@dataclass
class Call:
    ctx: ServiceContext
    account_id: str
    p: Any  # entrypoints.api.params.Params
    endpoint: str
    policy: Policy = NO_POLICY

    @property
    def region(self) -> str:
        return str(self.p.str("RegionId", required=True))

    @property
    def region_or_default(self) -> str:
        """RegionId where ECS infers it (the new SDK's request has no RegionId): else the
        default region of the settings (`default_region`) when it exists, else the first
        region."""
        given = self.p.str("RegionId")
        if given:
            return str(given)
        default = self.ctx.settings.default_region
        known = [r.id for r in regions.describe_regions(self.ctx)]
        return default if default in known or not known else known[0]

    def none_match(self) -> bool:
        return self.policy.none_match(self.p)


Action = Callable[[Call], dict[str, Any]]
ACTIONS: dict[str, Action] = {}
POLICIES: dict[str, Policy] = {}


def action(*names: str, ignored: tuple[str, ...] = (),
           refused: Mapping[str, Refused] | None = None,
           constant: Mapping[str, tuple[str, ...]] | None = None,
           ) -> Callable[[Action], Action]:
    policy = Policy(frozenset(ignored) | COMMON_IGNORED, dict(refused or {}),
                    {k: tuple(v.lower() for v in values)
                     for k, values in (constant or {}).items()})

    def register(fn: Action) -> Action:
        def run(c: Call) -> dict[str, Any]:
            policy.check(c.p)
            return fn(replace(c, policy=policy))

        run.__name__ = run.__qualname__ = fn.__name__
        run.__doc__ = fn.__doc__
        for name in names:
            ACTIONS[name] = run
            POLICIES[name] = policy
        return fn
    return register


def _page_args(p: Any, token: bool = True) -> dict[str, Any]:
    args = {"page_number": p.int("PageNumber", min=1),
            "page_size": p.int("PageSize", min=1, max=100)}
    if token:
        args.update(next_token=p.str("NextToken") or None,
                    max_results=p.int("MaxResults", min=1, max=500))
    return args


def _dry_run(p: Any) -> bool:
    return bool(p.bool("DryRun", default=False))


def _empty_page(page_number: int | None, page_size: int | None) -> listing.Page[Any]:
    """The answer of a filter nothing matches (a constant filter naming another value)."""
    number, size = listing.check_page(page_number, page_size)
    return listing.Page([], 0, number, size, "")


# ------------------------------------------------------------------ regions and images


@action("DescribeRegions", ignored=("AcceptLanguage", "InstanceChargeType", "ResourceType"))
def describe_regions(c: Call) -> dict[str, Any]:
    return {"Regions": {"Region": [views.region(r, c.endpoint)
                                   for r in regions.describe_regions(c.ctx)]}}


@action("DescribeZones", ignored=("AcceptLanguage", "InstanceChargeType", "SpotStrategy",
                                  "Verbose"))
def describe_zones(c: Call) -> dict[str, Any]:
    region, zones = regions.describe_zones(c.ctx, c.region)
    names = [t.name for t in region.catalogue()]
    return {"Zones": {"Zone": [views.zone(z, names) for z in zones]}}


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


_NO_SUCH_TYPES = Refused("ecsnap's instance types have none of these features")


@action("DescribeInstanceTypes", ignored=("AdditionalAttributes.N",),
        refused={name: _NO_SUCH_TYPES for name in (
            "InstanceCategories.N", "InstanceCategory", "InstanceFamilyLevel",
            "LocalStorageCategories.N", "LocalStorageCategory", "MaximumCpuSpeedFrequency",
            "MaximumCpuTurboFrequency", "MaximumGPUAmount", "MinimumBaselineCredit",
            "MinimumCpuSpeedFrequency", "MinimumCpuTurboFrequency", "MinimumDiskQuantity",
            "MinimumEniIpv6AddressQuantity", "MinimumEniPrivateIpAddressQuantity",
            "MinimumEniQuantity", "MinimumEriQuantity", "MinimumGPUAmount",
            "MinimumInitialCredit", "MinimumInstanceBandwidthRx",
            "MinimumInstanceBandwidthTx", "MinimumInstancePpsRx", "MinimumInstancePpsTx",
            "MinimumLocalStorageAmount", "MinimumLocalStorageCapacity",
            "MinimumPrimaryEniQueueNumber", "MinimumQueuePairNumber",
            "MinimumSecondaryEniQueueNumber", "NvmeSupport", "PhysicalProcessorModel",
            "PhysicalProcessorModels.N")},
        constant={"CpuArchitecture": ("X86",), "CpuArchitectures.N": ("X86",),
                  "GPUSpec": (), "GpuSpecs.N": ()})
def describe_instance_types(c: Call) -> dict[str, Any]:
    """The region's catalogue; RegionId is inferred (the new SDK's request has none)."""
    wanted = set(c.p.list("InstanceTypes", max_items=10))
    families = set(c.p.list("InstanceTypeFamilies", max_items=10))
    if family := c.p.str("InstanceTypeFamily"):
        families.add(family)
    cpus = (c.p.int("MinimumCpuCoreCount"), c.p.int("MaximumCpuCoreCount"))
    memory = (c.p.float("MinimumMemorySize"), c.p.float("MaximumMemorySize"))
    types = [] if c.none_match() else [
        t for t in regions.describe_instance_types(c.ctx, c.region_or_default)
        if (not wanted or t.name in wanted) and (not families or t.family in families)
        and _within(t.vcpus, *cpus) and _within(t.memory_mib / 1024, *memory)]
    page = listing.page_list(types, next_token=c.p.str("NextToken") or None,
                             max_results=c.p.int("MaxResults", min=1, max=1600) or 1600,
                             max_page_size=1600)
    return {"InstanceTypes": {"InstanceType": [views.instance_type(t) for t in page.items]},
            "NextToken": page.next_token}


@action("DescribeImages", ignored=("ActionType", "InstanceType", "ShowExpired", "Usable"),
        refused={"Filter.N.Key": Refused("filters by time"),
                 "Filter.N.Value": Refused("filters by time"),
                 "ImageOwnerId": Refused("images shared between accounts"),
                 "IsPublic": Refused("public and private images")},
        constant={"Architecture": ("x86_64",), "OSType": ("linux",), "ImageFamily": (),
                  "IsSupportCloudinit": ("false",), "IsSupportIoOptimized": ("true",),
                  "Tag.N.Key": (), "Tag.N.Value": ()})
def describe_images(c: Call) -> dict[str, Any]:
    """Every image of ecsnap is an x86_64 Linux image without tags; custom images are
    Creating, Available or CreateFailed (Status, Available by default)."""
    if _dry_run(c.p):
        raise dry_run_passed()
    ids_ = c.p.str("ImageId")
    statuses = c.p.csv("Status") or ["Available"]
    page_number = c.p.int("PageNumber", min=1)
    page_size = c.p.int("PageSize", min=1, max=100)
    if c.none_match():
        page = _empty_page(page_number, page_size)
    else:
        page = images.describe_images(c.ctx, c.account_id, c.region,
                                      image_ids=ids_.split(",") if ids_ else None,
                                      name=c.p.str("ImageName") or None,
                                      owner_alias=c.p.str("ImageOwnerAlias") or None,
                                      page_number=page_number, page_size=page_size,
                                      statuses=statuses,
                                      snapshot_id=c.p.str("SnapshotId") or None,
                                      usage=c.p.str("Usage") or None)
    usage = images.image_usage(c.ctx, c.account_id, [m.id for m in page.items])
    return {"Images": {"Image": [views.image(m, usage[m.id]) for m in page.items]},
            "RegionId": c.region,
            **views.page_fields(page, False)}


_NO_MAPPING = Refused("images from a disk mapping; give SnapshotId or InstanceId")


@action("CreateImage", ignored=("Platform", "ImageVersion", "DetectionStrategy",
                                "Features.ImdsSupport"),
        refused={"DiskDeviceMapping.N.Device": _NO_MAPPING,
                 "DiskDeviceMapping.N.DiskType": _NO_MAPPING,
                 "DiskDeviceMapping.N.Size": _NO_MAPPING,
                 "DiskDeviceMapping.N.SnapshotId": _NO_MAPPING,
                 "ImageFamily": Refused("ecsnap has no image families"),
                 "Architecture": Refused("ecsnap's images are x86_64", ("x86_64",)),
                 "BootMode": Refused("a custom image boots as its source image does"),
                 "SecureBootOptions.SecureBootSupport": Refused("secure boot", FALSE),
                 "Tag.N.Key": Refused("image tags"), "Tag.N.Value": Refused("image tags")})
def create_image(c: Call) -> dict[str, Any]:
    """A custom image of a system disk: from SnapshotId, or from InstanceId (which wins, as
    on ECS), whose system disk is snapshotted first."""
    if _dry_run(c.p):
        raise dry_run_passed()
    image_id = images.create_image(c.ctx, c.account_id, c.region,
                                   snapshot_id=c.p.str("SnapshotId") or None,
                                   instance_id=c.p.str("InstanceId") or None,
                                   name=c.p.str("ImageName") or "",
                                   description=c.p.str("Description") or "",
                                   client_token=c.p.str("ClientToken") or None)
    return {"ImageId": image_id}


@action("DeleteImage")
def delete_image(c: Call) -> dict[str, Any]:
    if _dry_run(c.p):
        raise dry_run_passed()
    images.delete_image(c.ctx, c.account_id, c.region, c.p.str("ImageId", required=True),
                        force=c.p.bool("Force", default=False))
    return {}


# ------------------------------------------------------------------ instances


_NO_ENCRYPTION = Refused("ecsnap's disks are not encrypted")
_NO_ROLES = Refused("no RAM roles: ecsnap's disks are not encrypted")
_NO_CREDENTIALS = Refused("ecsnap sets no guest credentials (the demo image's root has no "
                          "password)")
_NO_DEDICATED_HOSTS = Refused("ecsnap has no dedicated hosts")
_NO_LAUNCH_TEMPLATES = Refused("ecsnap has no launch templates")
_NO_AUTO_SNAPSHOTS = Refused("ecsnap has no automatic snapshot policies")

# RunInstances and CreateInstance (each SDK model has a part of these)
_INSTANCE_IGNORED = (
    # networking: ecsnap's instances have no VPC, addresses or network interfaces
    "SecurityGroupId", "SecurityGroupIds.N", "VSwitchId", "PrivateIpAddress",
    "InnerIpAddress", "VlanId", "Ipv6Address.N", "Ipv6AddressCount", "Isp",
    "InternetChargeType", "InternetMaxBandwidthIn", "InternetMaxBandwidthOut",
    "NetworkInterfaceQueueNumber", "NetworkOptions.BandwidthWeighting",
    "NetworkOptions.EnableJumboFrame", "NetworkOptions.EnableNetworkEncryption",
    *(f"NetworkInterface.N.{f}" for f in (
        "DeleteOnRelease", "Description", "InstanceType", "Ipv6Address.N", "Ipv6AddressCount",
        "NetworkCardIndex", "NetworkInterfaceId", "NetworkInterfaceName",
        "NetworkInterfaceTrafficMode", "PrimaryIpAddress", "QueueNumber", "QueuePairNumber",
        "RxQueueSize", "SecondaryPrivateIpAddressCount", "SecurityGroupId",
        "SecurityGroupIds.N", "SourceDestCheck", "TxQueueSize", "VSwitchId")),
    *(f"PrivateDnsNameOptions.{f}" for f in (
        "EnableInstanceIdDnsAAAARecord", "EnableInstanceIdDnsARecord", "EnableIpDnsARecord",
        "EnableIpDnsPtrRecord", "HostnameType")),
    # subscription and spot details, which only apply to the refused PrePaid and spot
    "Period", "PeriodUnit", "AutoRenew", "AutoRenewPeriod", "AutoPay", "SpotPriceLimit",
    "SpotDuration", "SpotInterruptionBehavior",
    # placement and performance hints: one host, no performance tiers
    "DeploymentSetId", "DeploymentSetGroupNo", "HpcClusterId", "ClusterId",
    "PrivatePoolOptions.Id", "PrivatePoolOptions.MatchCriteria", "StorageSetId",
    "StorageSetPartitionNumber", "CreditSpecification", "IoOptimized", "CpuOptions.Core",
    "CpuOptions.ThreadsPerCore", "CpuOptions.Numa", "CpuOptions.TopologyType",
    "ClockOptions.PtpStatus", "SystemDisk.PerformanceLevel", "SystemDisk.BurstingEnabled",
    "SystemDisk.ProvisionedIops", "DataDisk.N.PerformanceLevel",
    "DataDisk.N.BurstingEnabled", "DataDisk.N.ProvisionedIops",
    # services of the cloud around the guest: metadata server, security agent, RAM role
    "HttpEndpoint", "HttpTokens", "HttpPutResponseHopLimit", "SecurityEnhancementStrategy",
    "UseAdditionalService", "RamRoleName",
    # descriptive only
    "SystemDisk.Description", "DataDisk.N.Device",
)
_INSTANCE_REFUSED = {
    "InstanceChargeType": Refused("ecsnap's instances are pay-as-you-go", ("PostPaid",)),
    "SpotStrategy": Refused("ecsnap has no spot instances", ("NoSpot",)),
    "Password": _NO_CREDENTIALS, "KeyPairName": _NO_CREDENTIALS,
    "PasswordInherit": Refused(_NO_CREDENTIALS.why, FALSE),
    "UserData": Refused("ecsnap's guests run no cloud-init user data"),
    "AutoReleaseTime": Refused("ecsnap releases no instance on a schedule"),
    "DeletionProtection": Refused("ecsnap has no deletion protection", FALSE),
    "LaunchTemplateId": _NO_LAUNCH_TEMPLATES, "LaunchTemplateName": _NO_LAUNCH_TEMPLATES,
    "LaunchTemplateVersion": _NO_LAUNCH_TEMPLATES,
    "ImageFamily": Refused("ecsnap has no image families; give ImageId"),
    "ImageOptions.LoginAsNonRoot": Refused("ecsnap's guests log on as root", FALSE),
    "UniqueSuffix": Refused("ecsnap adds no suffix to instance names", FALSE),
    "HostNames.N": Refused("one HostName for every instance of the call"),
    "Affinity": Refused(_NO_DEDICATED_HOSTS.why, ("default",)),
    "Tenancy": Refused(_NO_DEDICATED_HOSTS.why, ("default",)),
    "DedicatedHostId": _NO_DEDICATED_HOSTS, "ManagedHostId": _NO_DEDICATED_HOSTS,
    "SchedulerOptions.DedicatedHostClusterId": _NO_DEDICATED_HOSTS,
    "NodeControllerId": Refused("ecsnap places instances on its own host"),
    "CpuOptions.NestedVirtualization": Refused("no nested virtualization", ("Disabled",)),
    "HibernationOptions.Configured": Refused("ecsnap's instances do not hibernate", FALSE),
    "SecurityOptions.ConfidentialComputingMode": Refused("no confidential computing"),
    "SecurityOptions.TrustedSystemMode": Refused("no trusted systems (vTPM)"),
    "SecurityOptions.EnableSecureBoot": Refused("no Secure Boot", FALSE),
    "SystemDisk.Encrypted": Refused(_NO_ENCRYPTION.why, FALSE),
    "SystemDisk.EncryptAlgorithm": _NO_ENCRYPTION, "SystemDisk.KMSKeyId": _NO_ENCRYPTION,
    "SystemDisk.StorageClusterId": Refused("ecsnap has no dedicated block storage clusters"),
    "SystemDisk.AutoSnapshotPolicyId": _NO_AUTO_SNAPSHOTS,
    "DataDisk.N.Encrypted": Refused(_NO_ENCRYPTION.why, FALSE),
    "DataDisk.N.EncryptAlgorithm": _NO_ENCRYPTION, "DataDisk.N.KMSKeyId": _NO_ENCRYPTION,
    "DataDisk.N.StorageClusterId": Refused("ecsnap has no dedicated block storage clusters"),
    "DataDisk.N.AutoSnapshotPolicyId": _NO_AUTO_SNAPSHOTS,
    "Arn.N.AssumeRoleFor": _NO_ROLES, "Arn.N.RoleType": _NO_ROLES, "Arn.N.Rolearn": _NO_ROLES,
}


def _instance_request(p: Any) -> instances.InstanceRequest:
    data = []
    for d in p.items("DataDisk", max_items=16):
        snapshot_id = d.str("SnapshotId") or ""
        data.append(instances.DataDiskSpec(
            size_gib=d.int("Size") if snapshot_id else d.int("Size", default=20),
            category=d.str("Category") or "cloud_essd",
            name=d.str("DiskName") or "", description=d.str("Description") or "",
            delete_with_instance=d.bool("DeleteWithInstance", default=True),
            snapshot_id=snapshot_id))
    return instances.InstanceRequest(
        image_id=p.str("ImageId", required=True), instance_type=p.str("InstanceType",
                                                                       required=True),
        zone_id=p.str("ZoneId") or "", name=p.str("InstanceName") or "",
        description=p.str("Description") or "",
        system_disk_size_gib=p.int("SystemDisk.Size"),
        system_disk_category=p.str("SystemDisk.Category") or "cloud_essd",
        system_disk_name=p.str("SystemDisk.DiskName") or "",
        data_disks=data, tags=p.tags(), host_name=p.str("HostName") or "")


@action("RunInstances", ignored=_INSTANCE_IGNORED, refused=_INSTANCE_REFUSED)
def run_instances(c: Call) -> dict[str, Any]:
    ids_ = instances.run_instances(
        c.ctx, c.account_id, c.region, _instance_request(c.p),
        amount=c.p.int("Amount", default=1), min_amount=c.p.int("MinAmount"),
        start=True, dry_run=_dry_run(c.p), client_token=c.p.str("ClientToken") or None)
    return {"InstanceIdSets": {"InstanceIdSet": ids_}, "TradePrice": 0.0}


@action("CreateInstance", ignored=_INSTANCE_IGNORED, refused=_INSTANCE_REFUSED)
def create_instance(c: Call) -> dict[str, Any]:
    [instance_id] = instances.run_instances(
        c.ctx, c.account_id, c.region, _instance_request(c.p), start=False,
        dry_run=_dry_run(c.p), client_token=c.p.str("ClientToken") or None)
    return {"InstanceId": instance_id, "TradePrice": 0.0}


@action("DescribeInstances", ignored=("AdditionalAttributes.N", "NeedSaleCycle"),
        refused={"Filter.N.Key": Refused("filters by time"),
                 "Filter.N.Value": Refused("filters by time"),
                 "InstanceTypeFamily": Refused("a filter by instance type family")},
        constant={"DeviceAvailable": ("true",), "InstanceChargeType": ("PostPaid",),
                  "InstanceNetworkType": ("vpc",), "InternetChargeType": ("PayByTraffic",),
                  "IoOptimized": ("true",),
                  # no instance has any of these
                  **{name: () for name in (
                      "EipAddresses", "HpcClusterId", "InnerIpAddresses",
                      "PrivateIpAddresses", "PublicIpAddresses", "RdmaIpAddresses",
                      "Ipv6Address.N", "KeyPairName", "LockReason", "SecurityGroupId",
                      "VSwitchId", "VpcId", "HttpEndpoint", "HttpTokens",
                      "HttpPutResponseHopLimit")}})
def describe_instances(c: Call) -> dict[str, Any]:
    if _dry_run(c.p):
        raise dry_run_passed()
    by_id: dict[str, Image] = {}
    page = instances.describe_instances(
        c.ctx, c.account_id, c.region,
        instance_ids=[] if c.none_match() else c.p.json_list("InstanceIds"),
        status=c.p.str("Status") or None, zone_id=c.p.str("ZoneId") or None,
        name=c.p.str("InstanceName") or None, image_id=c.p.str("ImageId") or None,
        instance_type=c.p.str("InstanceType") or None, tags=c.p.tags(), images=by_id,
        **_page_args(c.p))
    return {"Instances": {"Instance": [views.instance(i, by_id.get(i.image_id))
                                       for i in page.items]},
            **views.page_fields(page, True)}


@action("DescribeInstanceStatus", constant={"ClusterId": ()})
def describe_instance_status(c: Call) -> dict[str, Any]:
    page = instances.describe_instances(
        c.ctx, c.account_id, c.region,
        instance_ids=[] if c.none_match() else c.p.list("InstanceId", max_items=100) or None,
        zone_id=c.p.str("ZoneId") or None, page_number=c.p.int("PageNumber", min=1),
        page_size=c.p.int("PageSize", min=1, max=50))
    return {"InstanceStatuses": {"InstanceStatus": [
        {"InstanceId": i.id, "Status": i.status.value} for i in page.items]},
        **views.page_fields(page, False)}


@action("StartInstance", ignored=("InitLocalDisk",))  # ecsnap has no local disks
def start_instance(c: Call) -> dict[str, Any]:
    instances.start_instance(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                             dry_run=_dry_run(c.p))
    return {}


@action("StopInstance", ignored=("ConfirmStop",),  # for local-disk instances only
        refused={"Hibernate": Refused("ecsnap's instances do not hibernate", FALSE)})
def stop_instance(c: Call) -> dict[str, Any]:
    instances.stop_instance(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                            force=c.p.bool("ForceStop", default=False),
                            stopped_mode=c.p.enum("StoppedMode",
                                                  {"KeepCharging", "StopCharging"}),
                            dry_run=_dry_run(c.p))
    return {}


def _batch(c: Call, run: Callable[[str, bool], object]) -> dict[str, Any]:
    """StartInstances / StopInstances: `run(instance_id, dry_run)` for each. AllTogether
    (the default) acts on none unless every one passes its checks first (a dry run of
    each), as ECS does; SuccessFirst acts on those it can and reports each outcome."""
    ids_ = c.p.list("InstanceId")
    if not ids_:
        raise EcsError("MissingParameter", "The input parameter \"InstanceId.1\" that is "
                       "mandatory for processing this request is not supplied.", 400)
    together = (c.p.str("BatchOptimization") or "AllTogether") == "AllTogether"
    dry = _dry_run(c.p)
    if together:
        for instance_id in ids_:
            try:
                run(instance_id, True)
            except EcsError as exc:
                if exc.code != "DryRunOperation":
                    raise
        if dry:
            raise dry_run_passed()
    before = instances.statuses(c.ctx, c.account_id, ids_)
    results = []
    for instance_id in ids_:
        try:
            run(instance_id, dry)
            results.append((instance_id, "200", "success"))
        except EcsError as exc:
            if together:
                raise
            results.append((instance_id, exc.code, exc.message))
    after = instances.statuses(c.ctx, c.account_id, ids_)
    return {"InstanceResponses": {"InstanceResponse": [
        {"InstanceId": i, "PreviousStatus": before[i], "CurrentStatus": after[i], "Code": code,
         "Message": msg} for i, code, msg in results]}}


@action("StartInstances")
def start_instances(c: Call) -> dict[str, Any]:
    return _batch(c, lambda i, dry: instances.start_instance(c.ctx, c.account_id, i,
                                                             region_id=c.region, dry_run=dry))


@action("StopInstances")
def stop_instances(c: Call) -> dict[str, Any]:
    force = c.p.bool("ForceStop", default=False)
    mode = c.p.enum("StoppedMode", {"KeepCharging", "StopCharging"})
    return _batch(c, lambda i, dry: instances.stop_instance(c.ctx, c.account_id, i,
                                                            region_id=c.region, force=force,
                                                            stopped_mode=mode, dry_run=dry))


@action("RebootInstance")
def reboot_instance(c: Call) -> dict[str, Any]:
    instances.reboot_instance(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                              force=c.p.bool("ForceStop", default=False),
                              dry_run=_dry_run(c.p))
    return {}


@action("DeleteInstance", ignored=("TerminateSubscription", "ForceStop"),
        refused={"DryRun": Refused("DeleteInstance has no dry run in ecsnap", FALSE)})
def delete_instance(c: Call) -> dict[str, Any]:
    instances.delete_instance(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                              force=c.p.bool("Force", default=False))
    return {}


# ------------------------------------------------------------------ disks


@action("CreateDisk", ignored=("PerformanceLevel", "BurstingEnabled", "ProvisionedIops",
                               "StorageSetId", "StorageSetPartitionNumber"),
        refused={"InstanceId": Refused("ecsnap creates standalone disks; attach them with "
                                       "AttachDisk"),
                 "Encrypted": Refused(_NO_ENCRYPTION.why, FALSE),
                 "EncryptAlgorithm": _NO_ENCRYPTION, "KMSKeyId": _NO_ENCRYPTION,
                 "Arn.N.AssumeRoleFor": _NO_ROLES, "Arn.N.RoleType": _NO_ROLES,
                 "Arn.N.Rolearn": _NO_ROLES,
                 "MultiAttach": Refused("ecsnap's disks attach to one instance",
                                        ("Disabled",)),
                 "StorageClusterId": Refused("ecsnap has no dedicated block storage "
                                             "clusters"),
                 "AdvancedFeatures": Refused("no advanced disk features")})
def create_disk(c: Call) -> dict[str, Any]:
    disk_id = disks.create_disk(c.ctx, c.account_id, c.region, size_gib=c.p.int("Size"),
                                zone_id=c.p.str("ZoneId") or None,
                                category=c.p.str("DiskCategory") or "cloud_essd",
                                name=c.p.str("DiskName") or "",
                                description=c.p.str("Description") or "", tags=c.p.tags(),
                                snapshot_id=c.p.str("SnapshotId") or None,
                                client_token=c.p.str("ClientToken") or None)
    return {"DiskId": disk_id}


@action("AttachDisk", ignored=("Device", "Password", "KeyPairName"),  # Device: deprecated
        refused={"Bootable": Refused("ecsnap attaches data disks only", FALSE),
                 "Force": Refused("forced attachment of regional disks", FALSE)})
def attach_disk(c: Call) -> dict[str, Any]:
    disks.attach_disk(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                      c.p.str("DiskId", required=True),
                      delete_with_instance=c.p.bool("DeleteWithInstance", default=False))
    return {}


@action("DetachDisk", ignored=("DeleteWithInstance",))  # for system disks, not detached
def detach_disk(c: Call) -> dict[str, Any]:
    disks.detach_disk(c.ctx, c.account_id, c.p.str("InstanceId", required=True),
                      c.p.str("DiskId", required=True))
    return {}


@action("DeleteDisk")
def delete_disk(c: Call) -> dict[str, Any]:
    disks.delete_disk(c.ctx, c.account_id, c.p.str("DiskId", required=True))
    return {}


@action("ResizeDisk")
def resize_disk(c: Call) -> dict[str, Any]:
    disk_id, size = c.p.str("DiskId", required=True), c.p.int("NewSize", required=True)
    resize_type = c.p.str("Type") or "offline"

    def resize() -> dict[str, Any]:
        disks.resize_disk(c.ctx, c.account_id, disk_id, size, resize_type=resize_type)
        return {}

    # a retry with the same ClientToken answers as the first call (the disk grew once)
    return idempotency.once(c.ctx, c.account_id, "ResizeDisk", c.p.str("ClientToken") or None,
                            {"disk": disk_id, "size": size, "type": resize_type}, resize)


@action("ReInitDisk", ignored=("SecurityEnhancementStrategy",),
        refused={"Password": _NO_CREDENTIALS, "KeyPairName": _NO_CREDENTIALS})
def reinit_disk(c: Call) -> dict[str, Any]:
    disks.reinit_disk(c.ctx, c.account_id, c.p.str("DiskId", required=True),
                      auto_start=c.p.bool("AutoStartInstance", default=False))
    return {}


@action("ReplaceSystemDisk", ignored=("Architecture", "Platform", "DiskId",  # deprecated
                                      "SecurityEnhancementStrategy", "UseAdditionalService"),
        refused={"Password": _NO_CREDENTIALS, "KeyPairName": _NO_CREDENTIALS,
                 "PasswordInherit": Refused(_NO_CREDENTIALS.why, FALSE),
                 "Encrypted": Refused(_NO_ENCRYPTION.why, FALSE),
                 "EncryptAlgorithm": _NO_ENCRYPTION, "KMSKeyId": _NO_ENCRYPTION,
                 "Arn.N.AssumeRoleFor": _NO_ROLES, "Arn.N.RoleType": _NO_ROLES,
                 "Arn.N.Rolearn": _NO_ROLES})
def replace_system_disk(c: Call) -> dict[str, Any]:
    disk_id = disks.replace_system_disk(c.ctx, c.account_id,
                                        c.p.str("InstanceId", required=True),
                                        c.p.str("ImageId", required=True),
                                        size_gib=c.p.int("SystemDisk.Size"),
                                        client_token=c.p.str("ClientToken") or None)
    return {"DiskId": disk_id}


@action("DescribeDisks", ignored=("AdditionalAttributes.N",),
        refused={"Filter.N.Key": Refused("filters by time"),
                 "Filter.N.Value": Refused("filters by time"),
                 "Portable": Refused("a filter by portability"),
                 "DeleteWithInstance": Refused("a filter by DeleteWithInstance")},
        constant={"DiskChargeType": ("PostPaid",), "Encrypted": ("false",),
                  "EnableAutoSnapshot": ("true",),  # any disk may take automatic snapshots
                  "DeleteAutoSnapshot": ("false",), "EnableShared": ("false",),
                  "MultiAttach": ("Disabled",), "PerformanceLevel": ("PL1",),
                  "KMSKeyId": (), "LockReason": (),
                  "SnapshotId": ()})
def describe_disks(c: Call) -> dict[str, Any]:
    if _dry_run(c.p):
        raise dry_run_passed()
    page = disks.describe_disks(
        c.ctx, c.account_id, c.region,
        disk_ids=[] if c.none_match() else c.p.json_list("DiskIds"),
        instance_id=c.p.str("InstanceId") or None, disk_type=c.p.str("DiskType") or None,
        status=c.p.str("Status") or None, category=c.p.str("Category") or None,
        zone_id=c.p.str("ZoneId") or None, name=c.p.str("DiskName") or None,
        auto_snapshot_policy_id=c.p.str("AutoSnapshotPolicyId") or None,
        with_policy=c.p.bool("EnableAutomatedSnapshotPolicy"),
        tags=c.p.tags(), **_page_args(c.p))
    return {"Disks": {"Disk": [views.disk(d) for d in page.items]},
            **views.page_fields(page, True)}


# ------------------------------------------------------------------ snapshots


@action("CreateSnapshot", ignored=("InstantAccessRetentionDays",),  # with InstantAccess only
        refused={"Category": Refused("ecsnap takes standard snapshots", ("Standard",)),
                 "InstantAccess": Refused("no instant access snapshots", FALSE),
                 "StorageLocationArn": Refused("snapshots stay in the region's pool")})
def create_snapshot(c: Call) -> dict[str, Any]:
    snap_id = snapshots.create_snapshot(c.ctx, c.account_id, c.p.str("DiskId", required=True),
                                        name=c.p.str("SnapshotName") or "",
                                        description=c.p.str("Description") or "",
                                        tags=c.p.tags(),
                                        retention_days=c.p.int("RetentionDays"),
                                        client_token=c.p.str("ClientToken") or None)
    return {"SnapshotId": snap_id}


@action("DescribeSnapshots",
        refused={"Filter.N.Key": Refused("filters by time"),
                 "Filter.N.Value": Refused("filters by time"),
                 "SnapshotLinkId": Refused("a filter by snapshot chain")},
        constant={"Category": ("standard",), "Encrypted": ("false",), "KMSKeyId": ()})
def describe_snapshots(c: Call) -> dict[str, Any]:
    if _dry_run(c.p):
        raise dry_run_passed()
    page = snapshots.describe_snapshots(
        c.ctx, c.account_id, c.region,
        snapshot_ids=[] if c.none_match() else c.p.json_list("SnapshotIds"),
        disk_id=c.p.str("DiskId") or None, instance_id=c.p.str("InstanceId") or None,
        status=c.p.str("Status") or None, name=c.p.str("SnapshotName") or None,
        source_disk_type=c.p.str("SourceDiskType") or None, tags=c.p.tags(),
        snapshot_type=c.p.str("SnapshotType") or None, usage=c.p.str("Usage") or None,
        **_page_args(c.p))
    return {"Snapshots": {"Snapshot": [views.snapshot(s, page.usage[s.id])
                                       for s in page.items]},
            **views.page_fields(page, True)}


@action("DeleteSnapshot")
def delete_snapshot(c: Call) -> dict[str, Any]:
    snapshots.delete_snapshot(c.ctx, c.account_id, c.p.str("SnapshotId", required=True),
                              force=c.p.bool("Force", default=False))
    return {}


@action("ModifySnapshotAttribute", ignored=("DisableInstantAccess",),  # none to disable
        refused={"RetentionDays": Refused("changing a snapshot's retention")})
def modify_snapshot(c: Call) -> dict[str, Any]:
    snapshots.modify_snapshot(c.ctx, c.account_id, c.p.str("SnapshotId", required=True),
                              name=c.p.str("SnapshotName"), description=c.p.str("Description"))
    return {}


@action("CreateSnapshotGroup", ignored=("InstantAccessRetentionDays",),
        refused={"InstantAccess": Refused("no instant access snapshots", FALSE),
                 "StorageLocationArn": Refused("snapshots stay in the region's pool"),
                 "ClientToken": Refused("CreateSnapshotGroup takes no ClientToken in ecsnap "
                                        "(a retry would take a second group)")})
def create_snapshot_group(c: Call) -> dict[str, Any]:
    group_id, task_id = snapshots.create_snapshot_group(
        c.ctx, c.account_id, c.region, c.p.str("InstanceId", required=True),
        exclude_disk_ids=c.p.list("ExcludeDiskId"), disk_ids=c.p.list("DiskId"),
        name=c.p.str("Name") or "", description=c.p.str("Description") or "",
        tags=c.p.tags(), quiesce=c.p.bool("FileSystemConsistent", default=True))
    return {"SnapshotGroupId": group_id, "TaskId": task_id}


@action("DescribeSnapshotGroups", ignored=("AdditionalAttributes.N",),
        refused={"Tag.N.Key": Refused("a filter of instance snapshots by tag"),
                 "Tag.N.Value": Refused("a filter of instance snapshots by tag")})
def describe_snapshot_groups(c: Call) -> dict[str, Any]:
    page = snapshots.describe_snapshot_groups(
        c.ctx, c.account_id, c.region, group_ids=c.p.list("SnapshotGroupId") or None,
        instance_id=c.p.str("InstanceId") or None, name=c.p.str("Name") or None,
        statuses=c.p.list("Status") or None, next_token=c.p.str("NextToken") or None,
        max_results=c.p.int("MaxResults", min=1, max=100))
    return {"SnapshotGroups": {"SnapshotGroup": [views.snapshot_group(v) for v in page.items]},
            "NextToken": page.next_token}


@action("ModifySnapshotGroup")
def modify_snapshot_group(c: Call) -> dict[str, Any]:
    snapshots.modify_snapshot_group(c.ctx, c.account_id, c.region,
                                    c.p.str("SnapshotGroupId", required=True),
                                    name=c.p.str("Name"), description=c.p.str("Description"))
    return {}


@action("DeleteSnapshotGroup")
def delete_snapshot_group(c: Call) -> dict[str, Any]:
    outcomes, task_id = snapshots.delete_snapshot_group(
        c.ctx, c.account_id, c.region, c.p.str("SnapshotGroupId", required=True))
    return {"TaskId": task_id, "OperationProgressSet": {"OperationProgress": [{
        "OperationStatus": "Failed" if o.code else "Success", "ErrorCode": o.code,
        "ErrorMsg": o.message,
        "RelatedItemSet": {"RelatedItem": [{"Name": "SnapshotId", "Value": o.snapshot_id}]}}
        for o in outcomes]}}


# ------------------------------------------------------------------ rollback


def _reset_items(p: Any) -> list[tuple[str, str]]:
    items = [(d.get("DiskId") or "", d.get("SnapshotId") or "")
             for d in p.objects("Disk", fields=("DiskId", "SnapshotId"))]
    if not items:
        raise EcsError("MissingParameter", "The input parameter \"Disk.1.DiskId\" that is "
                       "mandatory for processing this request is not supplied.", 400)
    return items


def _progress(items: list[tuple[str, str]]) -> dict[str, Any]:
    return {"OperationProgressSet": {"OperationProgress": [{
        "OperationStatus": "Success", "ErrorCode": "", "ErrorMsg": "",
        "RelatedItemSet": {"RelatedItem": [{"Name": "SnapshotId", "Value": s},
                                           {"Name": "DiskId", "Value": d}]}}
        for d, s in items]}}


@action("ResetDisks")
def reset_disks(c: Call) -> dict[str, Any]:
    result = rollback.reset_disks(c.ctx, c.account_id, c.region, _reset_items(c.p),
                                  auto_start=c.p.bool("AutoStartInstance", default=False),
                                  safety_snapshot=c.p.bool("SafetySnapshot", default=True),
                                  dry_run=_dry_run(c.p))
    return {**_progress(result.items), "SafetySnapshotGroupId": result.safety_group_id or "",
            "TaskId": result.task_id}


@action("ResetDisk", refused={"DryRun": Refused("ResetDisk has no dry run in ecsnap (ResetDisks "
                                               "and PreviewResetDisks have)", FALSE)})
def reset_disk(c: Call) -> dict[str, Any]:
    result = rollback.reset_disk(c.ctx, c.account_id, c.p.str("DiskId", required=True),
                                 c.p.str("SnapshotId", required=True),
                                 auto_start=c.p.bool("AutoStartInstance", default=False),
                                 safety_snapshot=c.p.bool("SafetySnapshot", default=True))
    return {"SafetySnapshotGroupId": result.safety_group_id or "", "TaskId": result.task_id}


@action("PreviewResetDisks")
def preview_reset_disks(c: Call) -> dict[str, Any]:
    files = c.p.bool("IncludeFileChanges", default=False)  # the file level (README)
    limit = c.p.int("MaxFileChanges", min=0, max=inspect.MAX_FILES,
                    default=inspect.DEFAULT_MAX_FILES)
    preview = rollback.preview_reset_disks(c.ctx, c.account_id, c.region, _reset_items(c.p),
                                           file_changes=limit if files else None)

    def file_level(d: Any) -> dict[str, Any]:
        if d.files is None:
            return {}
        return {"FileLevel": d.files.file_level.value, "FileLevelReason": d.files.reason,
                "FileChanges": views.file_changes(d.files)}

    def failures(fs: list[Any]) -> dict[str, Any]:
        return {"Failure": [{"Check": f.check, "Code": f.code, "Message": f.message}
                            for f in fs]}

    return {"InstanceId": preview.instance_id, "InstanceStatus": preview.instance_status,
            "StoppedMode": preview.stopped_mode, "Allowed": not preview.failures,
            "Warning": preview.stop_charging_warning,
            "InstanceFailures": failures(preview.instance_failures),
            "Disks": {"Disk": [{
                "DiskId": d.disk_id, "SnapshotId": d.snapshot_id, "DiskType": d.disk_type,
                "Allowed": d.ok,
                "BytesWrittenSinceSnapshot": -1 if d.bytes_written_since is None
                else d.bytes_written_since,
                "Failures": failures(d.failures), **file_level(d)} for d in preview.disks]}}


@action("DescribeSnapshotFiles")
def describe_snapshot_files(c: Call) -> dict[str, Any]:
    """ecsnap extension: a directory's entries or a file's content in a snapshot."""
    result = inspect.describe_snapshot_files(
        c.ctx, c.account_id, c.p.str("SnapshotId", required=True), c.p.str("Path") or "/",
        region_id=c.region, next_token=c.p.str("NextToken") or None,
        max_results=c.p.int("MaxResults", min=1, max=inspect.MAX_LIST),
        offset=c.p.int("Offset", min=0), max_bytes=c.p.int("MaxBytes", min=1,
                                                           max=inspect.MAX_READ_BYTES))
    return views.snapshot_files(result)


@action("RestoreSnapshotFiles")
def restore_snapshot_files(c: Call) -> dict[str, Any]:
    """ecsnap extension: regular files of a snapshot put back onto its disk's instance
    (into the running guest through its agent, or onto the stopped disk)."""
    result = restore_files.restore_snapshot_files(
        c.ctx, c.account_id, c.p.str("InstanceId", required=True),
        c.p.str("SnapshotId", required=True), c.p.list("Path"),
        target_path=c.p.str("TargetPath") or None, region_id=c.region, dry_run=_dry_run(c.p))
    return {"TaskId": result.task_id, "TaskStatus": result.status, "InstanceId":
            result.instance_id, "DiskId": result.disk_id,
            "RestoreMode": "GuestAgent" if result.mode == restore_files.GUEST else "Disk",
            "Files": {"File": [{"Path": s, "TargetPath": t} for s, t in result.items]}}


# ------------------------------------------------------------------ automatic snapshot policies


def _named(p: Any, name: str) -> str | None:
    """A parameter the new SDK sends in lower camel case (``autoSnapshotPolicyId``) and the
    docs in upper (``AutoSnapshotPolicyId``): either spelling."""
    lower = name[0].lower() + name[1:]
    return p.str(name) or p.str(lower) or None


def _named_list(p: Any, name: str) -> list[str] | None:
    lower = name[0].lower() + name[1:]
    found = p.json_list(name, max_items=None)
    return found if found is not None else p.json_list(lower, max_items=None)


def _named_int(p: Any, name: str) -> int | None:
    lower = name[0].lower() + name[1:]
    found = p.int(name)
    return found if found is not None else p.int(lower)


def _policy_region(c: Call) -> str:
    region = _named(c.p, "RegionId")
    if not region:
        raise EcsError("MissingParameter", "The input parameter \"RegionId\" that is "
                       "mandatory for processing this request is not supplied.", 400)
    return region


def _policy_id(c: Call) -> str:
    policy_id = _named(c.p, "AutoSnapshotPolicyId")
    if not policy_id:
        raise EcsError("MissingParameter", "The input parameter \"AutoSnapshotPolicyId\" "
                       "that is mandatory for processing this request is not supplied.", 400)
    return policy_id


_NO_COPIES = Refused("ecsnap copies no snapshots to other regions")
_POLICY_REFUSED = {
    "EnableCrossRegionCopy": Refused(_NO_COPIES.why, FALSE),
    "TargetCopyRegions": _NO_COPIES, "CopiedSnapshotsRetentionDays": _NO_COPIES,
    "CopyEncryptionConfiguration.Encrypted": Refused(_NO_ENCRYPTION.why, FALSE),
    "CopyEncryptionConfiguration.KMSKeyId": _NO_ENCRYPTION,
    "CopyEncryptionConfiguration.Arn.N.AssumeRoleFor": _NO_ROLES,
    "CopyEncryptionConfiguration.Arn.N.RoleType": _NO_ROLES,
    "CopyEncryptionConfiguration.Arn.N.Rolearn": _NO_ROLES,
    "TargetTags.N.Key": Refused("ecsnap tags no snapshot copies"),
    "TargetTags.N.Value": Refused("ecsnap tags no snapshot copies"),
    "StorageLocationArn": Refused("snapshots stay in the region's pool"),
}


@action("CreateAutoSnapshotPolicy",
        refused={**_POLICY_REFUSED,
                 "AssociationType": Refused("a policy applies to the disks it is applied to",
                                            ("Disk",))})
def create_auto_snapshot_policy(c: Call) -> dict[str, Any]:
    policy_id = policies.create_policy(
        c.ctx, c.account_id, _policy_region(c),
        time_points=_named_list(c.p, "TimePoints"),
        repeat_weekdays=_named_list(c.p, "RepeatWeekdays"),
        retention_days=_named_int(c.p, "RetentionDays"),
        name=_named(c.p, "AutoSnapshotPolicyName") or "", tags=c.p.tags())
    return {"AutoSnapshotPolicyId": policy_id}


@action("ModifyAutoSnapshotPolicyEx", refused=_POLICY_REFUSED)
def modify_auto_snapshot_policy(c: Call) -> dict[str, Any]:
    lower = "autoSnapshotPolicyName"
    name = c.p.raw("AutoSnapshotPolicyName")
    policies.modify_policy(
        c.ctx, c.account_id, _policy_region(c), _policy_id(c),
        name=name if name is not None else c.p.raw(lower),
        time_points=_named_list(c.p, "TimePoints"),
        repeat_weekdays=_named_list(c.p, "RepeatWeekdays"),
        retention_days=_named_int(c.p, "RetentionDays"))
    return {}


@action("DescribeAutoSnapshotPolicyEx")
def describe_auto_snapshot_policy_ex(c: Call) -> dict[str, Any]:
    given = _named(c.p, "AutoSnapshotPolicyId")
    page = policies.describe_policies(
        c.ctx, c.account_id, _policy_region(c), policy_ids=[given] if given else None,
        name=_named(c.p, "AutoSnapshotPolicyName"), tags=c.p.tags(),
        page_number=c.p.int("PageNumber", min=1), page_size=c.p.int("PageSize", min=1,
                                                                      max=100))
    return {"AutoSnapshotPolicies": {"AutoSnapshotPolicy": [
        views.auto_snapshot_policy(v.policy, v.disk_nums) for v in page.items]},
        **views.page_fields(page, False)}


@action("DeleteAutoSnapshotPolicy")
def delete_auto_snapshot_policy(c: Call) -> dict[str, Any]:
    policies.delete_policy(c.ctx, c.account_id, _policy_region(c), _policy_id(c))
    return {}


@action("ApplyAutoSnapshotPolicy")
def apply_auto_snapshot_policy(c: Call) -> dict[str, Any]:
    region, policy_id = _policy_region(c), _policy_id(c)
    policies.apply_policy(c.ctx, c.account_id, region, policy_id,
                          _named_list(c.p, "DiskIds"))
    return {}


@action("CancelAutoSnapshotPolicy")
def cancel_auto_snapshot_policy(c: Call) -> dict[str, Any]:
    policies.cancel_policy(c.ctx, c.account_id, _policy_region(c),
                           _named_list(c.p, "DiskIds"),
                           policy_id=_named(c.p, "AutoSnapshotPolicyId"))
    return {}


# ------------------------------------------------------------------ tasks


@action("DescribeTasks", refused={
    "StartTime": Refused("filters by time"), "EndTime": Refused("filters by time"),
    "ResourceIds.N": Refused("a filter by resource"),
    "TaskGroupId": Refused("ecsnap has no task groups")})
def describe_tasks(c: Call) -> dict[str, Any]:
    ids_ = c.p.str("TaskIds")
    page = tasks_view.describe_tasks(c.ctx, c.account_id, c.region,
                                     task_ids=ids_.split(",") if ids_ else None,
                                     action=c.p.str("TaskAction") or None,
                                     status=c.p.str("TaskStatus") or None,
                                     page_number=c.p.int("PageNumber", min=1),
                                     page_size=c.p.int("PageSize", min=1, max=100))
    return {"TaskSet": {"Task": [views.task(t) for t in page.items]}, "RegionId": c.region,
            **views.page_fields(page, False)}


@action("DescribeTaskAttribute")
def describe_task_attribute(c: Call) -> dict[str, Any]:
    t = tasks_view.get_task(c.ctx, c.account_id, c.region, c.p.str("TaskId", required=True))
    failed = t.status.value == "Failed"
    return {**views.task(t), "RegionId": c.region, "TotalCount": 1,
            "SuccessCount": 0 if failed else int(t.status.value == "Finished"),
            "FailedCount": int(failed), "Result": dict(t.result),
            "OperationProgressSet": {"OperationProgress": [{
                "OperationStatus": "Failed" if failed else "Success",
                "ErrorCode": t.error_code, "ErrorMsg": t.error_message,
                "RelatedItemSet": {"RelatedItem": [{"Name": "ResourceId",
                                                    "Value": t.resource_id}]}}]}}


# ------------------------------------------------------------------ Cloud Assistant


_NO_COMMAND_TAGS = Refused("ecsnap keeps no tags on commands")


@action("RunCommand", ignored=("Description", "KeepCommand", "TerminationMode",
                               "WindowsPasswordName"),
        refused={"ClientToken": Refused("RunCommand takes no ClientToken in ecsnap (a retry "
                                        "would run the command again)"),
                 "ContainerId": Refused("commands run in the guest, not in containers"),
                 "ContainerName": Refused("commands run in the guest, not in containers"),
                 "EnableParameter": Refused("no custom parameters", FALSE),
                 "Parameters": Refused("no custom parameters"),
                 "Frequency": Refused("ecsnap runs commands once (RepeatMode=Once)"),
                 "Launcher": Refused("commands run under the guest's shell"),
                 "OssOutputDelivery": Refused("no OSS: read the output with "
                                              "DescribeInvocationResults"),
                 "ResourceTag.N.Key": Refused("instances are named by InstanceId"),
                 "ResourceTag.N.Value": Refused("instances are named by InstanceId"),
                 "Tag.N.Key": _NO_COMMAND_TAGS, "Tag.N.Value": _NO_COMMAND_TAGS,
                 "Username": Refused("commands run as root", ("root",))})
def run_command(c: Call) -> dict[str, Any]:
    repeat = c.p.str("RepeatMode") or "Once"
    if repeat != "Once" or c.p.bool("Timed", default=False):
        raise EcsError("InvalidParameter", "ecsnap runs commands once (RepeatMode=Once).", 400)
    command_id, invoke_id = commands.run_command(
        c.ctx, c.account_id, c.region, command_type=c.p.str("Type", required=True),
        content=c.p.str("CommandContent", required=True), instance_ids=c.p.list("InstanceId"),
        timeout=c.p.int("Timeout", default=60), working_dir=c.p.str("WorkingDir") or "/root",
        name=c.p.str("Name") or "",
        content_encoding=c.p.str("ContentEncoding") or "PlainText")
    return {"CommandId": command_id, "InvokeId": invoke_id}


def _encoding(p: Any) -> str:
    return str(p.enum("ContentEncoding", {"PlainText", "Base64"}, default="Base64"))


def _paging(p: Any, max_size: int) -> dict[str, Any]:
    """Both paging styles of the Cloud Assistant lists."""
    return {"page_number": p.int("PageNumber", min=1),
            "page_size": p.int("PageSize", min=1, max=max_size),
            "next_token": p.str("NextToken") or None,
            "max_results": p.int("MaxResults", min=1, max=max_size)}


@action("DescribeInvocationResults", ignored=("IncludeHistory",),  # every command runs once
        constant={"Tag.N.Key": (), "Tag.N.Value": ()})  # commands carry no tags
def describe_invocation_results(c: Call) -> dict[str, Any]:
    encoding = _encoding(c.p)
    paging = _paging(c.p, 50)
    page: listing.Page[Any]
    if c.none_match():
        page = listing.page_list([], **paging, max_page_size=50)
    else:
        page = commands.describe_invocation_results(
            c.ctx, c.account_id, c.region, invoke_id=c.p.str("InvokeId") or None,
            instance_id=c.p.str("InstanceId") or None,
            command_id=c.p.str("CommandId") or None,
            record_status=c.p.str("InvokeRecordStatus") or None, **paging)
    return {"Invocation": {"PageNumber": page.page_number, "PageSize": page.page_size,
                           "TotalCount": page.total, "NextToken": page.next_token,
                           "InvocationResults": {
                               "InvocationResult": [views.invocation_result(v, encoding)
                                                    for v in page.items]}}}


@action("DescribeInvocations", constant={"Tag.N.Key": (), "Tag.N.Value": ()})
def describe_invocations(c: Call) -> dict[str, Any]:
    """One item per RunCommand (InvokeId), newest first, filtered and paged here: the
    records are kept per instance."""
    encoding = _encoding(c.p)
    paging = _paging(c.p, 50)
    with_output = c.p.bool("IncludeOutput", default=False)
    wanted = {"InvokeStatus": c.p.str("InvokeStatus"), "CommandType": c.p.str("CommandType"),
              "CommandName": c.p.str("CommandName"), "RepeatMode": c.p.str("RepeatMode")}
    timed = c.p.bool("Timed")
    rows = [] if c.none_match() else commands.find_invocations(
        c.ctx, c.account_id, c.region, invoke_id=c.p.str("InvokeId") or None,
        instance_id=c.p.str("InstanceId") or None, command_id=c.p.str("CommandId") or None)
    grouped: dict[str, list[Any]] = {}
    for v in rows:
        grouped.setdefault(v.invoke_id, []).append(v)
    out = []
    for invoke_id, group in reversed(grouped.items()):
        item = views.invocation(invoke_id, group, encoding, with_output)
        if all(not want or item[key] == want for key, want in wanted.items()) and \
                timed in (None, False):
            out.append(item)
    page = listing.page_list(out, **paging, max_page_size=50)
    return {"Invocations": {"Invocation": page.items}, "TotalCount": page.total,
            "PageNumber": page.page_number, "PageSize": page.page_size,
            "NextToken": page.next_token}


__all__ = ["ACTIONS", "Call"]
