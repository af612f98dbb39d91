"""JSON and XML shapes of ECS responses and of the error envelope."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import datetime
from enum import Enum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.api.render import (
    JSON_CONTENT_TYPE,
    XML_CONTENT_TYPE,
    Rendered,
    new_request_id,
    render,
    render_error,
    unwrapped_lists,
    wants_xml,
)

RID = "473469C7-AA6F-4DC5-B3DB-A3DC0DE3C83E"

GROUPS: dict[str, Any] = {
    "NextToken": "",
    "SnapshotGroups": {"SnapshotGroup": [
        {"SnapshotGroupId": "ssg-1", "Name": "a & <b>", "Description": "",
         "Snapshots": {"Snapshot": [
             {"SnapshotId": "s-1", "Available": True, "InstantAccess": False,
              "InstantAccessRetentionDays": 0, "Progress": "100%",
              "Tags": {"Tag": [{"Key": "k", "Value": "v"}]}},
             {"SnapshotId": "s-2", "Available": False, "InstantAccess": False,
              "InstantAccessRetentionDays": 3, "Progress": "50%", "Tags": {"Tag": []}}]},
         "Tags": {"Tag": []}},
        {"SnapshotGroupId": "ssg-2", "Name": "é", "Description": None,
         "Snapshots": {"Snapshot": []}, "Tags": {"Tag": [{"Key": "x", "Value": "y"}]}}]},
}


def xml_of(rendered: Rendered) -> ET.Element:
    assert rendered.content_type == XML_CONTENT_TYPE
    assert rendered.body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    return ET.fromstring(rendered.body)


def test_json_is_one_flat_object_with_request_id_first() -> None:
    out = render("DescribeSnapshotGroups", GROUPS, RID)
    assert (out.status, out.content_type) == (200, JSON_CONTENT_TYPE)
    body = json.loads(out.body)
    assert next(iter(body)) == "RequestId"
    assert body == {"RequestId": RID, **GROUPS}
    snapshot = body["SnapshotGroups"]["SnapshotGroup"][0]["Snapshots"]["Snapshot"][0]
    assert snapshot["Available"] is True and snapshot["InstantAccessRetentionDays"] == 0
    assert "é".encode() in out.body  # UTF-8, not \\u escapes


@pytest.mark.parametrize("fmt", [None, "", "JSON", "json", "None", "yaml", " xmlx"])
def test_json_unless_format_is_xml(fmt: str | None) -> None:
    assert render("StopInstance", {}, RID, fmt).content_type == JSON_CONTENT_TYPE
    assert not wants_xml(fmt)


@pytest.mark.parametrize("fmt", ["XML", "xml", "Xml"])
def test_xml_for_any_case(fmt: str) -> None:
    assert wants_xml(fmt)
    root = xml_of(render("StopInstance", {}, RID, fmt))
    assert root.tag == "StopInstanceResponse"
    assert [child.tag for child in root] == ["RequestId"]
    assert root.findtext("RequestId") == RID


def test_xml_repeats_list_elements_inside_the_wrapper() -> None:
    root = xml_of(render("DescribeSnapshotGroups", GROUPS, RID, "XML"))
    assert root.tag == "DescribeSnapshotGroupsResponse"
    assert [c.tag for c in root] == ["RequestId", "NextToken", "SnapshotGroups"]
    groups = root.findall("SnapshotGroups/SnapshotGroup")
    assert [g.findtext("SnapshotGroupId") for g in groups] == ["ssg-1", "ssg-2"]
    first, second = groups
    assert first.findtext("Name") == "a & <b>"
    assert second.findtext("Name") == "é"
    snaps = first.findall("Snapshots/Snapshot")
    assert [s.findtext("Available") for s in snaps] == ["true", "false"]
    assert [s.findtext("InstantAccessRetentionDays") for s in snaps] == ["0", "3"]
    assert snaps[0].findtext("Tags/Tag/Key") == "k"
    # Empty lists keep their wrapper, with no items.
    empty = second.find("Snapshots")
    assert empty is not None and list(empty) == []
    assert snaps[1].find("Tags") is not None and snaps[1].findall("Tags/Tag") == []
    # Blank and null values are empty elements.
    assert first.findtext("Description") == ""
    assert second.find("Description") is not None


def test_scalar_lists() -> None:
    data = {"InstanceIdSets": {"InstanceIdSet": ["i-1", "i-2"]}, "TradePrice": 0.0,
            "OperationLocks": {"LockReason": []}}
    assert json.loads(render("RunInstances", data, RID).body)["InstanceIdSets"] == {
        "InstanceIdSet": ["i-1", "i-2"]}
    root = xml_of(render("RunInstances", data, RID, "XML"))
    assert [e.text for e in root.findall("InstanceIdSets/InstanceIdSet")] == ["i-1", "i-2"]
    assert root.findtext("TradePrice") == "0.0"
    assert root.find("OperationLocks") is not None


def test_request_id_in_data_is_replaced() -> None:
    body = json.loads(render("X", {"RequestId": "old", "A": 1}, RID).body)
    assert body == {"RequestId": RID, "A": 1}


def test_enums_and_datetimes() -> None:
    class Mode(Enum):
        STOP = "StopCharging"

    data = {"Mode": Mode.STOP, "CreationTime": datetime(2024, 1, 2, 3, 4, 5)}
    assert json.loads(render("X", data, RID).body) == {
        "RequestId": RID, "Mode": "StopCharging", "CreationTime": "2024-01-02T03:04:05Z"}
    root = xml_of(render("X", data, RID, "XML"))
    assert root.findtext("CreationTime") == "2024-01-02T03:04:05Z"
    with pytest.raises(TypeError):
        render("X", {"Bad": object()}, RID)


def test_xml_survives_control_characters() -> None:
    root = xml_of(render("X", {"Output": "a\x00b\x1bc\tline\n\ud800"}, RID, "XML"))
    assert root.findtext("Output") == "a\ufffdb\ufffdc\tline\n\ufffd"


def test_json_survives_lone_surrogates() -> None:
    assert json.loads(render("X", {"Output": "a\ud800"}, RID).body)["Output"] == "a\ud800"


def test_bad_element_name_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        render("X", {"two words": 1}, RID, "XML")


# ------------------------------------------------------------------ errors


ERROR = EcsError("IncorrectInstanceStatus", "The current status of the resource does not "
                 "support this operation.", 403)


def test_json_error_envelope() -> None:
    out = render_error(ERROR, RID)
    assert (out.status, out.content_type) == (403, "application/json;charset=utf-8")
    body = json.loads(out.body)
    assert body == {"RequestId": RID, "HostId": "ecs.aliyuncs.com",
                    "Code": "IncorrectInstanceStatus", "Message": ERROR.message,
                    "Recommend": "https://api.aliyun.com/troubleshoot?q="
                                 "IncorrectInstanceStatus"}


def test_xml_error_envelope() -> None:
    out = render_error(ERROR, RID, "XML", host_id="127.0.0.1:8080", recommend="")
    assert (out.status, out.content_type) == (403, "text/xml;charset=utf-8")
    root = xml_of(out)
    assert root.tag == "Error"
    assert {c.tag: c.text or "" for c in root} == {
        "RequestId": RID, "HostId": "127.0.0.1:8080", "Code": "IncorrectInstanceStatus",
        "Message": ERROR.message, "Recommend": ""}


def test_signature_error_message_survives_rendering() -> None:
    error = EcsError("SignatureDoesNotMatch", "Specified signature is not matched with our "
                     "calculation. server string to sign is:POST&%2F&A%3D1", 400)
    for fmt in (None, "XML"):
        out = render_error(error, RID, fmt)
        message = (json.loads(out.body)["Message"] if fmt is None
                   else ET.fromstring(out.body).findtext("Message") or "")
        assert message.split(":")[1] == "POST&%2F&A%3D1"
        assert out.status == 400


@pytest.mark.parametrize("status", [400, 403, 404, 409, 500, 503])
def test_error_status_is_the_errors(status: int) -> None:
    assert render_error(EcsError("X", "y", status), RID).status == status


def test_request_ids_look_like_ecs_ones() -> None:
    rid = new_request_id()
    assert rid == rid.upper() and len(rid) == 36 and rid.count("-") == 4
    assert rid != new_request_id()


# ------------------------------------------------------------------ list wrapping check


def test_unwrapped_lists_are_reported() -> None:
    assert unwrapped_lists(GROUPS) == []
    assert unwrapped_lists({"SnapshotGroups": [{"SnapshotGroupId": "ssg-1"}]}) == [
        "SnapshotGroups"]
    assert unwrapped_lists({"Disks": {"Disk": [], "Extra": 1}}) == ["Disks.Disk"]
    assert unwrapped_lists({"A": {"B": [{"C": {"D": [1], "E": [2]}}]}}) == [
        "A.B[0].C.D", "A.B[0].C.E"]


# ------------------------------------------------------------------ any data at all


_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                  st.floats(allow_nan=False, allow_infinity=False))
_name = st.from_regex(r"[A-Z][A-Za-z0-9]{0,10}", fullmatch=True).filter(
    lambda n: not n.lower().startswith("xml"))  # names XML reserves: no ECS field is one
_data = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(_name, inner, max_size=4)), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_name, _data, max_size=5))
def test_any_response_is_well_formed_xml_and_json(data: dict[str, Any]) -> None:
    root = xml_of(render("DescribeThings", data, RID, "XML"))
    assert root.tag == "DescribeThingsResponse"
    body = json.loads(render("DescribeThings", data, RID).body)
    assert body["RequestId"] == RID


@settings(max_examples=200, deadline=None)
@given(code=st.text(max_size=30), message=st.text(max_size=80),
       status=st.integers(400, 599), fmt=st.sampled_from([None, "XML", "JSON"]))
def test_any_error_renders(code: str, message: str, status: int, fmt: str | None) -> None:
    out = render_error(EcsError(code, message, status), RID, fmt)
    assert out.status == status
    if fmt == "XML":
        assert xml_of(out).tag == "Error"
    else:
        assert json.loads(out.body)["Code"] == code
