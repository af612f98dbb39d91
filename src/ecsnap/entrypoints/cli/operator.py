"""Operator commands of `ecsnap`: they run the services in-process on a data directory
(init, serve, image, account, accesskey), never through the API."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from ecsnap import config, logs, metrics
from ecsnap.domain.errors import EcsError
from ecsnap.entrypoints.cli.common import (
    DataDir,
    Output,
    OutputFormat,
    err,
    fail,
    initialised_data_dir,
    out,
)
from ecsnap.filemodes import restrict_umask
from ecsnap.service import accounts, console_access, hosts, images, regions, setup
from ecsnap.service import scheduler as policy_scheduler
from ecsnap.service.context import ServiceContext

if TYPE_CHECKING:
    from ecsnap.service.recovery import RecoveryReport

image_app = typer.Typer(help="Images: build the demo guest, import your own (admin); "
                        "list, create and delete your custom images.",
                        no_args_is_help=True)
account_app = typer.Typer(help="Accounts (admin).", no_args_is_help=True)
accesskey_app = typer.Typer(help="AccessKey pairs (admin).", no_args_is_help=True)
T = TypeVar("T")


def _context(data_dir: Path | None, *, recover: bool = False,
             background: bool = False, create: bool = False) -> ServiceContext:
    """The services on the data directory, which `ecsnap init` made (`create`: this is
    `ecsnap init`): no command creates one by mistake (common.initialised_data_dir)."""
    data_dir = config.find_data_dir(data_dir) if create else initialised_data_dir(data_dir)
    # every operator command writes under the data directory (the database at least), as do
    # the qemu-img and QEMU processes it starts: all of it owner-only, whatever the umask
    restrict_umask()
    # Lazy: bootstrap brings SQLAlchemy, Alembic and every service module (~0.4 s, ~190
    # modules), which the client commands (`ecsnap api …`, `ecsnap instances`) never use.
    from ecsnap import bootstrap

    settings = config.load(data_dir)
    try:
        return bootstrap.build(settings, background=background, recover=recover)
    except ValueError as exc:  # a setting that cannot work (cluster mode on SQLite)
        fail(EcsError("InvalidConfiguration", str(exc), 400))
        raise


def _default_region(data_dir: Path | None) -> str:
    settings = config.load(data_dir)
    creds = _read_json(settings.credentials_path)
    return str(creds.get("RegionId") or settings.default_region)


def _read_json(path: Path) -> dict[str, object]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def init(data_dir: DataDir = None,
         region: Annotated[str, typer.Option("--region", help="Region ID")] = "local-1",
         endpoint: Annotated[str, typer.Option(help="Endpoint written to credentials.json")]
         = "http://127.0.0.1:8080/",
         storage_pool: Annotated[str | None, typer.Option(
             "--storage-pool", help="Where the region's disks live, if not in qcow2 files "
             "under the data directory: rbd:POOL?conf=/etc/ceph/ceph.conf&client=admin for "
             "a Ceph RBD pool. Run init again with another --region to add a region.")]
         = None) -> None:
    """Create the data directory, database, region, admin account and an AccessKey pair."""
    try:
        ctx = _context(data_dir, create=True)
        if storage_pool:
            s = ctx.settings
            regions.ensure_region(ctx, region, vcpus=s.region_vcpus,
                                  memory_mib=s.region_memory_mib,
                                  instance_types=s.instance_types, storage_pool=storage_pool)
        done = setup.initialise(ctx, region)
    except EcsError as exc:
        fail(exc)
        return
    path = ctx.settings.credentials_path
    creds = _read_json(path)
    if creds.get("AccessKeyId") != done.access_key.id:
        creds = {"AccessKeyId": done.access_key.id, "AccessKeySecret": done.access_key.secret,
                 "RegionId": region, "Endpoint": endpoint, "Account": done.account.name}
        if done.password:
            creds["ConsolePassword"] = done.password
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(creds, fh, indent=2)
    os.chmod(path, 0o600)
    out.print(f"data directory {ctx.settings.data_dir} ready; region {region}; "
              f"credentials in {path}", highlight=False)


@image_app.command("build-demo")
def image_build_demo(data_dir: DataDir = None,
                     region: Annotated[str | None, typer.Option("--region")] = None) -> None:
    """Build the demo Linux guest from Debian packages and register it."""
    try:
        ctx = _context(data_dir)
        image = images.build_demo_image(ctx, region or _default_region(data_dir))
    except EcsError as exc:
        fail(exc)
        return
    out.print(f"{image.id} {image.name} ({image.os_name})", highlight=False)


@image_app.command("import")
def image_import(file: Path, name: Annotated[str, typer.Option("--name")],
                 data_dir: DataDir = None,
                 os_name: Annotated[str, typer.Option("--os-name")] = "Linux",
                 region: Annotated[str | None, typer.Option("--region")] = None,
                 image_format: Annotated[str, typer.Option(
                     "--format", help="auto (a qcow2 by its header, else raw), qcow2 or raw; "
                     "an image naming any other file (backing file, data file) is refused")]
                 = "auto") -> None:
    """Register your own qcow2 or raw image (BIOS boot from the system disk)."""
    try:
        ctx = _context(data_dir)
        image = images.import_image(ctx, region or _default_region(data_dir), file, name=name,
                                    os_name=os_name, image_format=image_format)
    except EcsError as exc:
        fail(exc)
        return
    out.print(f"{image.id} {image.name}", highlight=False)


@account_app.command("create")
def account_create(name: str, data_dir: DataDir = None,
                   password: Annotated[str | None, typer.Option(
                       "--password", help="Console password (asked if not given)")] = None,
                   ) -> None:
    """Create an account (console log-on with name and password)."""
    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        account = accounts.create_account(_context(data_dir), name, password)
    except EcsError as exc:
        fail(exc)
        return
    out.print(f"{account.id} {account.name}", highlight=False)


@accesskey_app.command("create")
def accesskey_create(account: str, data_dir: DataDir = None,
                     output: Annotated[str, typer.Option("--output")] = "table") -> None:
    """Create an AccessKey pair for an account; the secret is shown once."""
    try:
        key = accounts.create_access_key(_context(data_dir), account)
    except EcsError as exc:
        fail(exc)
        return
    if output == "json":
        print(json.dumps({"AccessKeyId": key.id, "AccessKeySecret": key.secret}))
    else:
        out.print(f"AccessKeyId {key.id}\nAccessKeySecret {key.secret}", highlight=False)


@account_app.command("password")
def account_password(name: str, data_dir: DataDir = None,
                     password: Annotated[str | None, typer.Option(
                         "--password", help="The new console password (asked if not given)")]
                     = None) -> None:
    """Set an account's console password (the policy applies); its sessions end."""
    if password is None:
        password = typer.prompt("New password", hide_input=True, confirmation_prompt=True)
    _run(lambda: accounts.set_password(_context(data_dir), name, password))
    out.print(f"password of {name} changed; its console sessions ended", highlight=False)


@account_app.command("disable")
def account_disable(name: str, data_dir: DataDir = None) -> None:
    """Disable an account: its AccessKeys and console sessions stop working."""
    _run(lambda: accounts.disable_account(_context(data_dir), name))
    out.print(f"{name} disabled", highlight=False)


@account_app.command("enable")
def account_enable(name: str, data_dir: DataDir = None) -> None:
    _run(lambda: accounts.enable_account(_context(data_dir), name))
    out.print(f"{name} enabled", highlight=False)


@account_app.command("lockouts")
def account_lockouts(data_dir: DataDir = None,
                     clear: Annotated[str | None, typer.Option(
                         "--clear", help="Lift the lockout of this account name, AccessKey "
                                         "ID or client address")] = None,
                     all_: Annotated[bool, typer.Option(
                         "--all", help="Also those only delayed, not locked")] = False,
                     output: Output = OutputFormat.table) -> None:
    """Console log-on lockouts (after repeated failed log-ons), and lifting one."""
    ctx = _context(data_dir)
    if clear is not None:
        gone = _run(lambda: console_access.clear_logon_lockouts(ctx, name=clear))
        out.print(f"{gone} lockout(s) lifted for {clear}", highlight=False)
        return
    now = time.time()
    found = console_access.list_logon_lockouts(ctx, include_throttled=all_)
    if output == OutputFormat.json:
        print(json.dumps({"Lockouts": [
            {"Kind": row.kind, "Name": row.name, "Failures": row.failures,
             "LockedForSeconds": round(max(0.0, (row.locked_until or now) - now)),
             "RetryAfterSeconds": round(row.retry_after)} for row in found]}, indent=2))
        return
    for row in found:
        state = (f"locked {row.locked_until - now:.0f} s more" if row.locked_until
                 else f"delayed {row.retry_after:.0f} s")
        out.print(f"{row.kind:10} {row.name:24} {row.failures:3} failures  {state}",
                  highlight=False)


@account_app.command("quota")
def account_quota(name: str, data_dir: DataDir = None,
                  set_: Annotated[list[str] | None, typer.Option(
                      "--set", help="KIND=N (instances, vcpus, memory_mib, disks, disk_gib, "
                                    "snapshots; N < 0: no limit); repeat for several")] = None,
                  clear: Annotated[bool, typer.Option(
                      "--clear", help="Back to the default quotas of the settings")] = False,
                  ) -> None:
    """An account's quotas and what it uses of them; --set or --clear changes them."""
    ctx = _context(data_dir)
    if clear:
        _run(lambda: accounts.clear_quotas(ctx, name))
    if set_:
        values: dict[str, int] = {}
        for item in set_:
            kind, _, number = item.partition("=")
            try:
                values[kind.strip()] = int(number)
            except ValueError:
                fail(EcsError("InvalidParameter", f"--set takes KIND=N, not {item!r}.", 400))
        _run(lambda: accounts.set_quotas(ctx, name, values))
    for line in _run(lambda: accounts.quota_report(ctx, name)):
        limit = "no limit" if line.limit is None else str(line.limit)
        source = "set" if line.own else "default"
        out.print(f"{line.kind:11} {line.used:>8} used of {limit:>8} ({source})",
                  highlight=False)


@accesskey_app.command("list")
def accesskey_list(account: Annotated[str | None, typer.Argument()] = None,
                   data_dir: DataDir = None, output: Output = OutputFormat.table) -> None:
    """The AccessKey IDs (of one account, else all), with their state; never a secret."""
    keys = _run(lambda: accounts.list_access_keys(_context(data_dir), account))
    rows = [{"AccessKeyId": key.id, "Account": key.account_name,
             "State": "enabled" if key.enabled else "disabled",
             "Created": f"{key.created:%Y-%m-%dT%H:%M:%SZ}"} for key in keys]
    if output == OutputFormat.json:
        print(json.dumps({"AccessKeys": rows}, indent=2))
        return
    for row in rows:
        out.print(" ".join(row.values()), highlight=False)


@accesskey_app.command("disable")
def accesskey_disable(key_id: str, data_dir: DataDir = None) -> None:
    """Refuse signatures made with this AccessKey (and end its console sessions)."""
    _run(lambda: accounts.disable_access_key(_context(data_dir), key_id))
    out.print(f"{key_id} disabled", highlight=False)


@accesskey_app.command("enable")
def accesskey_enable(key_id: str, data_dir: DataDir = None) -> None:
    _run(lambda: accounts.enable_access_key(_context(data_dir), key_id))
    out.print(f"{key_id} enabled", highlight=False)


@accesskey_app.command("delete")
def accesskey_delete(key_id: str, data_dir: DataDir = None) -> None:
    _run(lambda: accounts.delete_access_key(_context(data_dir), key_id))
    out.print(f"{key_id} deleted", highlight=False)


@accesskey_app.command("rotate")
def accesskey_rotate(key_id: str, data_dir: DataDir = None,
                     delete_old: Annotated[bool, typer.Option(
                         "--delete-old", help="Delete the old key instead of disabling it")]
                     = False,
                     output: Annotated[str, typer.Option("--output")] = "table") -> None:
    """A new AccessKey pair for the same account; the old one disabled (or deleted). The new
    secret is shown once."""
    key = _run(lambda: accounts.rotate_access_key(_context(data_dir), key_id,
                                                  delete_old=delete_old))
    if output == "json":
        print(json.dumps({"AccessKeyId": key.id, "AccessKeySecret": key.secret}))
    else:
        out.print(f"AccessKeyId {key.id}\nAccessKeySecret {key.secret}", highlight=False)


def _run(call: Callable[[], T]) -> T:
    """The service call's result, or the ECS error printed and exit status 1."""
    try:
        return call()
    except EcsError as exc:
        fail(exc)
        raise  # not reached: fail exits


def serve(data_dir: DataDir = None,
          listen: Annotated[str, typer.Option("--listen")] = "127.0.0.1:8080",
          api_threads: Annotated[int, typer.Option(
              "--api-threads", min=0,
              help="Threads answering Describe requests (0: 1 on SQLite and in a "
                   "cluster, 2 on a single-host PostgreSQL)")] = 0,
          ) -> None:
    """Serve the ECS API at / and the web console at /console/ (recovery runs first)."""
    # Lazy: uvicorn and the ASGI app (Starlette, Jinja, the console: ~170 modules, ~0.17 s)
    # are needed by this command only.
    import uvicorn

    from ecsnap.entrypoints.api.app import create_app

    restrict_umask()  # before anything is created: the database, disks, sockets, logs
    # start-up says what the screen below says, and warnings: no INFO line (the schema
    # migrations', alembic's, nor recovery's, which the screen sums up); then one INFO line
    # per request
    logs.configure(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    host, _, port = listen.rpartition(":")
    ctx = _context(data_dir, recover=True, background=True)
    report: RecoveryReport = ctx.extras["recovery"]
    out.print(_start_up_screen(ctx, listen, report), highlight=False)
    logging.getLogger().setLevel(logging.INFO)

    def stopped(signum: int, _frame: object) -> None:
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with
        # this handler back in place: leave through the finally block, exit status 0
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    asgi_app = create_app(ctx, api_threads)
    # automatic snapshot policies: due snapshots and retention, in a background thread
    scheduler = policy_scheduler.start_scheduler(ctx)
    quiet_garbage_collector()
    try:
        # http/loop "auto": httptools and uvloop (dependencies) when importable
        uvicorn.run(asgi_app, host=host or "127.0.0.1", port=int(port),
                    log_level="warning", access_log=False, http="auto", loop="auto")
    finally:
        scheduler.stop()  # after its tick under way: what it took is journaled
        ctx.close()  # running tasks finish their steps (all are journaled anyway)
        err.print("ecsnap stopped", highlight=False)


def agent(host_id: Annotated[str, typer.Option("--host-id", help="This host's ID")],
          data_dir: DataDir = None,
          vcpus: Annotated[int, typer.Option("--vcpus", min=1, help="vCPUs for VMs")] = 16,
          memory_mib: Annotated[int, typer.Option("--memory-mib", min=64,
                                                  help="Memory for VMs, MiB")] = 32768,
          address: Annotated[str, typer.Option("--address", help="This agent's listen "
                                                "address (/metrics, and the serial consoles "
                                                "of its VMs for the API processes), as "
                                                "peers reach it")] = "",
          ceph_addr: Annotated[list[str] | None, typer.Option(
              "--ceph-addr", help="This host's address as Ceph sees its clients (its IP): "
              "blocklisted when the host is fenced. Repeatable.")] = None,
          run_dir: Annotated[Path | None, typer.Option(
              "--run-dir", help="Where this host's VMs run (pidfiles, QMP sockets); default "
              "DATA_DIR/run/HOST. A former single-host server joining as `--host-id local` "
              "keeps its running VMs with --run-dir DATA_DIR/run.")] = None,
          ) -> None:
    """Run this host's agent in a cluster (PostgreSQL, `cluster` set): it registers, heartbeats,
    fences dead peers and runs the tasks routed to this host (VMs in DATA_DIR/run/HOST)."""
    from ecsnap import bootstrap

    restrict_umask()
    logs.configure(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = config.load(initialised_data_dir(data_dir))
    try:
        node = bootstrap.build_agent(settings, host_id, vcpus=vcpus, memory_mib=memory_mib,
                                     address=address, ceph_addrs=ceph_addr or [],
                                     run_dir=run_dir)
    except ValueError as exc:
        fail(EcsError("InvalidConfiguration", str(exc), 400))
        return
    if address:  # its /metrics (tasks, steps, freeze windows, the hosts), serial consoles
        from ecsnap.entrypoints import agent_http

        try:
            sock = agent_http.listen(address)
        except (ValueError, OSError) as exc:
            fail(EcsError("InvalidConfiguration", f"--address {address}: {exc}", 400))
            return
        agent_http.serve_in_thread(node.ctx, host_id, sock)
        metrics.watch_hosts("agent", lambda: hosts.host_samples(node.ctx))

    def stopped(signum: int, _frame: object) -> None:
        node.stop()

    signal.signal(signal.SIGTERM, stopped)
    signal.signal(signal.SIGINT, stopped)
    err.print(f"ecsnap agent {host_id} running", highlight=False)
    try:
        node.run()
    finally:
        node.ctx.close()
        err.print(f"ecsnap agent {host_id} stopped", highlight=False)


def hosts_list(data_dir: DataDir = None, output: Output = OutputFormat.table) -> None:
    """The hosts: state, epoch, heartbeat age, capacity used and free, instances (on the
    single-host server, its implicit host `local`)."""
    found = hosts.describe_hosts(_context(data_dir))
    rows = [{"HostId": h.id, "State": h.state, "Epoch": h.epoch,
             "HeartbeatAgeSeconds": None if h.heartbeat_age_s is None
             else round(h.heartbeat_age_s, 1),
             "Vcpus": h.vcpus, "VcpusUsed": h.vcpus_used, "VcpusFree": h.vcpus_free,
             "MemoryMiB": h.memory_mib, "MemoryMiBUsed": h.memory_mib_used,
             "MemoryMiBFree": h.memory_mib_free, "Address": h.address,
             "InstanceIds": list(h.instances)} for h in found]
    if output == OutputFormat.json:
        print(json.dumps({"Hosts": rows}, indent=2))
        return
    out.print(f"{'HOST':16} {'STATE':7} {'EPOCH':>5} {'HEARTBEAT':>9} {'VCPU USED/FREE':>15} "
              f"{'MEMORY MiB USED/FREE':>21} {'INSTANCES':>9}", highlight=False)
    for h in found:
        age = "-" if h.heartbeat_age_s is None else f"{h.heartbeat_age_s:.0f}s ago"
        out.print(f"{h.id:16} {h.state:7} {h.epoch:>5} {age:>9} "
                  f"{f'{h.vcpus_used}/{h.vcpus_free}':>15} "
                  f"{f'{h.memory_mib_used}/{h.memory_mib_free}':>21} {len(h.instances):>9}",
                  highlight=False)


def _start_up_screen(ctx: ServiceContext, listen: str, report: RecoveryReport) -> str:
    """What an operator needs once the server is up, and nothing else."""
    s = ctx.settings
    creds = _read_json(s.credentials_path)
    key = f"AccessKeyId {creds['AccessKeyId']}, " if creds.get("AccessKeyId") else ""
    region = str(creds.get("RegionId") or s.default_region)
    return "\n".join([
        "ecsnap serving",
        f"  endpoint     http://{listen}/  (region {region})",
        f"  console      http://{listen}/console/  (log on as {creds.get('Account', 'admin')}"
        + (", ConsolePassword in credentials.json)" if creds.get("ConsolePassword") else ")"),
        f"  credentials  {s.credentials_path}  ({key}secret inside)",
        f"  data         {s.data_dir}",
        f"  accelerator  {_accelerator(ctx)}",
        f"  recovery     {_recovery_summary(report)}",
        f"  VMs          {_vms(ctx)}",
    ])


def _accelerator(ctx: ServiceContext) -> str:
    accel = ctx.settings.accel
    if accel != "auto":
        return f"{accel.upper()} (ECSNAP_ACCEL={accel})"
    run_root = Path(getattr(ctx.compute, "run_root", ctx.settings.run_dir))
    verdict = _read_json(run_root / "accel.json")  # the QEMU driver's cached probe verdict
    if verdict.get("accel") in ("kvm", "tcg"):
        return f"{str(verdict['accel']).upper()}: {verdict.get('reason', '')} (probed " \
               f"{verdict.get('probed_at', '?')}; ECSNAP_ACCEL=kvm|tcg to choose)"
    return "auto: KVM if a probe boot at the first VM start succeeds, else TCG"


def _recovery_summary(report: RecoveryReport) -> str:
    parts = [f"{len(ids)} {what} ({', '.join(ids)})" for what, ids in (
        ("task(s) driven forward", report.forward), ("task(s) undone", report.undone),
        ("instance(s) found stopped", report.stopped),
        ("task(s) given up: see the ERROR lines and the tag ecsnap:needs-attention",
         report.failed)) if ids]
    return "; ".join(parts) if parts else "nothing to recover"


def _vms(ctx: ServiceContext) -> str:
    running = ctx.compute.running()
    return f"{len(running)} running (they outlive ecsnap; reattached)" if running else \
        "none running"


def quiet_garbage_collector() -> None:
    """A listing request allocates tens of thousands of short-lived objects; with Python's
    default thresholds that triggers collections that walk every object the server holds
    (SQLAlchemy's metadata, the modules: ~80,000), 3-7 ms a request. Everything built at
    start-up lives as long as the process: freeze it out of the collector's sight, and let
    the youngest generation grow before a collection (most request objects are freed by
    their reference count long before)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 10, 10)
