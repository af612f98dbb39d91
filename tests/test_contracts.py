"""Every adapter satisfies the Protocols of its contract (adapters/*/base.py), and so does
every test double: each method the Protocol declares is there, with the same parameter
names, kinds and defaults (extra parameters only with a default), and each property is
there as a property or an attribute. Structural, after OpenStack Cinder's
tests/compliance/test_volume_drivers.py. Nothing is started: no qemu-img, no QEMU.

Every Protocol class of the base modules must be covered: either listed in `IMPLEMENTED`
or a base of one that is (ComputeDriver's capability Protocols are checked through it).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from ecsnap.adapters.compute import base as compute_base
from ecsnap.adapters.compute import guest_image
from ecsnap.adapters.compute.qemu import QemuDriver
from ecsnap.adapters.inspect import base as inspect_base
from ecsnap.adapters.inspect import debugfs
from ecsnap.adapters.inspect.debugfs import DebugfsReader
from ecsnap.adapters.storage import base as storage_base
from ecsnap.adapters.storage.qcow2 import Qcow2Backend
from ecsnap.adapters.storage.rbd import RbdBackend
from ecsnap.adapters.store import base as store_base
from ecsnap.adapters.store.sql import SqlRepository, SqlUnitOfWork
from tests.doubles import FileBackedCompute
from tests.fakes.compute import InMemoryCompute
from tests.fakes.storage import InMemoryStorage
from tests.fakes.store import InMemoryUnitOfWork, MemoryKeyedRepository, MemoryRepository

BASE_MODULES: tuple[ModuleType, ...] = (compute_base, storage_base, store_base, inspect_base)

# Protocol -> what implements it: classes, or functions for a Protocol that is a __call__
IMPLEMENTED: list[tuple[type, list[Any]]] = [
    (storage_base.StorageBackend, [Qcow2Backend, RbdBackend, InMemoryStorage]),
    (storage_base.ImageImport, [Qcow2Backend, InMemoryStorage]),
    (storage_base.CloneRevert, [RbdBackend]),
    (storage_base.PoolSpace, [RbdBackend]),
    (storage_base.ClientFencing, [RbdBackend]),
    (storage_base.DiskFromSnapshot, [Qcow2Backend, RbdBackend, InMemoryStorage]),
    (storage_base.ImageFromSnapshot, [Qcow2Backend, RbdBackend, InMemoryStorage]),
    (compute_base.ComputeDriver, [QemuDriver, InMemoryCompute, FileBackedCompute]),
    (compute_base.BuiltImage, [guest_image.DemoImage]),
    (compute_base.GuestImageBuilder, [guest_image.build_demo_image]),
    (inspect_base.FileSystemReader, [DebugfsReader]),
    (inspect_base.FileSystemWriter, [DebugfsReader]),
    (inspect_base.OpenDisk, [debugfs._Opened]),
    (store_base.UnitOfWork, [SqlUnitOfWork, InMemoryUnitOfWork]),
    (store_base.Repository, [SqlRepository, MemoryRepository]),
    (store_base.KeyedRepository, [SqlRepository, MemoryKeyedRepository]),
]

# Known mismatches of the product, each a strict xfail: when it is fixed, the test says so.
KNOWN: dict[tuple[str, str], str] = {}

CALLABLE_DUNDERS = {"__enter__", "__exit__", "__call__"}


def is_protocol(obj: object) -> bool:
    return isinstance(obj, type) and bool(getattr(obj, "_is_protocol", False)) \
        and obj.__module__ != "typing"


def protocols_of(module: ModuleType) -> list[type]:
    return [v for v in vars(module).values() if is_protocol(v) and v.__module__ == module.__name__]


def members(protocol: type) -> dict[str, object]:
    """What a Protocol declares, its own and its Protocol bases': methods, properties and
    plain annotations (attributes), by name."""
    found: dict[str, object] = {}
    for cls in reversed(protocol.__mro__):
        if not is_protocol(cls):
            continue
        for name in getattr(cls, "__annotations__", {}):
            found[name] = "attribute"
        for name, value in vars(cls).items():
            if name.startswith("_") and name not in CALLABLE_DUNDERS:
                continue
            if inspect.isfunction(value) or isinstance(value, property):
                found[name] = value
    return found


def _signature_problems(where: str, expected: Callable[..., Any], actual: Callable[..., Any],
                        *, bound: bool = False) -> list[str]:
    want = list(inspect.signature(expected).parameters.values())
    have = list(inspect.signature(actual).parameters.values())
    if bound:  # a function standing for a Protocol's __call__: no self
        want = want[1:]
    problems: list[str] = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    have_positional = [p for p in have if p.kind in positional]
    have_by_name = {p.name: p for p in have}
    used: set[str] = set()
    for n, p in enumerate(q for q in want if q.kind in positional):
        if n >= len(have_positional):
            problems.append(f"{where}: parameter {p.name!r} is missing")
            continue
        q = have_positional[n]
        used.add(q.name)
        if q.name != p.name:
            problems.append(f"{where}: parameter {n} is {q.name!r}, the contract's {p.name!r}")
        elif q.kind != p.kind:
            problems.append(f"{where}: {p.name!r} is {q.kind.description}, the contract's "
                            f"{p.kind.description}")
        elif q.default != p.default:
            problems.append(f"{where}: {p.name!r} defaults to {q.default!r}, the contract's "
                            f"{p.default!r}")
    for p in (q for q in want if q.kind == inspect.Parameter.KEYWORD_ONLY):
        named = have_by_name.get(p.name)
        if named is None:
            problems.append(f"{where}: keyword parameter {p.name!r} is missing")
            continue
        used.add(named.name)
        if named.kind != p.kind:
            problems.append(f"{where}: {p.name!r} is {named.kind.description}, the "
                            f"contract's {p.kind.description}")
        elif named.default != p.default:
            problems.append(f"{where}: {p.name!r} defaults to {named.default!r}, the "
                            f"contract's {p.default!r}")
    for kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        wanted = any(p.kind == kind for p in want)
        had = [q for q in have if q.kind == kind]
        used.update(q.name for q in had)
        if wanted and not had:
            problems.append(f"{where}: takes no {'*args' if kind.value == 2 else '**kwargs'}")
    for q in have:
        if q.name not in used and q.default is inspect.Parameter.empty and q.kind in (
                *positional, inspect.Parameter.KEYWORD_ONLY):
            problems.append(f"{where}: extra parameter {q.name!r} has no default")
    return problems


def problems(protocol: type, impl: Any) -> list[str]:
    """Why `impl` does not satisfy `protocol` (empty: it does)."""
    declared = members(protocol)
    if not isinstance(impl, type):  # a function for a Protocol that is only a __call__
        assert set(declared) == {"__call__"}, f"{protocol.__name__} is not a __call__"
        call = declared["__call__"]
        assert inspect.isfunction(call)
        return _signature_problems(f"{impl.__name__}", call, impl, bound=True)
    fields = {f.name for f in dataclasses.fields(impl)} if dataclasses.is_dataclass(impl) \
        else set()
    annotated = {n for c in impl.__mro__ for n in getattr(c, "__annotations__", {})}
    out: list[str] = []
    for name, declared_as in declared.items():
        where = f"{impl.__name__}.{name}"
        try:
            found = inspect.getattr_static(impl, name)
        except AttributeError:
            if not isinstance(declared_as, property | str) or \
                    name not in fields | annotated:
                out.append(f"{where} is missing")
            continue
        if isinstance(declared_as, property | str):
            if not isinstance(found, property | functools.cached_property) and \
                    name not in fields | annotated:
                out.append(f"{where} is not a property or an attribute")
            continue
        assert inspect.isfunction(declared_as)
        if isinstance(found, staticmethod | classmethod):
            out.append(f"{where} is a {type(found).__name__}, the contract's a method")
            continue
        if not inspect.isfunction(found):
            out.append(f"{where} is not a method")
            continue
        out += _signature_problems(where, declared_as, found)
    return out


def cases() -> list[Any]:
    out = []
    for protocol, impls in IMPLEMENTED:
        for impl in impls:
            reason = KNOWN.get((protocol.__name__, impl.__name__))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(protocol, impl, marks=marks,
                                    id=f"{protocol.__name__}-{impl.__name__}"))
    return out


@pytest.mark.parametrize(("protocol", "impl"), cases())
def test_the_implementation_satisfies_its_protocol(protocol: type, impl: Any) -> None:
    assert problems(protocol, impl) == []


def test_every_protocol_of_the_contracts_is_checked() -> None:
    covered = {cls for protocol, _ in IMPLEMENTED for cls in protocol.__mro__ if is_protocol(cls)}
    declared = {p for module in BASE_MODULES for p in protocols_of(module)}
    assert declared, "no Protocol found in the base modules"
    assert sorted(p.__name__ for p in declared - covered) == []


def test_the_capabilities_add_up_to_the_compute_driver() -> None:
    capabilities = [c for c in compute_base.ComputeDriver.__mro__[1:] if is_protocol(c)]
    assert members(compute_base.ComputeDriver).keys() == \
        {name for c in capabilities for name in members(c)}


# ------------------------------------------------------------------ the check checks


def _without(cls: type, name: str) -> type:
    return type(f"{cls.__name__}Without_{name}", (),
                {k: v for k, v in vars(cls).items() if k != name})


def test_a_missing_method_is_caught() -> None:
    broken = _without(InMemoryStorage, "revert_many")
    assert problems(storage_base.StorageBackend, broken) == \
        [f"{broken.__name__}.revert_many is missing"]
    broken = _without(InMemoryUnitOfWork, "__exit__")
    assert problems(store_base.UnitOfWork, broken) == [f"{broken.__name__}.__exit__ is missing"]
    broken = _without(InMemoryUnitOfWork, "snapshots")
    assert problems(store_base.UnitOfWork, broken) == \
        [f"{broken.__name__}.snapshots is missing"]


def test_a_renamed_or_changed_parameter_is_caught() -> None:
    class Renamed(InMemoryStorage):
        def has_snapshot(self, disk: str, snapshot_id: str) -> bool:
            return False

    class NewDefault(InMemoryCompute):
        def stop(self, instance_id: str, *, force: bool = True, timeout: float = 30.0) -> None:
            pass

    class Positional(InMemoryCompute):
        def guest_ping(self, instance_id: str, timeout: float = 5.0) -> bool:
            return True

    class Required(InMemoryCompute):
        def reboot(self, instance_id: str, *, force: bool = False,  # type: ignore[override]
                   why: str) -> None:
            pass

    class NoKwargs(MemoryRepository[Any]):
        def find(self, criteria: Any = None) -> list[Any]:  # type: ignore[override]
            return []

    assert problems(storage_base.StorageBackend, Renamed) == \
        ["Renamed.has_snapshot: parameter 1 is 'disk', the contract's 'disk_id'"]
    assert problems(compute_base.ComputeDriver, NewDefault) == \
        ["NewDefault.stop: 'force' defaults to True, the contract's False"]
    assert problems(compute_base.ComputeDriver, Positional) == \
        ["Positional.guest_ping: 'timeout' is positional or keyword, the contract's "
         "keyword-only"]
    assert problems(compute_base.ComputeDriver, Required) == \
        ["Required.reboot: extra parameter 'why' has no default"]
    assert problems(store_base.Repository, NoKwargs) == ["NoKwargs.find: takes no **kwargs"]


def test_a_property_that_became_a_method_is_caught() -> None:
    class Method(InMemoryUnitOfWork):
        def disks(self) -> Any:  # type: ignore[override]
            return None

    assert problems(store_base.UnitOfWork, Method) == \
        ["Method.disks is not a property or an attribute"]
