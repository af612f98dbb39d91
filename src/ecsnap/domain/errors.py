"""ECS error codes, raised from the domain and the services, rendered once by the API."""

from __future__ import annotations

from dataclasses import dataclass


class EcsError(Exception):
    """An error with an ECS code, a human message and the HTTP status ECS uses for it."""

    def __init__(self, code: str, message: str, http_status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status

    def __repr__(self) -> str:
        return f"EcsError({self.code!r}, {self.message!r}, {self.http_status})"


@dataclass(frozen=True)
class CheckFailure:
    """One failed precondition: which check, on which resource, with its ECS code."""

    check: str
    code: str
    message: str
    http_status: int = 403
    disk_id: str | None = None

    def to_error(self) -> EcsError:
        return EcsError(self.code, self.message, self.http_status)


class RuleViolations(EcsError):
    """Several failed checks at once. The first one gives the code and status of the error."""

    def __init__(self, failures: list[CheckFailure]) -> None:
        first = failures[0]
        detail = "; ".join(
            f"{f.disk_id + ': ' if f.disk_id else ''}{f.code}: {f.message}" for f in failures
        )
        super().__init__(first.code, detail, first.http_status)
        self.failures = list(failures)


def missing_parameter(name: str) -> EcsError:
    return EcsError("MissingParameter", f"The input parameter \"{name}\" that is mandatory "
                    "for processing this request is not supplied.", 400)


def invalid_parameter(name: str, why: str = "") -> EcsError:
    text = f"The specified parameter \"{name}\" is not valid."
    return EcsError("InvalidParameter", f"{text} {why}".strip(), 400)


def not_found(kind: str, resource_id: str) -> EcsError:
    """`InvalidInstanceId.NotFound` and friends (404)."""
    codes = {
        "instance": ("InvalidInstanceId.NotFound", "The specified InstanceId does not exist."),
        "disk": ("InvalidDiskId.NotFound", "The specified disk does not exist."),
        "snapshot": ("InvalidSnapshotId.NotFound", "The specified snapshot does not exist."),
        "snapshot_group": ("InvalidSnapshotGroupId.NotFound",
                           "The specified snapshot group does not exist."),
        "image": ("InvalidImageId.NotFound", "The specified ImageId does not exist."),
        "auto_snapshot_policy": ("InvalidAutoSnapshotPolicyId.NotFound",
                                 "The specified automatic snapshot policy does not exist."),
        "region": ("InvalidRegionId.NotFound", "The specified RegionId does not exist."),
        "zone": ("InvalidZoneId.NotFound", "The specified zone does not exist."),
        "task": ("InvalidTaskId.NotFound", "The specified task does not exist."),
        "instance_type": ("InvalidInstanceType.ValueNotSupported",
                          "The specified InstanceType does not exist or is not supported."),
    }
    code, message = codes[kind]
    status = 400 if kind in ("task", "instance_type") else 404
    return EcsError(code, f"{message} ({resource_id})", status)


def access_key_not_found() -> EcsError:
    return EcsError("InvalidAccessKeyId.NotFound", "Specified access key is not found.", 400)


def access_key_disabled() -> EcsError:
    return EcsError("Forbidden.AccessKeyDisabled", "The Access Key is disabled.", 403)


def operation_conflict(resource_id: str, task_id: str | None) -> EcsError:
    by = f" by task {task_id}" if task_id else ""
    return EcsError("Operation.Conflict",
                    f"Another operation is being performed on {resource_id}{by}; try again later.",
                    403)


def incorrect_instance_status(instance_id: str, status: str, wanted: str,
                              http_status: int = 403) -> EcsError:
    return EcsError("IncorrectInstanceStatus",
                    f"The current status of instance {instance_id} is {status}; "
                    f"the operation needs {wanted}.", http_status)


def dry_run_passed() -> EcsError:
    return EcsError("DryRunOperation",
                    "Request validation has been passed with DryRun flag set.", 400)
