"""The web console: server-rendered pages over the same service functions as the API.

Flow of the seed: log on -> region in the top bar -> Storage & Snapshots > Snapshots ->
Instance Snapshots tab -> Rollback instance -> dialog (precautions, per-disk preview,
Start Instance Immediately after Rollback, Cloud disk snapshot selection) -> OK Rollback
-> progress and result (Undo rollback) -> Connect (serial console) to check the data.

Security: every page goes through Jinja2 with autoescape (no response is built from an
f-string); every response carries a Content-Security-Policy without inline script (the
scripts are static files), frame-ancestors 'none' / X-Frame-Options, nosniff and a
Referrer-Policy; the serial-console WebSocket takes only same-origin connections; log-ons
are throttled (`console_access.check_logon`); a session ends when its account or
AccessKey is disabled or the password changes (`console_access.session_stamp`).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from websockets.exceptions import WebSocketException

from ecsnap.domain.errors import CheckFailure, EcsError
from ecsnap.domain.model import iso
from ecsnap.entrypoints import serial_pipe
from ecsnap.entrypoints.console import files
from ecsnap.entrypoints.console import policies as policy_pages
from ecsnap.service import (
    accounts,
    console_access,
    disks,
    hosts,
    images,
    inspect,
    instances,
    policies,
    regions,
    rollback,
    snapshots,
    tasks_view,
)
from ecsnap.service.context import ServiceContext

HERE = Path(__file__).parent
COOKIE = "ecsnap_console"
LOGIN_CSRF_COOKIE = "ecsnap_login_csrf"
SESSION_SECONDS = 8 * 3600
PRUNE_EVERY_S = 60.0
SERIAL_SESSION_CHECK_S = 10.0  # how often an open serial console re-checks its session

# xterm.js injects <style> elements, hence 'unsafe-inline' for styles (never for scripts)
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response of the console (pages, redirects,
    static files, errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", [])
                        if k.decode("latin-1").lower() not in SECURITY_HEADERS]
                message = {**message, "headers": kept + self.headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def same_origin(conn: HTTPConnection) -> bool:
    """Whether the request's Origin names the host the console is served on (the Host
    header). The scheme is not compared: behind a TLS-terminating proxy the console sees
    ws:// for a page served over https://."""
    origin, host = conn.headers.get("origin"), conn.headers.get("host")
    if not origin or not host:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()


@dataclass
class Session:
    account_id: str
    account_name: str
    region: str
    stamp: str  # console_access.session_stamp at log-on; the session ends when it changes
    access_key_id: str | None = None  # the AccessKey it was opened with, if any
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    expires: float = field(default_factory=lambda: time.time() + SESSION_SECONDS)
    flash: dict[str, str] | None = None


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


REASONS = {
    "disk_attached": "detached from the instance",
    "disk_exists": "released",
    "system_disk_not_replaced": "system disk replaced",
    "snapshot_exists": "snapshot deleted",
    "snapshot_ready": "snapshot not ready",
    "snapshot_of_disk": "snapshot of another disk",
    "no_concurrent_operation": "another operation is running",
}


def reason(f: CheckFailure) -> str:
    return f"{REASONS.get(f.check, f.check)}: {f.code}: {f.message}"


class Console:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.sessions: dict[str, Session] = {}
        self.pruned = time.time()
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(["html"]))
        self.env.globals.update(iso=iso, human=human, reason=reason)

    # ------------------------------------------------------------ plumbing

    def prune_sessions(self) -> int:
        """Forget the expired sessions; returns how many."""
        now = time.time()
        self.pruned = now
        gone = [t for t, s in self.sessions.items() if s.expires < now]
        for token in gone:
            del self.sessions[token]
        return len(gone)

    async def session(self, conn: HTTPConnection) -> Session | None:
        """The live session of the request's cookie: not expired, its account and
        AccessKey still enabled and its password unchanged (else it is dropped)."""
        if time.time() - self.pruned > PRUNE_EVERY_S:
            self.prune_sessions()
        token = conn.cookies.get(COOKIE, "")
        s = self.sessions.get(token)
        if s is None or s.expires < time.time():
            self.sessions.pop(token, None)
            return None
        stamp = await run_in_threadpool(console_access.session_stamp, self.ctx, s.account_id,
                                        s.access_key_id)
        if stamp != s.stamp:
            self.sessions.pop(token, None)
            return None
        return s

    @staticmethod
    def secure(request: Request) -> bool:
        return request.url.scheme == "https"

    def render(self, request: Request, name: str, status: int = 200,
               headers: dict[str, str] | None = None, **values: Any) -> Response:
        def url(route: str, path: str | None = None, **params: str) -> str:
            if path is not None:
                params["path"] = path
            return str(request.url_for(route, **params).path)

        s = values.get("session")
        if isinstance(s, Session):
            values.setdefault("flash", s.flash)
            s.flash = None
            values.setdefault("all_regions", regions.describe_regions(self.ctx))
        html = self.env.get_template(name).render(request=request, url=url, **values)
        return HTMLResponse(html, status_code=status, headers=headers)

    def error(self, request: Request, s: Session, status: int, code: str,
              message: str) -> Response:
        """An error page; `message` may carry user input: the template escapes it."""
        return self.render(request, "error.html", status=status, session=s, code=code,
                           message=message)

    async def form(self, request: Request, s: Session) -> Any:
        form = await request.form()
        if not secrets.compare_digest(str(form.get("csrf", "")), s.csrf):
            raise PermissionError("CSRF token missing or wrong")
        return form

    def back(self, request: Request, route: str, s: Session, text: str = "",
             kind: str = "ok", query: str = "") -> Response:
        if text:
            s.flash = {"text": text, "kind": kind}
        return RedirectResponse(str(request.url_for(route).path) + query, status_code=303)

    def guarded(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            s = await self.session(request)
            if s is None:
                return RedirectResponse(str(request.url_for("login").path), status_code=303)
            try:
                return await handler(request, s)
            except PermissionError as exc:
                return self.error(request, s, 403, "Forbidden", str(exc))
        return endpoint

    # ------------------------------------------------------------ log on / off, region

    def _login_form(self, request: Request, status: int = 200, error: str = "",
                    headers: dict[str, str] | None = None) -> Response:
        """The log-on page with a CSRF token bound to a cookie (double submit)."""
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(16)
        response = self.render(request, "login.html", status=status, headers=headers,
                               csrf=token, error=error)
        response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                            path="/console", secure=self.secure(request))
        return response

    async def login_get(self, request: Request) -> Response:
        return self._login_form(request)

    async def login(self, request: Request) -> Response:
        form = await request.form()
        csrf = str(form.get("csrf", ""))
        if not csrf or not secrets.compare_digest(csrf,
                                                  request.cookies.get(LOGIN_CSRF_COOKIE, "")):
            return self._login_form(request, 403, "The log-on form expired; please try again.")
        name, password = str(form.get("account", "")), str(form.get("password", ""))
        key_id, secret = str(form.get("access_key_id", "")), \
            str(form.get("access_key_secret", ""))
        kind, subject = ("access_key", key_id) if key_id else ("account", name)
        address = request.client.host if request.client else ""
        verdict = await run_in_threadpool(console_access.check_logon, self.ctx, kind, subject,
                                          address)
        if not verdict.allowed:
            wait = int(verdict.retry_after) + 1
            text = (f"Too many failed log-ons: locked for {wait} s more (an administrator "
                    "can lift the lock)." if verdict.locked else
                    f"Too many failed log-ons: wait {wait} s before the next attempt.")
            return self._login_form(request, 429, text, headers={"Retry-After": str(wait)})
        if key_id:
            account = await run_in_threadpool(accounts.authenticate_access_key, self.ctx,
                                              key_id, secret)
        else:
            account = await run_in_threadpool(accounts.authenticate_password, self.ctx, name,
                                              password)
        stamp = None if account is None else await run_in_threadpool(
            console_access.session_stamp, self.ctx, account.id, key_id or None)
        if account is None or stamp is None:
            await run_in_threadpool(console_access.record_logon_failure, self.ctx, kind,
                                    subject, address)
            return self._login_form(request, 401, "The account name or password (or "
                                    "AccessKey pair) is not correct.")
        await run_in_threadpool(console_access.record_logon_success, self.ctx, kind, subject,
                                address)
        self.prune_sessions()
        all_regions = regions.describe_regions(self.ctx)
        region = all_regions[0].id if all_regions else self.ctx.settings.default_region
        token = secrets.token_urlsafe(32)
        self.sessions[token] = Session(account.id, account.name, region, stamp,
                                       access_key_id=key_id or None)
        response = RedirectResponse(str(request.url_for("instances").path), status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/console",
                            max_age=SESSION_SECONDS, secure=self.secure(request))
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/console",
                               secure=self.secure(request), httponly=True, samesite="strict")
        return response

    async def logout(self, request: Request, s: Session) -> Response:
        await self.form(request, s)
        self.sessions.pop(request.cookies.get(COOKIE, ""), None)
        response = RedirectResponse(str(request.url_for("login").path), status_code=303)
        response.delete_cookie(COOKIE, path="/console", secure=self.secure(request),
                               httponly=True, samesite="strict")
        return response

    async def set_region(self, request: Request, s: Session) -> Response:
        form = await self.form(request, s)
        wanted = str(form.get("region", ""))
        if wanted in {r.id for r in regions.describe_regions(self.ctx)}:
            s.region = wanted
        nxt = str(form.get("next", ""))
        if not nxt.startswith("/console/"):
            nxt = str(request.url_for("instances").path)
        return RedirectResponse(nxt, status_code=303)

    async def home(self, request: Request) -> Response:
        return RedirectResponse(str(request.url_for("instances").path), status_code=303)

    # ------------------------------------------------------------ pages

    async def instances_page(self, request: Request, s: Session) -> Response:
        def load() -> dict[str, Any]:
            page = instances.describe_instances(self.ctx, s.account_id, s.region, page_size=100)
            by_id = {i.id: i for i in page.items}
            values: dict[str, Any] = {"instances": page.items}
            if request.query_params.get("stop") in by_id:
                values["stop_target"] = by_id[request.query_params["stop"]]
            if request.query_params.get("snapshot") in by_id:
                target = by_id[request.query_params["snapshot"]]
                values["snapshot_target"] = target
                values["snapshot_disks"] = disks.describe_disks(
                    self.ctx, s.account_id, s.region, instance_id=target.id,
                    page_size=100).items
            return values

        return self.render(request, "instances.html", session=s, nav="instances",
                           **await run_in_threadpool(load))

    async def instance_page(self, request: Request, s: Session) -> Response:
        instance_id = request.path_params["instance_id"]

        def load() -> dict[str, Any]:
            page = instances.describe_instances(self.ctx, s.account_id, s.region,
                                                instance_ids=[instance_id])
            if not page.items:
                raise LookupError(instance_id)
            return {"inst": page.items[0], "disks": disks.describe_disks(
                self.ctx, s.account_id, s.region, instance_id=instance_id, page_size=100).items}

        try:
            values = await run_in_threadpool(load)
        except LookupError:
            return self.render(request, "task.html", status=404, session=s, **self._missing())
        return self.render(request, "instance.html", session=s, nav="instances", **values)

    def _missing(self) -> dict[str, Any]:
        from ecsnap.domain.model import Task, TaskStatus

        t = Task(id="-", account_id="", region_id="", action="", status=TaskStatus.FAILED,
                 error_code="InvalidInstanceId.NotFound",
                 error_message="The specified instance does not exist.")
        return {"task": t, "title": "Not found", "back": "/console/instances/"}

    async def hosts_page(self, request: Request, s: Session) -> Response:
        found = await run_in_threadpool(hosts.describe_hosts, self.ctx, s.account_id)
        return self.render(request, "hosts.html", session=s, nav="hosts", hosts=found)

    async def images_page(self, request: Request, s: Session) -> Response:
        page = await run_in_threadpool(lambda: images.describe_images(
            self.ctx, s.account_id, s.region, page_size=100, statuses=images.LISTED))
        return self.render(request, "images.html", session=s, nav="images", images=page.items)

    async def create_image(self, request: Request, s: Session) -> Response:
        """Create Custom Image: from a system disk's snapshot (a snapshot's Actions) or from
        an instance (its page: its system disk is snapshotted first, as ECS does)."""
        form = await self.form(request, s)
        source = dict(request.path_params)
        name, back = str(form.get("name", "")), \
            "snapshots" if "snapshot_id" in source else "instances"
        try:
            image_id = await run_in_threadpool(lambda: images.create_image(
                self.ctx, s.account_id, s.region, snapshot_id=source.get("snapshot_id"),
                instance_id=source.get("instance_id"), name=name))
        except EcsError as exc:
            return self.back(request, back, s, f"{exc.code}: {exc.message}", "error")
        return self.back(request, "images", s, f"Image {image_id} is being created from "
                                                f"{next(iter(source.values()))}.")

    async def image_delete(self, request: Request, s: Session) -> Response:
        form = await self.form(request, s)
        image_id = request.path_params["image_id"]
        force = form.get("force") == "true"
        return await self._act(request, s, lambda: images.delete_image(
            self.ctx, s.account_id, s.region, image_id, force=force), "images")

    async def disks_page(self, request: Request, s: Session) -> Response:
        def load() -> dict[str, Any]:
            page = disks.describe_disks(self.ctx, s.account_id, s.region, page_size=100)
            # where an Available disk can go: the instances AttachDisk takes
            targets = [i for i in instances.describe_instances(
                self.ctx, s.account_id, s.region, page_size=100).items
                if i.status.value in ("Running", "Stopped")]
            names = policies.policy_names(self.ctx, {d.auto_snapshot_policy_id
                                                     for d in page.items})
            return {"disks": page.items, "attach_targets": targets, "policy_names": names}

        return self.render(request, "disks.html", session=s, nav="disks",
                           **await run_in_threadpool(load))

    async def disk_attach(self, request: Request, s: Session) -> Response:
        form = await self.form(request, s)
        disk_id = request.path_params["disk_id"]
        instance_id = str(form.get("instance_id", ""))
        return await self._act(request, s, lambda: disks.attach_disk(
            self.ctx, s.account_id, instance_id, disk_id), "disks")

    async def snapshot_create_disk(self, request: Request, s: Session) -> Response:
        """Create Disk from a snapshot's Actions: a new disk with its content (Available;
        attach it from the Disks page), the snapshot's disk untouched."""
        form = await self.form(request, s)
        snapshot_id = request.path_params["snapshot_id"]
        name = str(form.get("name", ""))

        try:
            disk_id = await run_in_threadpool(lambda: disks.create_disk(
                self.ctx, s.account_id, s.region, size_gib=None, snapshot_id=snapshot_id,
                name=name))
        except EcsError as exc:
            return self.back(request, "snapshots", s, f"{exc.code}: {exc.message}", "error")
        return self.back(request, "disks", s, f"Disk {disk_id} was created from "
                                               f"{snapshot_id}.")

    async def snapshots_page(self, request: Request, s: Session) -> Response:
        tab = request.query_params.get("tab", "snapshots")

        def load() -> dict[str, Any]:
            values: dict[str, Any] = {"tab": tab}
            if tab == "snapshots":
                values["snapshots"] = snapshots.describe_snapshots(
                    self.ctx, s.account_id, s.region, page_size=100).items
                return values
            values["groups"] = snapshots.describe_snapshot_groups(
                self.ctx, s.account_id, s.region, max_results=100).items
            wanted = request.query_params.get("rollback")
            if wanted:
                view = snapshots.get_snapshot_group(self.ctx, s.account_id, wanted)
                files = request.query_params.get("files") == "1"  # Files that will change
                preview = rollback.preview_group_rollback(
                    self.ctx, s.account_id, wanted,
                    file_changes=inspect.DEFAULT_MAX_FILES if files else None)
                values["rollback"] = {"group": view.group, "preview": preview,
                                      "files_listed": files}
                known = [d.bytes_written_since for d in preview.disks if d.ok]
                values["total_written"] = None if any(k is None for k in known) else sum(
                    k for k in known if k is not None)
            modify = request.query_params.get("modify")
            if modify:
                values["modify"] = snapshots.get_snapshot_group(self.ctx, s.account_id,
                                                                modify).group
            return values

        try:
            values = await run_in_threadpool(load)
        except EcsError as exc:
            s.flash = {"text": f"{exc.code}: {exc.message}", "kind": "error"}
            values = {"tab": tab, "groups": [], "snapshots": []}
        return self.render(request, "snapshots.html", session=s, nav="snapshots", **values)

    async def task_page(self, request: Request, s: Session) -> Response:
        task_id = request.path_params["task_id"]
        try:
            task = await run_in_threadpool(tasks_view.get_task, self.ctx, s.account_id, None,
                                           task_id)
        except EcsError as exc:
            return self.error(request, s, 404, exc.code, exc.message)
        titles = {"ResetDisks": ("Rollback instance", "The rollback finished: the selected "
                                 "disks hold the instance snapshot's data."),
                  "TakeSnapshots": ("Create Instance Snapshot", "The instance snapshot is "
                                    "accomplished."),
                  "StartInstance": ("Start instance", "The instance is running."),
                  "StopInstance": ("Stop instance", "The instance is stopped."),
                  "RebootInstance": ("Reboot instance", "The instance restarted."),
                  "RestoreSnapshotFiles": ("Restore files", "The files are restored.")}
        title, success = titles.get(task.action, (task.action, "Done."))
        safety = task.result.get("SafetySnapshotGroupId") if task.action == "ResetDisks" \
            else None
        back = str(request.url_for("snapshots").path) + "?tab=instance-snapshots" \
            if task.action in ("ResetDisks", "TakeSnapshots") else \
            str(request.url_for("instances").path)
        return self.render(request, "task.html", session=s, nav="snapshots", task=task,
                           title=title, success=success, safety=safety, back=back)

    # ------------------------------------------------------------ actions

    async def _act(self, request: Request, s: Session, run: Any, route: str,
                   query: str = "") -> Response:
        try:
            task_id = await run_in_threadpool(run)
        except EcsError as exc:
            return self.back(request, route, s, f"{exc.code}: {exc.message}", "error", query)
        if isinstance(task_id, str) and task_id.startswith("t-"):
            return RedirectResponse(str(request.url_for("task", task_id=task_id).path),
                                    status_code=303)
        return self.back(request, route, s, "Done.", "ok", query)

    async def instance_start(self, request: Request, s: Session) -> Response:
        await self.form(request, s)
        iid = request.path_params["instance_id"]
        return await self._act(request, s, lambda: instances.start_instance(
            self.ctx, s.account_id, iid, region_id=s.region), "instances")

    async def instance_stop(self, request: Request, s: Session) -> Response:
        form = await self.form(request, s)
        iid = request.path_params["instance_id"]
        mode = str(form.get("stopped_mode", "KeepCharging"))
        force = form.get("force") == "true"
        return await self._act(request, s, lambda: instances.stop_instance(
            self.ctx, s.account_id, iid, region_id=s.region, force=force, stopped_mode=mode),
            "instances")

    async def instance_reboot(self, request: Request, s: Session) -> Response:
        await self.form(request, s)
        iid = request.path_params["instance_id"]
        return await self._act(request, s, lambda: instances.reboot_instance(
            self.ctx, s.account_id, iid, region_id=s.region), "instances")

    async def instance_snapshot(self, request: Request, s: Session) -> Response:
        form = await self.form(request, s)
        iid = request.path_params["instance_id"]
        chosen = [str(d) for d in form.getlist("disk")]
        name, description = str(form.get("name", "")), str(form.get("description", ""))

        def run() -> str:
            all_disks = [d.id for d in disks.describe_disks(self.ctx, s.account_id, s.region,
                                                            instance_id=iid,
                                                            page_size=100).items]
            exclude = [d for d in all_disks if d not in chosen]
            _, task_id = snapshots.create_snapshot_group(
                self.ctx, s.account_id, s.region, iid, exclude_disk_ids=exclude, name=name,
                description=description)
            return task_id

        return await self._act(request, s, run, "instances", f"?snapshot={iid}")

    async def disk_detach(self, request: Request, s: Session) -> Response:
        await self.form(request, s)
        disk_id = request.path_params["disk_id"]

        def run() -> str:
            page = disks.describe_disks(self.ctx, s.account_id, s.region, disk_ids=[disk_id])
            if not page.items or not page.items[0].instance_id:
                raise EcsError("InvalidDisk.AlreadyDetached", "The disk is not attached.", 404)
            return disks.detach_disk(self.ctx, s.account_id, page.items[0].instance_id,
                                     disk_id)

        return await self._act(request, s, run, "disks")

    async def group_rollback(self, request: Request, s: Session) -> Response:
        form = await self.form(request, s)
        group_id = request.path_params["group_id"]
        chosen = {str(d) for d in form.getlist("disk")}
        auto_start = form.get("auto_start") == "true"
        safety = form.get("safety") == "true"
        query = f"?tab=instance-snapshots&rollback={group_id}"

        def run() -> str:
            if not chosen:
                raise EcsError("MissingParameter", "Select at least one disk to roll back.",
                               400)
            view = snapshots.get_snapshot_group(self.ctx, s.account_id, group_id)
            items = [(x.source_disk_id, x.id) for x in view.snapshots
                     if x.source_disk_id in chosen]
            return rollback.reset_disks(self.ctx, s.account_id, s.region, items,
                                        auto_start=auto_start, safety_snapshot=safety).task_id

        return await self._act(request, s, run, "snapshots", query)

    async def undo_rollback(self, request: Request, s: Session) -> Response:
        form = await self.form(request, s)
        task_id = request.path_params["task_id"]
        auto_start = form.get("auto_start") == "true"

        def run() -> str:
            task = tasks_view.get_task(self.ctx, s.account_id, None, task_id)
            safety = task.result.get("SafetySnapshotGroupId")
            if not safety:
                raise EcsError("InvalidSnapshotGroupId.NotFound",
                               "That rollback took no safety snapshot.", 404)
            view = snapshots.get_snapshot_group(self.ctx, s.account_id, safety)
            items = [(x.source_disk_id, x.id) for x in view.snapshots]
            return rollback.reset_disks(self.ctx, s.account_id, None, items,
                                        auto_start=auto_start).task_id

        try:
            new_task = await run_in_threadpool(run)
        except EcsError as exc:
            s.flash = {"text": f"{exc.code}: {exc.message}", "kind": "error"}
            return RedirectResponse(str(request.url_for("task", task_id=task_id).path),
                                    status_code=303)
        return RedirectResponse(str(request.url_for("task", task_id=new_task).path),
                                status_code=303)

    async def group_modify(self, request: Request, s: Session) -> Response:
        form = await self.form(request, s)
        gid = request.path_params["group_id"]
        return await self._act(request, s, lambda: snapshots.modify_snapshot_group(
            self.ctx, s.account_id, s.region, gid, name=str(form.get("name", "")) or None,
            description=str(form.get("description", "")) or None), "snapshots",
            "?tab=instance-snapshots")

    async def group_delete(self, request: Request, s: Session) -> Response:
        await self.form(request, s)
        gid = request.path_params["group_id"]
        return await self._act(request, s, lambda: snapshots.delete_snapshot_group(
            self.ctx, s.account_id, s.region, gid)[1] or None, "snapshots",
            "?tab=instance-snapshots")

    # ------------------------------------------------------------ serial console

    async def connect_page(self, request: Request, s: Session) -> Response:
        iid = request.path_params["instance_id"]
        page = await run_in_threadpool(lambda: instances.describe_instances(
            self.ctx, s.account_id, s.region, instance_ids=[iid]))
        if not page.items:
            return self.render(request, "task.html", status=404, session=s, **self._missing())
        refused = await run_in_threadpool(console_access.serial_refusal, self.ctx,
                                          s.account_id, iid)
        return self.render(request, "connect.html", session=s, nav="instances",
                           inst=page.items[0], refused=refused)

    async def serial(self, websocket: WebSocket) -> None:
        if not same_origin(websocket):  # a page of another site using our cookie
            await websocket.close(code=1008)  # policy violation (HTTP 403 before accept)
            return
        s = await self.session(websocket)
        if s is None:
            await websocket.close(code=4401)
            return
        iid = websocket.path_params["instance_id"]
        try:  # this host's VM, or (cluster) its host's agent, given a short-lived token
            target = await run_in_threadpool(console_access.serial_console, self.ctx,
                                             s.account_id, iid)
            stream = await serial_pipe.open_serial(target)
        except (EcsError, OSError, WebSocketException):
            await websocket.close(code=4404)
            return
        await websocket.accept()

        async def watch_session() -> None:  # a revoked session closes its serial console
            while await self.session(websocket) is not None:
                await asyncio.sleep(SERIAL_SESSION_CHECK_S)

        await serial_pipe.pump(websocket, stream, watch_session())


def create_console(ctx: ServiceContext) -> Starlette:
    c = Console(ctx)
    g = c.guarded
    routes = [
        Route("/", c.home, name="home"),
        Route("/login", c.login_get, name="login", methods=["GET"]),
        Route("/login", c.login, methods=["POST"]),
        Route("/logout", g(c.logout), name="logout", methods=["POST"]),
        Route("/region", g(c.set_region), name="region", methods=["POST"]),
        Route("/instances/", g(c.instances_page), name="instances"),
        Route("/instances/{instance_id}", g(c.instance_page), name="instance"),
        Route("/instances/{instance_id}/start", g(c.instance_start), name="instance_start",
              methods=["POST"]),
        Route("/instances/{instance_id}/stop", g(c.instance_stop), name="instance_stop",
              methods=["POST"]),
        Route("/instances/{instance_id}/reboot", g(c.instance_reboot), name="instance_reboot",
              methods=["POST"]),
        Route("/instances/{instance_id}/snapshot-group", g(c.instance_snapshot),
              name="instance_snapshot", methods=["POST"]),
        Route("/instances/{instance_id}/connect", g(c.connect_page), name="connect"),
        WebSocketRoute("/instances/{instance_id}/serial", c.serial, name="serial"),
        Route("/images/", g(c.images_page), name="images"),
        Route("/images/{image_id}/delete", g(c.image_delete), name="image_delete",
              methods=["POST"]),
        Route("/snapshots/{snapshot_id}/create-image", g(c.create_image),
              name="snapshot_create_image", methods=["POST"]),
        Route("/instances/{instance_id}/create-image", g(c.create_image),
              name="instance_create_image", methods=["POST"]),
        Route("/hosts/", g(c.hosts_page), name="hosts"),
        Route("/disks/", g(c.disks_page), name="disks"),
        Route("/disks/{disk_id}/detach", g(c.disk_detach), name="disk_detach",
              methods=["POST"]),
        Route("/disks/{disk_id}/attach", g(c.disk_attach), name="disk_attach",
              methods=["POST"]),
        Route("/snapshots/{snapshot_id}/create-disk", g(c.snapshot_create_disk),
              name="snapshot_create_disk", methods=["POST"]),
        Route("/snapshots/", g(c.snapshots_page), name="snapshots"),
        Route("/policies/", g(partial(policy_pages.page, c)), name="policies"),
        Route("/policies/create", g(partial(policy_pages.create, c)), name="policy_create",
              methods=["POST"]),
        *(Route(f"/policies/{{policy_id}}/{verb}", g(partial(handler, c)),
                name=f"policy_{verb}", methods=["POST"])
          for verb, handler in (("modify", policy_pages.modify),
                                ("delete", policy_pages.delete),
                                ("apply", policy_pages.apply),
                                ("cancel", policy_pages.cancel))),
        Route("/snapshots/{snapshot_id}/files", g(partial(files.browse, c)),
              name="snapshot_files"),
        Route("/snapshots/{snapshot_id}/files/download", g(partial(files.download, c)),
              name="snapshot_file_download"),
        Route("/snapshots/{snapshot_id}/files/restore", g(partial(files.restore, c)),
              name="snapshot_file_restore", methods=["POST"]),
        Route("/snapshot-groups/{group_id}/rollback", g(c.group_rollback),
              name="group_rollback", methods=["POST"]),
        Route("/snapshot-groups/{group_id}/modify", g(c.group_modify), name="group_modify",
              methods=["POST"]),
        Route("/snapshot-groups/{group_id}/delete", g(c.group_delete), name="group_delete",
              methods=["POST"]),
        Route("/tasks/{task_id}", g(c.task_page), name="task"),
        Route("/tasks/{task_id}/undo", g(c.undo_rollback), name="undo_rollback",
              methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)])
    app.state.console = c  # its sessions, for tests and operators
    return app
