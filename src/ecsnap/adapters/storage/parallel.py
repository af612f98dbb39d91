"""Per-disk storage work side by side, on one thread pool the storage backends share.

The work itself is in child processes (qemu-img) or in librbd, so threads only wait; a pool
made once keeps a thread start (a few ms each on a busy host) out of every snapshot and
rollback. Nothing run here submits work to this pool again, so it cannot deadlock.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ecsnap.adapters.storage.base import StorageError

T = TypeVar("T")

def _new_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=16, thread_name_prefix="storage")


_POOL = _new_pool()


def _after_fork_in_child() -> None:
    # a forked child has none of the parent's threads, but the pool would believe its idle
    # ones are there and wait for them for ever: the child gets a pool of its own
    global _POOL
    _POOL = _new_pool()


os.register_at_fork(after_in_child=_after_fork_in_child)


def side_by_side(fn: Callable[[T], object], items: Sequence[T],
                 ) -> list[tuple[T, BaseException | None]]:
    """Run `fn` on every item at once; every item's outcome, in order, once all have ended
    (a StorageError, OSError or ValueError is the item's outcome; anything else, a bug,
    is raised)."""
    def outcome(item: T) -> tuple[T, BaseException | None]:
        try:
            fn(item)
            return item, None
        except (StorageError, OSError, ValueError) as exc:
            return item, exc

    if len(items) <= 1:
        return [outcome(item) for item in items]
    return list(_POOL.map(outcome, items))
