"""Both ECS pagination styles over a repository: PageNumber/PageSize and NextToken/MaxResults."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Generic, TypeVar

from ecsnap.adapters.store.base import Criteria, Repository
from ecsnap.domain.errors import EcsError

T = TypeVar("T")

# ECS's PageNumber is an Integer (32 bits): a larger one is InvalidParameter.PageNumber,
# and (PageNumber - 1) * PageSize then always fits a 64-bit SQL OFFSET.
MAX_PAGE_NUMBER = 2**31 - 1


@dataclass
class Page(Generic[T]):
    items: list[T]
    total: int
    page_number: int
    page_size: int
    next_token: str


def _encode(obj: Any) -> str:
    raw = f"{obj.created.isoformat()}|{obj.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(token: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, obj_id = raw.split("|", 1)
        return datetime.fromisoformat(created), obj_id
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise EcsError("InvalidParameter.NextToken",
                       "The specified NextToken is not valid.", 400) from exc


def check_page(page_number: int | None, page_size: int | None,
               max_page_size: int = 100) -> tuple[int, int]:
    """PageNumber and PageSize, 1 and 10 when None or 0, or the ECS error: PageNumber is
    1 to 2**31 - 1 and PageSize 1 to `max_page_size`, so the page's offset stays a 64-bit
    integer whatever the client sends."""
    number = page_number or 1
    size = page_size or 10
    if not 1 <= number <= MAX_PAGE_NUMBER:
        raise EcsError("InvalidParameter.PageNumber",
                       f"PageNumber must be between 1 and {MAX_PAGE_NUMBER}.", 400)
    if not 1 <= size <= max_page_size:
        raise EcsError("InvalidParameter.PageSize",
                       f"PageSize must be between 1 and {max_page_size}.", 400)
    return number, size


def page_list(rows: list[T], *, page_number: int | None = None, page_size: int | None = None,
              next_token: str | None = None, max_results: int | None = None,
              max_page_size: int = 100) -> Page[T]:
    """A page of `rows`, a list already in memory (and in a stable order), in either style:
    a NextToken (or MaxResults) selects the token style, whose token is the offset of the
    next page."""
    if next_token is not None or max_results is not None:
        size = max_results or 10
        if not 1 <= size <= max_page_size:
            raise EcsError("InvalidParameter.MaxResults",
                           f"MaxResults must be between 1 and {max_page_size}.", 400)
        start = _decode_offset(next_token) if next_token else 0
        more = start + size < len(rows)
        token = base64.urlsafe_b64encode(f"offset|{start + size}".encode()).decode() \
            if more else ""
        return Page(rows[start:start + size], len(rows), 1, size, token.rstrip("="))
    number, size = check_page(page_number, page_size, max_page_size)
    return Page(rows[(number - 1) * size:number * size], len(rows), number, size, "")


def _decode_offset(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        kind, offset = raw.split("|", 1)
        if kind == "offset" and offset.isdigit():
            return int(offset)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise EcsError("InvalidParameter.NextToken", "The specified NextToken is not valid.", 400)


def paginate(repo: Repository[T], criteria: Criteria, *, page_number: int | None = None,
             page_size: int | None = None, next_token: str | None = None,
             max_results: int | None = None, max_page_size: int = 100,
             token_only: bool = False, as_rows: bool = False) -> Page[Any]:
    """A page of `repo` under `criteria`. A NextToken (or MaxResults, or `token_only`) selects
    the token style, whose pages are keyset-based and stay cheap however deep one walks.
    `as_rows`: the page's items are rows (`repo.rows()`: every column, as a named tuple),
    not objects; what the Describe* listings show."""
    fetch = repo.rows if as_rows else repo.find
    token_style = token_only or next_token is not None or max_results is not None
    if token_style:
        size = max_results or 10
        if not 1 <= size <= max_page_size:
            raise EcsError("InvalidParameter.MaxResults",
                           f"MaxResults must be between 1 and {max_page_size}.", 400)
        after = _decode(next_token) if next_token else None
        rows = fetch(criteria=replace(criteria, after=after, limit=size + 1, offset=0))
        more = len(rows) > size
        rows = rows[:size]
        token = _encode(rows[-1]) if more and rows else ""
        total = repo.count(replace(criteria, after=None, limit=None, offset=0))
        return Page(rows, total, 1, size, token)
    number, size = check_page(page_number, page_size, max_page_size)
    rows = fetch(criteria=replace(criteria, offset=(number - 1) * size, limit=size))
    total = repo.count(replace(criteria, offset=0, limit=None))
    return Page(rows, total, number, size, "")
