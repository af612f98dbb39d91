"""An exclusive `flock` taken with a deadline (the image builder and the QEMU driver)."""

from __future__ import annotations

import fcntl
import time
from typing import IO


def flock_until(handle: IO[str], deadline: float, poll: float) -> bool:
    """Take an exclusive lock on the open file, trying every `poll` seconds until the
    `time.monotonic()` deadline; False if another process still holds it then."""
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)
