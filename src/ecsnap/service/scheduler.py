"""The scheduler of automatic snapshot policies: a background thread of `ecsnap serve` that
runs `policies.run_due` every `snapshot_policy_interval_s` seconds.

The clock is injected (`clock`, UTC naive datetimes): tests call `tick()` with a clock they
move, and never sleep. Every snapshot a tick takes is journaled (a TakeSnapshots task), and
"taken" is recorded in the same transaction, so a crash, a restart or a second scheduler
never takes a time point twice (service/policies.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from ecsnap.domain.model import utcnow
from ecsnap.service import policies
from ecsnap.service.context import ServiceContext

log = logging.getLogger("ecsnap.policies")

Clock = Callable[[], datetime]


class PolicyScheduler:
    def __init__(self, ctx: ServiceContext, *, clock: Clock = utcnow,
                 interval_s: float | None = None) -> None:
        self.ctx = ctx
        self.clock = clock
        self.interval_s = ctx.settings.snapshot_policy_interval_s if interval_s is None \
            else interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> policies.TickReport:
        """One pass at the clock's time: the due snapshots, then retention."""
        return policies.run_due(self.ctx, self.clock())

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ecsnap-policies",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # one bad tick never stops the scheduler
                log.exception("automatic snapshot policies: the tick failed")
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the tick under way (its tasks are journaled: recovery has them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def start_scheduler(ctx: ServiceContext, *, clock: Clock = utcnow,
                    interval_s: float | None = None) -> PolicyScheduler:
    """The scheduler of `ecsnap serve`, started; call `stop()` when the server stops."""
    scheduler = PolicyScheduler(ctx, clock=clock, interval_s=interval_s)
    scheduler.start()
    return scheduler
