"""Decode the flat ECS request parameters into the values an action needs.

Both SDKs send every parameter as one flat string pair (SDK-WIRE.md §2.4):

* repeat lists ``X.N`` (N from 1), lists of structs ``X.N.Field``, nested ``X.N.Field.M``;
* booleans as ``True`` / ``False`` (read case-insensitively), integers as decimal strings;
* JSON arrays inside one string (``InstanceIds='["i-1","i-2"]'``);
* blank values (``Description=``), which are values, not absent parameters.

An action states what it reads, e.g. ``p.str("InstanceId", required=True)``,
``p.int("PageSize", min=1, max=100)``, ``p.bool("DryRun", default=False)``. Every accessor
raises only :class:`EcsError` (``MissingParameter`` / ``InvalidParameter`` by default, both
400, with a message naming the parameter), whatever strings arrive. Parameters nobody asks
for are ignored by this class; an action's parameter policy (``actions.Policy``) refuses
those that would change the meaning of the call (``UnsupportedParameter``).

Every accessor notes the name it reads (``read_names``, list indices written ``N``:
``DataDisk.N.Size``), so tests can tell which parameters an action reads.

Decisions where the docs are silent: list indices must be written ``1``, ``2``… without
leading zeros (``X.0`` or ``X.01`` are unknown parameters and ignored); gaps are allowed
and items come back in index order. For typed values (int, bool, enum, JSON list) a blank
value counts as not given; for ``required`` strings a blank value counts as missing.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Literal, overload

from ecsnap.domain.errors import EcsError, invalid_parameter, missing_parameter

_INDEX = re.compile(r"[1-9][0-9]{0,5}")
_INDEX_SEGMENT = re.compile(r"(?<=\.)[1-9][0-9]{0,5}(?=\.|$)")
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_DECIMAL = re.compile(r"-?[0-9]{1,18}(\.[0-9]{1,18})?")
MAX_JSON_LENGTH = 256 * 1024

Str = builtins.str
Object = dict[Str, Str | builtins.list[Str]]


def pattern(name: Str) -> Str:
    """A parameter's name with its list indices written ``N``: ``DataDisk.2.Size`` is
    ``DataDisk.N.Size``, ``InstanceId.1`` is ``InstanceId.N``."""
    return _INDEX_SEGMENT.sub("N", name)


class Params:
    """A read-only view of the request parameters, optionally scoped under a prefix
    (the view of ``DataDisk.2.`` names its parameters ``DataDisk.2.Size`` in errors)."""

    def __init__(self, values: Mapping[Str, Str], prefix: Str = "",
                 reads: builtins.set[Str] | None = None) -> None:
        self._values = dict(values)
        self._prefix = prefix
        self._reads: builtins.set[Str] = set() if reads is None else reads

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[Str, Str]]) -> Params:
        """From decoded request pairs; a name given twice is ``InvalidParameter``."""
        values: dict[Str, Str] = {}
        for name, value in pairs:
            if name in values:
                raise invalid_parameter(name, "It is given more than once.")
            values[name] = value
        return cls(values)

    def __repr__(self) -> Str:
        return f"Params({self._values!r}, prefix={self._prefix!r})"

    def __contains__(self, name: object) -> builtins.bool:
        return name in self._values

    def full_name(self, name: Str) -> Str:
        """The parameter's name as the client wrote it (prefix included)."""
        return self._prefix + name

    def _note(self, name: Str) -> None:
        self._reads.add(pattern(self._prefix + name))

    def read_names(self) -> frozenset[Str]:
        """The parameters read so far (by this view and those scoped from it), as patterns
        (``DataDisk.N.Size``)."""
        return frozenset(self._reads)

    def given(self) -> builtins.list[tuple[Str, Str]]:
        """Every parameter sent with a value that is not blank, ``(name, value)`` by name."""
        return sorted((k, v) for k, v in self._values.items() if v != "")

    def raw(self, name: Str) -> Str | None:
        """The value as received, blank kept; None when absent."""
        self._note(name)
        return self._values.get(name)

    def _missing(self, name: Str) -> EcsError:
        return missing_parameter(self.full_name(name))

    def _invalid(self, name: Str, why: Str, code: Str | None = None,
                 status: builtins.int = 400) -> EcsError:
        if code is None:
            return invalid_parameter(self.full_name(name), why)
        return EcsError(code, f"The specified parameter \"{self.full_name(name)}\" is not "
                              f"valid. {why}".strip(), status)

    def _typed(self, name: Str, required: builtins.bool) -> Str | None:
        self._note(name)
        value = self._values.get(name)
        if value is None or value == "":
            if required:
                raise self._missing(name)
            return None
        return value

    # -------------------------------------------------------------- scalars

    @overload
    def str(self, name: Str, *, required: Literal[True], default: None = None) -> Str: ...
    @overload
    def str(self, name: Str, *, required: builtins.bool = False, default: Str) -> Str: ...
    @overload
    def str(self, name: Str, *, required: builtins.bool = False,
            default: None = None) -> Str | None: ...

    def str(self, name: Str, *, required: builtins.bool = False,
            default: Str | None = None) -> Str | None:
        """A string; a blank value is returned as ``""`` (``MissingParameter`` if
        ``required``); ``default`` when absent."""
        self._note(name)
        value = self._values.get(name)
        if value is None or (required and value == ""):
            if required:
                raise self._missing(name)
            return default
        return value

    @overload
    def int(self, name: Str, *, required: Literal[True], default: None = None,
            min: builtins.int | None = None, max: builtins.int | None = None,
            code: Str | None = None) -> builtins.int: ...
    @overload
    def int(self, name: Str, *, required: builtins.bool = False, default: builtins.int,
            min: builtins.int | None = None, max: builtins.int | None = None,
            code: Str | None = None) -> builtins.int: ...
    @overload
    def int(self, name: Str, *, required: builtins.bool = False, default: None = None,
            min: builtins.int | None = None, max: builtins.int | None = None,
            code: Str | None = None) -> builtins.int | None: ...

    def int(self, name: Str, *, required: builtins.bool = False,
            default: builtins.int | None = None, min: builtins.int | None = None,
            max: builtins.int | None = None, code: Str | None = None) -> builtins.int | None:
        """A decimal integer (optional ``-``, ASCII digits, at most 18 of them) within
        ``min``..``max``; ``code`` replaces ``InvalidParameter`` for a bad value."""
        value = self._typed(name, required)
        if value is None:
            return default
        if not _INTEGER.fullmatch(value):
            raise self._invalid(name, "It must be an integer.", code)
        number = builtins.int(value)
        if (min is not None and number < min) or (max is not None and number > max):
            low = "" if min is None else f" at least {min}"
            high = "" if max is None else f" at most {max}"
            joint = " and" if low and high else ""
            raise self._invalid(name, f"It must be{low}{joint}{high}.", code)
        return number

    def float(self, name: Str, *, min: builtins.float | None = None,
              max: builtins.float | None = None) -> builtins.float | None:
        """A decimal number (``0.5``, ``512``; no exponent, no ``nan``); None when absent or
        blank."""
        value = self._typed(name, False)
        if value is None:
            return None
        if not _DECIMAL.fullmatch(value):
            raise self._invalid(name, "It must be a number.")
        number = builtins.float(value)
        if (min is not None and number < min) or (max is not None and number > max):
            raise self._invalid(name, f"It must be within {min} and {max}.")
        return number

    @overload
    def bool(self, name: Str, *, required: Literal[True],
             default: None = None) -> builtins.bool: ...
    @overload
    def bool(self, name: Str, *, required: builtins.bool = False,
             default: builtins.bool) -> builtins.bool: ...
    @overload
    def bool(self, name: Str, *, required: builtins.bool = False,
             default: None = None) -> builtins.bool | None: ...

    def bool(self, name: Str, *, required: builtins.bool = False,
             default: builtins.bool | None = None) -> builtins.bool | None:
        """``true`` / ``false`` in any letter case (the SDKs send ``True`` / ``False``)."""
        value = self._typed(name, required)
        if value is None:
            return default
        lowered = value.lower()
        if lowered == "true":
            return True
        if lowered == "false":
            return False
        raise self._invalid(name, "It must be true or false.")

    @overload
    def enum(self, name: Str, allowed: Collection[Str], *, required: Literal[True],
             default: None = None, code: Str | None = None) -> Str: ...
    @overload
    def enum(self, name: Str, allowed: Collection[Str], *, required: builtins.bool = False,
             default: Str, code: Str | None = None) -> Str: ...
    @overload
    def enum(self, name: Str, allowed: Collection[Str], *, required: builtins.bool = False,
             default: None = None, code: Str | None = None) -> Str | None: ...

    def enum(self, name: Str, allowed: Collection[Str], *, required: builtins.bool = False,
             default: Str | None = None, code: Str | None = None) -> Str | None:
        """One of ``allowed`` (exact, case-sensitive, like ECS parameter values)."""
        value = self._typed(name, required)
        if value is None:
            return default
        if value not in allowed:
            raise self._invalid(name, f"Valid values: {', '.join(sorted(allowed))}.", code)
        return value

    # -------------------------------------------------------------- lists

    def _indexed(self, name: Str) -> builtins.list[tuple[builtins.int, Str, Str]]:
        """``(N, rest, value)`` for every ``name.N`` (rest ``""``) or ``name.N.rest``."""
        found = []
        head = name + "."
        for key, value in self._values.items():
            if key.startswith(head):
                index, _, rest = key[len(head):].partition(".")
                if _INDEX.fullmatch(index) and (rest or not key.endswith(".")):
                    found.append((builtins.int(index), rest, value))
        return found

    def _limit(self, name: Str, count: builtins.int, max_items: builtins.int | None) -> None:
        if max_items is not None and count > max_items:
            raise self._invalid(f"{name}.N", f"At most {max_items} items may be given.")

    def list(self, name: Str, *, max_items: builtins.int | None = None) -> builtins.list[Str]:
        """The repeat list ``name.1``, ``name.2``… in index order (empty when absent);
        blank items are kept."""
        self._note(name + ".1")
        items = sorted((i, v) for i, rest, v in self._indexed(name) if not rest)
        self._limit(name, len(items), max_items)
        return [value for _, value in items]

    def items(self, name: Str, *,
              max_items: builtins.int | None = None) -> builtins.list[Params]:
        """One scoped view per index of ``name.N.Field…``, in index order, so nested
        parameters decode with the same accessors: ``for d in p.items("DataDisk"):
        d.int("Size")``; ``X.N.Field.M`` is ``item.list("Field")``."""
        groups: dict[builtins.int, dict[Str, Str]] = {}
        for index, rest, value in self._indexed(name):
            if rest:
                groups.setdefault(index, {})[rest] = value
        self._limit(name, len(groups), max_items)
        return [Params(groups[i], f"{self._prefix}{name}.{i}.", self._reads)
                for i in sorted(groups)]

    def objects(self, name: Str, fields: Iterable[Str], *,
                max_items: builtins.int | None = None) -> builtins.list[Object]:
        """``name.N.Field`` as dicts in index order, each holding the given ``fields`` that
        were sent (a string, or a list of strings for ``name.N.Field.M``); indices that
        carry none of the fields are left out."""
        wanted = tuple(fields)
        result: builtins.list[Object] = []
        for field in wanted:
            self._note(f"{name}.1.{field}")
        for item in self.items(name):
            found: Object = {}
            for field in wanted:
                scalar = item.raw(field)
                if scalar is not None:
                    found[field] = scalar
                elif nested := item.list(field):
                    found[field] = nested
            if found:
                result.append(found)
        self._limit(name, len(result), max_items)
        return result

    def json_list(self, name: Str, *, required: builtins.bool = False,
                  max_items: builtins.int | None = 100) -> builtins.list[Str] | None:
        """A JSON array of strings inside one parameter (``InstanceIds='["i-1"]'``); None
        when absent or blank, ``[]`` for ``[]`` (a real filter matching nothing)."""
        value = self._typed(name, required)
        if value is None:
            return None
        why = "It must be a JSON array of strings."
        if len(value) > MAX_JSON_LENGTH:
            raise self._invalid(name, why)
        try:
            data = json.loads(value)
        except (ValueError, RecursionError):
            raise self._invalid(name, why) from None
        if not isinstance(data, builtins.list) or not all(isinstance(x, Str) for x in data):
            raise self._invalid(name, why)
        try:
            for item in data:
                item.encode("utf-8")
        except UnicodeEncodeError:
            raise self._invalid(name, why) from None
        if max_items is not None and len(data) > max_items:
            raise self._invalid(name, f"At most {max_items} items may be given.")
        return data

    def csv(self, name: Str) -> builtins.list[Str] | None:
        """A comma-separated list (DescribeTasks ``TaskIds``, DescribeImages ``Status``);
        items are stripped and blanks dropped; None when absent or blank."""
        value = self._typed(name, False)
        if value is None:
            return None
        return [part.strip() for part in value.split(",") if part.strip()]

    def tags(self, name: Str = "Tag", *,
             max_items: builtins.int | None = None) -> dict[Str, Str]:
        """``Tag.N.Key`` / ``Tag.N.Value`` (or the deprecated ``Tag.N.key`` /
        ``Tag.N.value``) as a dict in index order; a missing value is ``""``. A value
        without a key is ``MissingParameter``, a key given twice ``InvalidParameter``.
        Key and value rules are the domain's (``rules.check_tags``)."""
        result: dict[Str, Str] = {}
        for field in ("Key", "Value", "key", "value"):
            self._note(f"{name}.1.{field}")
        for item in self.items(name):
            key = item.raw("Key")
            if key is None:
                key = item.raw("key")
            value = item.raw("Value")
            if value is None:
                value = item.raw("value")
            if key is None:
                if value is not None:
                    raise item._missing("Key")
                continue
            if key in result:
                raise item._invalid("Key", f"The tag key \"{key}\" is given more than once.")
            result[key] = value or ""
        self._limit(name, len(result), max_items)
        return result
