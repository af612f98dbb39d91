"""Cluster mode: several API processes, one agent per host, tasks carried by PostgreSQL.

The `Task` row is the job. An API process (`ecsnap serve` with `cluster` set) journals
a task as it always did — the row, its locks and what users see, in the caller's one
transaction — and adds the host that must run it (`Operation.runs_on`) and a NOTIFY on
`CHANNEL`, sent by PostgreSQL when that transaction commits. It runs no step, owns no VM
and recovers nothing: it waits for a short task's end, told by the agent's NOTIFY on
`ENDED` (or by reading its row now and then).

An agent (`ecsnap agent --host-id H`, one per host) registers its `Host` row under a new
epoch, then:

- claims Processing tasks routed to it or to any host (`FOR UPDATE SKIP LOCKED`, so one
  agent gets each), setting owner, owner_epoch and a lease, when woken by a NOTIFY or
  every `heartbeat_s`; it drives each one with the runner, as the single-process build
  does, or — when an agent had claimed it before (it was cut short) — resumes it with the
  start-up recovery's per-task logic (`recovery.resume_task`);
- heartbeats every `heartbeat_s` (`UPDATE hosts SET heartbeat_at WHERE id AND epoch AND
  Up`) and renews the leases of the tasks it drives;
- checks its peers: a host whose last heartbeat is older than `host_timeout_s` is
  fenced by whichever agent wins the conditional UPDATE (epoch+1, Fenced), its Ceph
  clients blocklisted first (in that transaction, so nothing is taken over before), then
  its instances are marked Stopped and its tasks become claimable (their owner is no
  longer Up at the epoch that claimed them); the instances that ran there on shared
  storage are started again on other hosts, their StartInstance journaled in the
  transaction that marks them Stopped (`settle`; setting `restart_fenced`). Death is
  only ever decided from missing heartbeats, never from one failed call.

Epoch fencing: every commit an agent makes while driving a task (a step done, the end, a
note, the failure) is accepted only if, in that transaction, its host row is still Up at
its epoch and the task still its own (`hold_epoch`: SELECT ... FOR SHARE). Otherwise the
transaction is rolled back and `Fenced` raised: the agent stops working on the task.
A fenced agent that comes back finds its heartbeat refused, stops the VMs of its run
directory and rejoins under a new epoch, empty.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from ecsnap.adapters.compute.base import ComputeDriver
from ecsnap.adapters.storage.base import ClientFencing
from ecsnap.adapters.store.base import UnitOfWork
from ecsnap.domain import errors
from ecsnap.domain.errors import EcsError
from ecsnap.domain.model import Host, HostState, Instance, InstanceStatus, Task, TaskStatus
from ecsnap.service import commands, instances, recovery
from ecsnap.service.context import ServiceContext, attached_disks
from ecsnap.service.operation import Operation, P
from ecsnap.service.tasks import Fenced, TaskRunner

log = logging.getLogger("ecsnap.cluster")

CHANNEL = commands.AGENTS_CHANNEL  # something to claim (payload: a task ID; "": anything)
ENDED = "ecsnap_ended"  # a task ended (payload: its ID), for the API processes waiting
POLL_S = 0.5  # an API process waiting for a task reads its row when told, or this often

# (host ID, epoch, task ID) of the task this thread drives: its commits are fenced
_DRIVING: contextvars.ContextVar[tuple[str, int, str] | None] = \
    contextvars.ContextVar("ecsnap_driving", default=None)
# this thread's task was just found ours under our epoch (its claim, or a step marked done:
# fenced commits) and nothing has run since: the runner's next guard has nothing to add
_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("ecsnap_checked", default=False)


def now() -> datetime:
    """Naive UTC with microseconds (model.utcnow drops them); the agents read the
    database's clock instead (`UnitOfWork.clock`)."""
    return datetime.now(UTC).replace(tzinfo=None)  # the store keeps naive UTC


def not_here(what: str) -> EcsError:
    return EcsError("OperationDenied.ClusterApi",
                    f"{what} needs the instance's host; in cluster mode the API process "
                    "has no hypervisor. Use the instance's agent.", 403)


class ApiRunner(TaskRunner):
    """The runner of an API process in cluster mode: journals for the agents, runs nothing."""

    def __init__(self, ctx: ServiceContext, operations: Iterable[type[Operation[Any]]], *,
                 wait_for_ended: Callable[[float], list[str]] | None = None) -> None:
        super().__init__(ctx, operations, background=False)
        self._waiting: dict[str, list[threading.Event]] = {}
        self._waiting_lock = threading.Lock()
        self._wait_for_ended = wait_for_ended
        self._hearing = False

    def _hear(self, wait_for_ended: Callable[[float], list[str]]) -> None:
        while True:
            for task_id in wait_for_ended(5.0):
                with self._waiting_lock:
                    events = list(self._waiting.get(task_id, []))
                for event in events:
                    event.set()

    def journal(self, uow: UnitOfWork, op_type: type[Operation[P]], plan: P, *,
                account_id: str, region_id: str, resource_id: str,
                task_id: str | None = None) -> Task:
        task = super().journal(uow, op_type, plan, account_id=account_id,
                               region_id=region_id, resource_id=resource_id, task_id=task_id)
        route(uow, task, op_type, plan)
        return task

    def drive(self, task_or_id: Task | str) -> Task:
        raise RuntimeError("an API process in cluster mode drives no task")

    def submit(self, task: Task, *, wait_up_to: float = 0.0) -> None:
        """The task is the agents' (they were woken by the journal's NOTIFY): wait up to
        `wait_up_to` seconds for its end, reading its row. (Fault injection for tests:
        ECSNAP_CRASH_AT=`Action:journaled:after` kills the API process here, its task
        committed and its answer not sent.)"""
        self._crash_point(task.action, "journaled", "journaled", "after")
        if wait_up_to > 0:
            self._poll(task.id, wait_up_to, told_is_enough=True)

    def spawn(self, job: Callable[[], None]) -> None:
        raise not_here("A Cloud Assistant command")

    def wait(self, task_id: str, timeout: float | None = None) -> Task:
        task = self._poll(task_id, timeout)
        assert task is not None
        return task

    def _poll(self, task_id: str, timeout: float | None, *,
              told_is_enough: bool = False) -> Task | None:
        """The task once it has ended (or at the deadline). `told_is_enough` (`submit`,
        whose caller needs no row): None as soon as the agent's ENDED names it, without
        reading the row again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ended = threading.Event()
        with self._waiting_lock:
            self._waiting.setdefault(task_id, []).append(ended)
            if not self._hearing and self._wait_for_ended is not None:
                # one thread hears the agents' ENDED for all waiters, from the first wait
                # on (operator commands never wait: they open no listening connection)
                self._hearing = True
                threading.Thread(target=self._hear, args=(self._wait_for_ended,),
                                 daemon=True, name="task-ended").start()
        try:
            while True:
                ended.clear()
                with self.ctx.uow(readonly=True) as uow:
                    task = uow.tasks.get(task_id)
                if task is None:
                    raise errors.not_found("task", task_id)
                left = None if deadline is None else deadline - time.monotonic()
                if task.status != TaskStatus.PROCESSING or (left is not None and left <= 0):
                    return task
                # woken by the agent's NOTIFY; read again now and then all the same (a
                # task given up by recovery, a notification lost to a reconnection)
                if ended.wait(POLL_S if left is None else min(left, POLL_S)) and \
                        told_is_enough:
                    return None
        finally:
            with self._waiting_lock:
                events = self._waiting.get(task_id, [])
                if ended in events:
                    events.remove(ended)
                if not events:
                    self._waiting.pop(task_id, None)


class AgentRunner(TaskRunner):
    """The runner of an agent: drives the tasks it claimed; a task journaled by one of its
    steps (a follow-up) goes to the queue like any other."""

    def journal(self, uow: UnitOfWork, op_type: type[Operation[P]], plan: P, *,
                account_id: str, region_id: str, resource_id: str,
                task_id: str | None = None) -> Task:
        task = super().journal(uow, op_type, plan, account_id=account_id,
                               region_id=region_id, resource_id=resource_id, task_id=task_id)
        route(uow, task, op_type, plan)
        return task

    def submit(self, task: Task, *, wait_up_to: float = 0.0) -> None:
        """Claimed from the queue like any task (its journal sent the NOTIFY)."""

    def ended(self, uow: UnitOfWork, task: Task) -> None:
        uow.notify(ENDED, task.id)

    def guard(self, task_id: str) -> None:
        """Before a step or a compensation: Fenced if the task is no longer ours. Not read
        again right after a fenced commit that found it ours (`_CHECKED`): the claim, or
        the previous step marked done, with nothing run in between."""
        if _CHECKED.get():
            _CHECKED.set(False)
            return
        with self.ctx.uow():
            pass  # FencedUnitOfWork checks as it is entered

    def _mark_done(self, task: Task, step: str) -> None:
        super()._mark_done(task, step)  # a fenced commit: the task is still ours
        _CHECKED.set(True)


def route(uow: UnitOfWork, task: Task, op_type: type[Operation[P]], plan: P) -> None:
    task.host_id = op_type.runs_on(plan, uow)
    uow.notify(CHANNEL, task.id)  # the agents claim tasks only (no Cloud Assistant look)


class FencedUnitOfWork:
    """A writing unit of work whose commit, in a thread driving a task, is accepted only
    under the agent's epoch (see the module docstring)."""

    def __init__(self, inner: UnitOfWork) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> FencedUnitOfWork:
        """In a thread driving a task, the transaction's first statement takes the host
        row FOR SHARE (and the task's FOR UPDATE) if they are still ours, and holds them
        until its end: its commit cannot pass a fence, which waits for it."""
        self._inner.__enter__()
        try:
            guard(self._inner)
        except BaseException:
            self._inner.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.__exit__(*exc)


def guard(uow: UnitOfWork) -> None:
    """Fenced unless this thread's task is still ours under our epoch (nothing to check
    outside a task's thread)."""
    driving = _DRIVING.get()
    if driving is not None:
        host_id, epoch, task_id = driving
        if not uow.hold_epoch(host_id, epoch, task_id):
            uow.rollback()
            raise Fenced(f"host {host_id} epoch {epoch}: task {task_id} is no longer ours "
                         "(this host was fenced, or the task taken over); its write refused")


def fenced_uow(factory: Callable[..., UnitOfWork]) -> Callable[..., UnitOfWork]:
    def uow(readonly: bool = False) -> UnitOfWork:
        inner = factory(readonly=readonly)
        return inner if readonly else FencedUnitOfWork(inner)
    return uow


class NoCompute:
    """The hypervisor of an API process in cluster mode: there is none. Listing VMs answers
    none; anything else is refused with an ECS error (the one caller outside task steps:
    the console's serial terminal; Cloud Assistant commands go to the agents)."""

    METHODS = frozenset(name for protocol in ComputeDriver.__mro__
                        if protocol.__module__ == ComputeDriver.__module__
                        for name, value in vars(protocol).items()
                        if callable(value) and not name.startswith("_"))

    def running(self) -> list[str]:
        return []

    def __getattr__(self, name: str) -> Any:
        if name not in self.METHODS:
            raise AttributeError(name)

        def refuse(*_args: Any, **_kwargs: Any) -> Any:
            raise not_here(f"{name}")
        return refuse


class Agent:
    """One host's agent (see the module docstring)."""

    def __init__(self, ctx: ServiceContext, host_id: str, *, vcpus: int, memory_mib: int,
                 wait_for_wakeup: Callable[[float], list[str]], address: str = "",
                 ceph_addrs: list[str] | None = None, workers: int = 4) -> None:
        self.ctx = ctx
        self.host_id = host_id
        self.vcpus, self.memory_mib = vcpus, memory_mib
        self.address = address
        self.ceph_addrs = list(ceph_addrs or [])
        self.wait_for_wakeup = wait_for_wakeup
        self.workers = workers
        self.epoch = 0
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self._driving: dict[str, int] = {}  # task ID -> the epoch it was claimed under
        self._commands: set[str] = set()  # the Cloud Assistant invocations it runs
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent")
        self.heartbeat_s = ctx.settings.heartbeat_s
        self.timeout_s = ctx.settings.host_timeout_s
        self._swept = -float("inf")  # when it last looked for fences cut short (monotonic)

    # -- membership
    def register(self) -> int:
        """Join (or rejoin) under a new epoch, Up, heartbeat now. Tasks claimed under an
        older epoch of this host become claimable again (and are resumed)."""
        ceph_addrs = self.ceph_addrs + [a for a in storage_addrs(self.ctx)
                                        if a not in self.ceph_addrs]
        with self.ctx.uow() as uow:
            at = uow.clock()
            host = uow.hosts.get(self.host_id)
            if host is None:
                host = Host(id=self.host_id, epoch=1, heartbeat_at=at, started_at=at,
                            vcpus=self.vcpus, memory_mib=self.memory_mib,
                            address=self.address, ceph_addrs=ceph_addrs)
                uow.hosts.add(host)
            else:
                host.rejoin(at, vcpus=self.vcpus, memory_mib=self.memory_mib,
                            address=self.address, ceph_addrs=ceph_addrs)
            # what it ran before its restart is lost: reported interrupted (commands.py)
            commands.interrupt_host(uow, self.host_id, before_epoch=host.epoch)
            uow.notify(CHANNEL)
            uow.commit()
            self.epoch = host.epoch
        log.warning("agent %s joined under epoch %d (%d vCPUs, %d MiB)", self.host_id,
                    self.epoch, self.vcpus, self.memory_mib)
        self.reconcile()
        return self.epoch

    def reconcile(self) -> None:
        """What start-up recovery does for instances, for this host's: a VM that runs here
        for an instance that is not this host's any more (fenced meanwhile, started
        elsewhere) or not Running is stale and stopped; an instance of this host recorded
        Running whose VM is gone is Stopped. Instances a task holds are left to it."""
        running = set(self.ctx.compute.running())
        with self.ctx.uow() as uow:
            mine = {i.id: i for i in uow.instances.find(host_id=self.host_id)}
            for inst in mine.values():
                if not inst.lock_task_id and inst.status != InstanceStatus.STOPPED and \
                        inst.id not in running:
                    inst.reconcile(False)
                    log.warning("instance %s of %s: its VM is gone; marked Stopped", inst.id,
                                self.host_id)
            uow.commit()
        for instance_id in running:
            held = mine.get(instance_id)
            if held is None or (not held.lock_task_id and
                                held.status == InstanceStatus.STOPPED):
                log.warning("agent %s: stopping the stale VM of %s", self.host_id,
                            instance_id)
                try:
                    self.ctx.compute.stop(instance_id, force=True)
                except Exception:
                    log.exception("agent %s: stopping the stale VM of %s", self.host_id,
                                  instance_id)

    def run(self) -> None:
        """Register, then heartbeat, check peers, claim and drive until `stop()`."""
        self.register()
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        try:
            told: list[str] = []  # woken for tasks only (their IDs), or [] (look for all)
            while not self.stopping.is_set():
                tasks_only = bool(told) and all(told)
                try:
                    more = self.claim_full()  # as many as there was room for: maybe more
                    if not tasks_only:
                        more |= self.claim_commands() > 0
                except Exception:  # the database away a moment, or this host was stopped
                    # (SIGSTOP) inside a claim and its session ended: claim again, never
                    # leave the loop (the heartbeat thread finds out whether it was fenced)
                    log.exception("agent %s: claiming work failed; trying again",
                                  self.host_id)
                    more = False
                # else: a NOTIFY that came meanwhile is held by the listening connection
                told = [] if more else self.wait_for_wakeup(self.heartbeat_s)
        finally:
            self.stopping.set()
            self._pool.shutdown(wait=True, cancel_futures=False)

    def stop(self) -> None:
        self.stopping.set()

    # -- the queue
    def claim_full(self) -> bool:
        """`claim`; True if it took as many as there was room for (there may be more)."""
        with self._lock:
            room = self.workers - len(self._driving)
        return room > 0 and self.claim() >= room

    def claim(self) -> int:
        """Claim what there is room for and start driving it; how many were claimed."""
        with self._lock:
            room = self.workers - len(self._driving)
            epoch = self.epoch
        if room <= 0 or epoch == 0:
            return 0
        with self.ctx.uow() as uow:
            if not uow.hold_epoch(self.host_id, epoch):
                return 0  # fenced: the heartbeat thread rejoins
            at = uow.clock()
            claimed = uow.claim_tasks(self.host_id, epoch, at,
                                      at + timedelta(seconds=self.timeout_s), room)
            # a new task's row as claimed, for its driver (no read of its own); a task
            # taken over is resumed by recovery's logic, which reads it
            rows = {task_id: uow.tasks.get(task_id) for task_id, interrupted in claimed
                    if not interrupted}
            uow.commit()
        for task_id, interrupted in claimed:
            with self._lock:
                self._driving[task_id] = epoch
            log.info("agent %s claimed task %s%s", self.host_id, task_id,
                     " (taken over: resumed)" if interrupted else "")
            self._pool.submit(self._drive, rows.get(task_id) or task_id, epoch, interrupted)
        return len(claimed)

    def claim_commands(self) -> int:
        """Claim the Cloud Assistant invocations routed to this host that there is room
        for (`command_workers`) and run them in the runner's command pool
        (service/commands.py)."""
        with self._lock:
            room = self.ctx.settings.command_workers - len(self._commands)
            epoch = self.epoch
        if epoch == 0:
            return 0
        claimed = commands.claim(self.ctx, self.host_id, epoch, room)
        for record_id in claimed:
            with self._lock:
                self._commands.add(record_id)
            log.info("agent %s claimed invocation %s", self.host_id, record_id)

            def job(rid: str = record_id) -> None:
                self._command(rid, epoch)
            self.ctx.runner.spawn(job)
        return len(claimed)

    def _command(self, record_id: str, epoch: int) -> None:
        try:
            commands.run_claimed(self.ctx, record_id, self.host_id, epoch)
        except Exception:
            log.exception("agent %s: invocation %s", self.host_id, record_id)
        finally:
            with self._lock:
                self._commands.discard(record_id)

    def _drive(self, task: Task | str, epoch: int, interrupted: bool) -> None:
        task_id = task if isinstance(task, str) else task.id
        token = _DRIVING.set((self.host_id, epoch, task_id))
        # just claimed under this epoch: its first step needs no guard of its own (a task
        # taken over is resumed by recovery's logic, which checks as it always does)
        checked = _CHECKED.set(not interrupted)
        try:
            if interrupted:
                recovery.resume_task(self.ctx, task_id)
            else:
                self.ctx.runner.drive(task)
        except Fenced as exc:
            log.warning("agent %s stops working on task %s: %s", self.host_id, task_id, exc)
        except Exception:
            log.exception("agent %s: task %s", self.host_id, task_id)
        finally:
            _CHECKED.reset(checked)
            _DRIVING.reset(token)
            with self._lock:
                self._driving.pop(task_id, None)

    # -- liveness
    def _heartbeats(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
            except Exception:  # the database away for a moment: try again; peers decide
                log.exception("agent %s: heartbeat", self.host_id)
            self.stopping.wait(self.heartbeat_s)

    def beat(self) -> None:
        """One heartbeat: renew the leases, or find out that this host was fenced (then
        stop its VMs and rejoin); then check the peers."""
        with self._lock:
            epoch = self.epoch
            mine = [t for t, e in self._driving.items() if e == epoch]
        with self.ctx.uow() as uow:
            at = uow.clock()
            alive = uow.heartbeat(self.host_id, epoch, at)
            if alive:
                uow.renew_leases(self.host_id, epoch, mine,
                                 at + timedelta(seconds=self.timeout_s))
            uow.commit()
        if not alive:
            self.rejoin()
            return
        self.check_peers(at)

    def rejoin(self) -> None:
        log.warning("agent %s: fenced (epoch %d is no longer ours); stopping the VMs of "
                    "this host and rejoining empty", self.host_id, self.epoch)
        for instance_id in self.ctx.compute.running():
            try:
                self.ctx.compute.stop(instance_id, force=True)
            except Exception:
                log.exception("agent %s: stopping the stale VM of %s", self.host_id,
                              instance_id)
        reconnect_storage(self.ctx)  # its clients were blocklisted: new ones
        self.register()

    def check_peers(self, at: datetime) -> list[str]:
        """Fence the peers whose heartbeat is older than the timeout; the ones fenced.
        Every `host_timeout_s` (and first thing after a start), also finish the fences cut
        short: a fenced host left `unsettled` (its fencer died between the fence's commit
        and `settle`'s) is settled now (`settle`, `before` its last heartbeat)."""
        stale_before = at - timedelta(seconds=self.timeout_s)
        sweep = time.monotonic() - self._swept >= self.timeout_s
        with self.ctx.uow(readonly=True) as uow:
            hosts = [h for h in uow.hosts.find() if h.id != self.host_id]
            stale = [h for h in hosts
                     if h.state == HostState.UP and h.heartbeat_at < stale_before]
            cut_short = [h for h in hosts if sweep and h.state != HostState.UP and
                         unsettled(uow, h)]
        if sweep:
            self._swept = time.monotonic()
        fenced = [h.id for h in stale if fence(self.ctx, h, stale_before, by=self.host_id)]
        for host in cut_short:
            if settle(self.ctx, host.id, restart=self.ctx.settings.restart_fenced,
                      before=host.heartbeat_at):
                log.warning("host %s: its fence had been cut short before its instances "
                            "were settled; settled by %s", host.id, self.host_id)
        return fenced


def fence(ctx: ServiceContext, host: Host, stale_before: datetime, *, by: str = "") -> bool:
    """Fence `host` if it is still Up at the epoch read, its heartbeat older than
    `stale_before`: True for the one caller that won. Its Ceph clients are blocklisted in
    the fencing transaction (a failure leaves it unfenced, tried again next round); then
    its instances are settled (`settle`: marked Stopped, those that ran started again on
    other hosts), the tasks routed to it routed to any host (on shared storage:
    `reroute`), and the agents woken to take its tasks over."""
    with ctx.uow() as uow:
        if not uow.fence_host(host.id, host.epoch, stale_before):
            return False
        blocklist(ctx, uow, host)
        uow.commit()
    log.warning("host %s fenced by %s: no heartbeat since %s (epoch %d -> %d)", host.id,
                by or "?", host.heartbeat_at, host.epoch, host.epoch + 1)
    settle(ctx, host.id, restart=ctx.settings.restart_fenced)
    return True


RESTARTED = (InstanceStatus.RUNNING, InstanceStatus.STARTING)  # what ran on a fenced host


class _Again(Exception):
    """The settling transaction must be rolled back and made again (see `settle`)."""


def unsettled(uow: UnitOfWork, host: Host) -> bool:
    """Whether the fenced `host` has what `settle` does left undone: an instance
    `orphaned` (`before` its last heartbeat), or a task still routed to it on shared
    storage (`reroute`)."""
    if any(orphaned(i, host.heartbeat_at) for i in uow.instances.find(host_id=host.id)):
        return True
    shared = {r.id for r in uow.regions.find() if r.shared_storage}
    return any(t.region_id in shared
               for t in uow.tasks.find(host_id=host.id, status=TaskStatus.PROCESSING))


def orphaned(inst: Instance, before: datetime | None = None) -> bool:
    """An instance of a fenced host that `settle` marks Stopped: no task holds it (a task
    that holds it decides its state when it is resumed), not Stopped, and — `before`, for
    a fence cut short — Running since before the host's last heartbeat (one marked Running
    later was started by a task taken over, whose VM is not on the fenced host)."""
    return not inst.lock_task_id and inst.status != InstanceStatus.STOPPED and (
        before is None or inst.started is None or inst.started <= before)


def settle(ctx: ServiceContext, host_id: str, *, restart: bool = True,
           before: datetime | None = None) -> int:
    """The instances of the fenced host `host_id` (`orphaned`), in ONE transaction that
    begins by locking the Up hosts' rows (placement's lock: one `settle` at a time, each
    reading what the one before committed). Each is marked Stopped (its VM is gone for
    the cluster; KeepCharging, its claim on the fenced host no longer counted). With
    `restart` (the setting `restart_fenced`) each one that was Running or Starting, its
    disks on shared storage (its region's `shared_storage`: Ceph RBD), is started again
    through StartInstance's own checks and journal (`instances.journal_start`) in this
    transaction: its placement (an Up host with room, never the fenced one) and its task,
    journaled and routed to the chosen host. Marking
    Stopped and journaling the start commit together: a crash of this agent leaves both
    or neither (then `Agent.check_peers` settles them later), never an instance Stopped
    with its restart forgotten; the start task, once committed, is the agents' like any
    task (claimed, resumed after a crash). An instance whose start is refused
    (OperationDenied.NoStock: no host has room; any ECS error) stays Stopped, with one
    warning line and the code; one on local files stays Stopped (it cannot start
    elsewhere). The host's tasks are rerouted and its commands interrupted in that commit.

    A start that finds the instance taken meanwhile by a task (Operation.Conflict: the
    journal writes before it finds out), or any unexpected error, rolls everything back
    and the whole is made again (an instance a task holds now is left to it); the last
    attempt starts nothing, so that the instances are marked Stopped all the same.
    Returns how many instances it settled."""
    attempts, why_not = 3, "" if restart else "restart_fenced is off"
    for attempt in range(attempts):
        try:
            return _settle(ctx, host_id, why_not=why_not, before=before)
        except Exception as exc:  # rolled back (the unit of work ends with it)
            if attempt == attempts - 1:
                log.exception("host %s fenced: its instances could not be settled", host_id)
                return 0
            last = attempt == attempts - 2
            log.warning("host %s fenced: %s; its instances settled again%s", host_id, exc,
                        " without restarting any" if last else "",
                        exc_info=None if isinstance(exc.__cause__, EcsError) else exc)
            if last:
                why_not = "its automatic restart failed (above)"
    return 0


def _settle(ctx: ServiceContext, host_id: str, *, why_not: str,
            before: datetime | None) -> int:
    """`settle` once; `why_not`: why none is restarted ("": restart them)."""
    said: list[str] = []  # logged once committed
    with ctx.uow() as uow:
        uow.lock_hosts()
        shared = {r.id for r in uow.regions.find() if r.shared_storage}
        settled = [i for i in uow.instances.find(host_id=host_id) if orphaned(i, before)]
        again = []
        for inst in settled:
            was = inst.status
            inst.reconcile(False)
            what = f"instance {inst.id} of fenced host {host_id} marked Stopped"
            if was not in RESTARTED:
                said.append(what)
            elif why_not:
                said.append(f"{what}; not restarted: {why_not}")
            elif inst.region_id not in shared:
                said.append(f"{what}; not restarted elsewhere: its disks are local files of "
                            f"{host_id} (region {inst.region_id}), it can start there only")
            else:
                again.append(inst)
        submitted: list[Task] = []  # submitted to the runner once committed
        for inst in again:
            what = f"instance {inst.id} of fenced host {host_id} marked Stopped"
            try:
                submitted.append(instances.journal_start(ctx, uow, inst))
            except EcsError as exc:
                if exc.code == CONFLICT:  # its journal wrote before it found the lock held
                    raise _Again(f"restarting {inst.id}: {exc.code}") from exc
                said.append(f"{what}; it stays Stopped, its automatic restart refused: "
                            f"{exc.code}: {exc.message}")
            except Exception as exc:
                raise _Again(f"restarting {inst.id}: {exc!r}") from exc
            else:
                said.append(f"{what} and restarted on host {inst.host_id} "
                            f"(task {submitted[-1].id})")
        reroute(uow, host_id)
        commands.interrupt_host(uow, host_id)  # its commands with them (commands.py)
        uow.notify(CHANNEL)
        uow.commit()
    for task in submitted:
        ctx.runner.submit(task)
    for line in said:
        log.warning("%s", line)
    return len(settled)


CONFLICT = "Operation.Conflict"  # errors.operation_conflict


def reroute(uow: UnitOfWork, host_id: str) -> None:
    """The tasks routed to a fenced host: its VMs are gone for the cluster, so those in a
    region on shared storage (Ceph RBD) are any agent's now (a step that needs the VM finds
    none, and the task is undone), never stuck on it; those on local files wait for the
    host, the only one that can reach the files (it resumes them when it rejoins)."""
    shared = {r.id for r in uow.regions.find() if r.shared_storage}
    for task in uow.tasks.find(host_id=host_id, status=TaskStatus.PROCESSING):
        if task.region_id in shared:
            task.host_id = None


def blocklist(ctx: ServiceContext, uow: UnitOfWork, host: Host) -> None:
    """Shut the fenced host's Ceph clients out in every region whose storage can
    (`ClientFencing`: Ceph RBD), so that its QEMUs cannot write any more. Each QEMU has its
    own librbd client, so the agent's addresses are not enough: for every volume of the
    host's instances that may have a VM (not Stopped, or held by a task) the clients that
    have it open are shut out (the exclusive-lock owner's lock broken with blocklisting,
    the other watchers blocklisted: `break_locks`), then the agent's own clients
    (`Host.ceph_addrs`: detected at registration, and `ecsnap agent --ceph-addr`). An
    error leaves the host unfenced (retried next round)."""
    began = time.monotonic()
    volumes: dict[str, list[str]] = {}
    for inst in uow.instances.find(host_id=host.id):
        if inst.status == InstanceStatus.STOPPED and not inst.lock_task_id:
            continue  # no VM of it anywhere (a storage step elsewhere may hold it open)
        volumes.setdefault(inst.region_id, []).extend(
            d.current_volume for d in attached_disks(uow, inst.id))
    for region in uow.regions.find():
        storage = ctx.storage(uow, region.id)
        if not isinstance(storage, ClientFencing):
            continue
        shut = storage.break_locks(volumes.get(region.id, []))
        if host.ceph_addrs:
            storage.blocklist(list(host.ceph_addrs))
        log.warning("host %s fenced: in region %s, the clients of its VMs' volumes %s "
                    "shut out (%s), and its agent's %s, in %.0f ms", host.id, region.id,
                    volumes.get(region.id, []), ", ".join(shut) or "none open",
                    ", ".join(host.ceph_addrs) or "none registered",
                    (time.monotonic() - began) * 1000)


def storage_addrs(ctx: ServiceContext) -> list[str]:
    """This process's own client addresses on every region's shared storage (Ceph's
    `Rados.get_addrs()`), registered with its host so that a peer fencing it blocklists
    them. A region whose storage cannot be reached now is logged and left out."""
    found: list[str] = []
    with ctx.uow(readonly=True) as uow:
        for region in uow.regions.find():
            storage = ctx.storage(uow, region.id)
            if not isinstance(storage, ClientFencing):
                continue
            try:
                found += [a for a in storage.client_addrs() if a not in found]
            except Exception:
                log.exception("region %s: this host's storage client address", region.id)
    return found


def reconnect_storage(ctx: ServiceContext) -> None:
    """After this host was fenced its storage clients are blocklisted: close them, so that
    the next call opens a new client (a new address, not blocklisted)."""
    with ctx.uow(readonly=True) as uow:
        for region in uow.regions.find():
            storage = ctx.storage(uow, region.id)
            close = getattr(storage, "close", None)
            if isinstance(storage, ClientFencing) and callable(close):
                close()
