"""Decoding the flat ECS parameters (SDK-WIRE.md §2.4), and never failing with anything but
an EcsError whatever the strings are."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.api.params import Params
from ecsnap.entrypoints.api.signature import parse_query


def fails(code: str, name: str, call: Any, *args: Any, **kw: Any) -> EcsError:
    with pytest.raises(EcsError) as caught:
        call(*args, **kw)
    assert caught.value.code == code, caught.value
    assert caught.value.http_status == 400
    assert f'"{name}"' in caught.value.message, caught.value.message
    return caught.value


# ------------------------------------------------------------------ the captured wire forms


def test_new_sdk_create_snapshot_group_query() -> None:
    p = Params.from_pairs(parse_query(
        "Description=a+b%2Ac~d%2F%C3%A9&ExcludeDiskId.1=d-2&ExcludeDiskId.2=d-3&InstanceId=i-1"
        "&Name=my+group&RegionId=cn-hangzhou&Tag.1.Key=team&Tag.1.Value=&InstantAccess=True"))
    assert p.str("Description") == "a b*c~d/é"
    assert p.str("Name") == "my group"
    assert p.list("ExcludeDiskId") == ["d-2", "d-3"]
    assert p.list("DiskId") == []
    assert p.tags() == {"team": ""}
    assert p.bool("InstantAccess") is True
    assert p.str("ClientToken") is None


def test_old_sdk_create_snapshot_group_query() -> None:
    p = Params.from_pairs(parse_query(
        "InstanceId=i-1&ExcludeDiskId.1=d-2&ExcludeDiskId.2=d-3&Name=my%20group&"
        "Description=a%20b%2Ac~d%2F%C3%A9&Version=2014-05-26&Action=CreateSnapshotGroup&"
        "Format=JSON&RegionId=cn-hangzhou&SignatureType=&Signature=mKg4dS4kwmB2Uli6%2FJf"))
    assert (p.str("Name"), p.str("Description")) == ("my group", "a b*c~d/é")
    assert p.str("SignatureType") == ""
    assert p.str("RegionId", required=True) == "cn-hangzhou"


def test_reset_disks_objects() -> None:
    p = Params({"RegionId": "r", "Disk.1.DiskId": "d-1", "Disk.1.SnapshotId": "s-1",
                "Disk.2.SnapshotId": "s-2", "Disk.2.DiskId": "d-2", "DryRun": "False"})
    assert p.objects("Disk", fields=("DiskId", "SnapshotId")) == [
        {"DiskId": "d-1", "SnapshotId": "s-1"}, {"DiskId": "d-2", "SnapshotId": "s-2"}]
    assert p.bool("DryRun", default=True) is False


def test_describe_instances_json_array() -> None:
    p = Params({"InstanceIds": '["i-1", "i-2"]', "Empty": "[]", "Blank": "",
                "PageSize": "10", "PageNumber": "1"})
    assert p.json_list("InstanceIds") == ["i-1", "i-2"]
    assert p.json_list("Empty") == []
    assert p.json_list("Blank") is None
    assert p.json_list("Absent") is None
    assert (p.int("PageNumber", min=1), p.int("PageSize", min=1, max=100)) == (1, 10)


# ------------------------------------------------------------------ scalars


def test_str_blank_is_a_value() -> None:
    p = Params({"Description": "", "Name": "x"})
    assert p.str("Description") == ""
    assert p.str("Description", default="d") == ""
    assert p.str("Absent", default="d") == "d"
    assert p.str("Absent") is None
    fails("MissingParameter", "Description", p.str, "Description", required=True)
    fails("MissingParameter", "InstanceId", p.str, "InstanceId", required=True)


def test_names_are_case_sensitive() -> None:
    p = Params({"instanceid": "i-1"})
    assert p.str("InstanceId") is None


@pytest.mark.parametrize(("raw", "value"), [("True", True), ("False", False),
                                            ("true", True), ("FALSE", False),
                                            ("tRuE", True)])
def test_bool_any_case(raw: str, value: bool) -> None:
    assert Params({"DryRun": raw}).bool("DryRun", default=not value) is value


@pytest.mark.parametrize("raw", ["1", "0", "yes", "True ", "none", "ture", "真"])
def test_bool_invalid(raw: str) -> None:
    fails("InvalidParameter", "DryRun", Params({"DryRun": raw}).bool, "DryRun")


def test_bool_absent_or_blank_uses_default() -> None:
    p = Params({"Force": ""})
    assert p.bool("Force", default=False) is False
    assert p.bool("DryRun") is None
    fails("MissingParameter", "Force", p.bool, "Force", required=True)


@pytest.mark.parametrize(("raw", "value"), [("10", 10), ("-1", -1), ("007", 7), ("0", 0),
                                            ("999999999999999999", 999999999999999999)])
def test_int(raw: str, value: int) -> None:
    assert Params({"Size": raw}).int("Size") == value


@pytest.mark.parametrize("raw", ["1.5", "1e3", " 1", "1 ", "+1", "0x10", "1_000", "١٢",
                                 "ten", "-", "9" * 19, "9" * 5000])
def test_int_invalid(raw: str) -> None:
    fails("InvalidParameter", "Size", Params({"Size": raw}).int, "Size")


def test_int_range_and_custom_code() -> None:
    p = Params({"PageSize": "101", "Size": "10"})
    error = fails("InvalidParameter", "PageSize", p.int, "PageSize", min=1, max=100)
    assert "at most 100" in error.message
    with pytest.raises(EcsError) as caught:
        p.int("Size", min=20, code="InvalidDiskSize.ValueNotSupported")
    assert caught.value.code == "InvalidDiskSize.ValueNotSupported"
    assert '"Size"' in caught.value.message
    assert p.int("Amount", default=1) == 1
    assert p.int("Absent") is None
    fails("MissingParameter", "NewSize", p.int, "NewSize", required=True)


def test_enum() -> None:
    modes = {"StopCharging", "KeepCharging"}
    assert Params({"StoppedMode": "StopCharging"}).enum("StoppedMode", modes) == "StopCharging"
    assert Params({}).enum("StoppedMode", modes) is None
    assert Params({"StoppedMode": ""}).enum("StoppedMode", modes, default="KeepCharging") == \
        "KeepCharging"
    error = fails("InvalidParameter", "StoppedMode",
                  Params({"StoppedMode": "stopcharging"}).enum, "StoppedMode", modes)
    assert "KeepCharging, StopCharging" in error.message
    with pytest.raises(EcsError) as caught:
        Params({"Category": "hdd"}).enum("Category", {"cloud_essd"},
                                         code="InvalidDiskCategory.ValueNotSupported")
    assert caught.value.code == "InvalidDiskCategory.ValueNotSupported"


# ------------------------------------------------------------------ lists


def test_list_order_gaps_and_blanks() -> None:
    p = Params({"InstanceId.10": "i-10", "InstanceId.2": "i-2", "InstanceId.1": "i-1",
                "InstanceId.5": "", "InstanceId": "bare", "InstanceId.0": "zero",
                "InstanceId.01": "padded", "InstanceId.x": "x", "InstanceId.1.Foo": "deep",
                "InstanceId.": "dot", "InstanceIdX.1": "other"})
    assert p.list("InstanceId") == ["i-1", "i-2", "", "i-10"]
    fails("InvalidParameter", "InstanceId.N", p.list, "InstanceId", max_items=3)


def test_objects_with_nested_lists() -> None:
    p = Params({"Filter.1.Key": "CreationStartTime", "Filter.1.Value": "2024-01-01T00:00Z",
                "Filter.2.Key": "Ids", "Filter.2.Value.1": "a", "Filter.2.Value.2": "b",
                "Filter.3.Other": "x", "Filter.4.Key": ""})
    assert p.objects("Filter", fields=("Key", "Value")) == [
        {"Key": "CreationStartTime", "Value": "2024-01-01T00:00Z"},
        {"Key": "Ids", "Value": ["a", "b"]},
        {"Key": ""}]
    fails("InvalidParameter", "Filter.N", p.objects, "Filter", fields=("Key",), max_items=2)


def test_items_name_nested_errors_fully() -> None:
    p = Params({"DataDisk.1.Size": "40", "DataDisk.2.Size": "big",
                "DataDisk.2.DeleteWithInstance": "True",
                "NetworkInterface.1.SecurityGroupIds.1": "sg-1",
                "NetworkInterface.1.SecurityGroupIds.2": "sg-2",
                "X.1.Y.1.Z": "deep"})
    disks = p.items("DataDisk")
    assert [d.full_name("Size") for d in disks] == ["DataDisk.1.Size", "DataDisk.2.Size"]
    assert disks[0].int("Size") == 40
    assert disks[1].bool("DeleteWithInstance") is True
    fails("InvalidParameter", "DataDisk.2.Size", disks[1].int, "Size")
    assert p.items("NetworkInterface")[0].list("SecurityGroupIds") == ["sg-1", "sg-2"]
    assert p.items("X")[0].items("Y")[0].str("Z") == "deep"
    assert p.items("Absent") == []


def test_json_list_invalid() -> None:
    for raw in ['{"a": 1}', '["i-1", 2]', "i-1,i-2", '"i-1"', "[", "null", "[[]]", "[NaN]",
                '["\\ud800"]', "[" * 100_000, "1" * 5000]:
        fails("InvalidParameter", "InstanceIds", Params({"InstanceIds": raw}).json_list,
              "InstanceIds")
    many = "[" + ",".join(f'"i-{i}"' for i in range(101)) + "]"
    fails("InvalidParameter", "InstanceIds", Params({"InstanceIds": many}).json_list,
          "InstanceIds")
    assert len(Params({"InstanceIds": many}).json_list("InstanceIds", max_items=None) or []) \
        == 101
    fails("MissingParameter", "InstanceIds", Params({}).json_list, "InstanceIds",
          required=True)


def test_csv() -> None:
    p = Params({"TaskIds": "t-1, t-2,,t-3 ", "Status": ""})
    assert p.csv("TaskIds") == ["t-1", "t-2", "t-3"]
    assert p.csv("Status") is None
    assert p.csv("Absent") is None


# ------------------------------------------------------------------ tags


def test_tags_with_deprecated_aliases() -> None:
    p = Params({"Tag.1.Key": "team", "Tag.1.Value": "ops", "Tag.2.key": "env",
                "Tag.2.value": "prod", "Tag.3.Key": "bare", "Tag.4.Other": "ignored"})
    assert p.tags() == {"team": "ops", "env": "prod", "bare": ""}
    assert list(p.tags()) == ["team", "env", "bare"]
    assert Params({}).tags() == {}


def test_tags_errors() -> None:
    fails("MissingParameter", "Tag.2.Key",
          Params({"Tag.1.Key": "a", "Tag.2.Value": "v"}).tags)
    fails("InvalidParameter", "Tag.2.Key",
          Params({"Tag.1.Key": "a", "Tag.2.Key": "a"}).tags)
    fails("InvalidParameter", "Tag.N",
          Params({f"Tag.{i}.Key": f"k{i}" for i in range(1, 22)}).tags, max_items=20)


def test_canonical_tag_names_win_over_aliases() -> None:
    p = Params({"Tag.1.Key": "K", "Tag.1.key": "k", "Tag.1.Value": "V", "Tag.1.value": "v"})
    assert p.tags() == {"K": "V"}


def test_from_pairs_rejects_duplicates() -> None:
    fails("InvalidParameter", "InstanceId", Params.from_pairs,
          [("InstanceId", "i-1"), ("InstanceId", "i-2")])
    assert "InstanceId" in Params.from_pairs([("InstanceId", "i-1")])


# ------------------------------------------------------------------ any input at all


_NAMES = ["InstanceId", "Size", "DryRun", "StoppedMode", "InstanceIds", "TaskIds", "Disk",
          "Tag", "DataDisk", "Filter"]
_suffix = st.sampled_from(["", ".1", ".2", ".0", ".01", ".1.Key", ".1.Value", ".2.key",
                           ".2.value", ".1.DiskId", ".1.SnapshotId", ".3.Value.1", ".",
                           ".999999", ".9999999", ".1.Size", ".1.Key.1"])
_key = st.one_of(st.builds(lambda n, s: n + s, st.sampled_from(_NAMES), _suffix),
                 st.text(max_size=20))
_value = st.one_of(
    st.text(max_size=60),
    st.sampled_from(["", "True", "false", "1", "-0", "9" * 30, "[]", '["a"]', "[1]", "[[",
                     "StopCharging", "null", '"x"', "[" * 2000]),
    st.from_regex(r"-?[0-9]{1,25}", fullmatch=True),
)


def _use_every_accessor(p: Params) -> None:
    p.str("InstanceId")
    p.str("InstanceId", required=True)
    p.int("Size", min=1, max=100)
    p.int("Size", required=True, code="InvalidDiskSize.ValueNotSupported")
    p.bool("DryRun", default=False)
    p.bool("DryRun", required=True)
    p.enum("StoppedMode", {"StopCharging", "KeepCharging"})
    p.list("InstanceId", max_items=5)
    p.objects("Disk", fields=("DiskId", "SnapshotId"), max_items=5)
    p.json_list("InstanceIds")
    p.csv("TaskIds")
    p.tags(max_items=5)
    for disk in p.items("DataDisk"):
        disk.int("Size")
        disk.bool("DeleteWithInstance")
    for item in p.items("Filter"):
        item.list("Value")
        item.str("Key", required=True)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_key, _value, max_size=12))
def test_random_parameters_raise_only_ecs_errors(values: dict[str, str]) -> None:
    p = Params(values)
    for accessor in _ACCESSORS:
        try:
            accessor(p)
        except EcsError as error:
            assert error.http_status == 400
            assert error.message


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_key, _value), max_size=12))
def test_random_pairs_raise_only_ecs_errors(pairs: list[tuple[str, str]]) -> None:
    with contextlib.suppress(EcsError):
        _use_every_accessor(Params.from_pairs(pairs))


_ACCESSORS = [
    lambda p: p.str("InstanceId"),
    lambda p: p.str("InstanceId", required=True),
    lambda p: p.int("Size", min=1, max=100),
    lambda p: p.int("Size", required=True, code="InvalidDiskSize.ValueNotSupported"),
    lambda p: p.bool("DryRun", default=False),
    lambda p: p.bool("DryRun", required=True),
    lambda p: p.enum("StoppedMode", {"StopCharging", "KeepCharging"}),
    lambda p: p.list("InstanceId", max_items=5),
    lambda p: p.objects("Disk", fields=("DiskId", "SnapshotId"), max_items=5),
    lambda p: p.json_list("InstanceIds"),
    lambda p: p.csv("TaskIds"),
    lambda p: p.tags(max_items=5),
    lambda p: [(d.int("Size"), d.bool("DeleteWithInstance")) for d in p.items("DataDisk")],
    lambda p: [(f.list("Value"), f.str("Key", required=True)) for f in p.items("Filter")],
    _use_every_accessor,
]
