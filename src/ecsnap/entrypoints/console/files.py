"""Console pages that look inside a snapshot (service.inspect): Browse files (a directory's
entries, a file's first bytes as text when it is text), Download, and Restore (a regular
file put back onto the instance of the snapshot's disk: service.restore_files). Server-rendered, no
script; guest names are shown escaped (`\\xNN`) and autoescaped by Jinja2; a download is
`application/octet-stream`, attachment, under a file name made of safe characters only."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from ecsnap.domain.errors import EcsError
from ecsnap.service import inspect, restore_files

if TYPE_CHECKING:
    from ecsnap.entrypoints.console.app import Console, Session

PAGE = 200  # entries per page
PREVIEW_BYTES = 64 * 1024  # a file's bytes shown on its page
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _crumbs(path: str) -> list[tuple[str, str]]:
    """(name, path) of each directory above and at `path` (escaped text), the root's
    name `/` (the template puts no separator after it: `/etc/conf`, not `/ / etc`)."""
    out, here = [("/", "/")], ""
    for part in [p for p in path.split("/") if p]:
        here += "/" + part
        out.append((part, here))
    return out


def _text(content: bytes | None) -> str | None:
    if content is None or b"\0" in content:
        return None
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:  # cut in the middle of a character at the end
        if exc.start < len(content) - 3:
            return None
        return content[:exc.start].decode("utf-8")


def download_name(path: str) -> str:
    """A file name for the browser from the guest's, in safe characters only."""
    name = UNSAFE.sub("_", path.rstrip("/").rsplit("/", 1)[-1]).strip("._")[:100]
    return name or "file"


async def browse(console: Console, request: Request, s: Session) -> Response:
    snapshot_id = request.path_params["snapshot_id"]
    path = request.query_params.get("path", "/") or "/"
    token = request.query_params.get("token") or None
    try:
        result = await run_in_threadpool(
            lambda: inspect.describe_snapshot_files(
                console.ctx, s.account_id, snapshot_id, path, region_id=s.region,
                next_token=token, max_results=PAGE, max_bytes=PREVIEW_BYTES))
    except EcsError as exc:
        return console.error(request, s, exc.http_status, exc.code, exc.message)
    target = None
    if result.entry.type == "file":
        target = await run_in_threadpool(lambda: restore_files.restore_target(
            console.ctx, s.account_id, snapshot_id, s.region))
    values: dict[str, Any] = {
        "result": result, "crumbs": _crumbs(result.entry.path), "restore": target,
        "text": _text(result.content) if result.entry.type == "file" else None}
    return console.render(request, "files.html", session=s, nav="snapshots", **values)


async def download(console: Console, request: Request, s: Session) -> Response:
    snapshot_id = request.path_params["snapshot_id"]
    path = request.query_params.get("path", "/") or "/"

    def read(offset: int) -> inspect.SnapshotFiles:
        return inspect.describe_snapshot_files(console.ctx, s.account_id, snapshot_id, path,
                                               region_id=s.region, offset=offset)

    try:
        first = await run_in_threadpool(read, 0)
    except EcsError as exc:
        return console.error(request, s, exc.http_status, exc.code, exc.message)
    if first.content is None:
        return console.error(request, s, 400, "InvalidPath.NotAFile",
                             f"{first.entry.path} is a {first.entry.type}: only a regular "
                             "file can be downloaded.")

    def chunks() -> Iterator[bytes]:
        part = first
        while part.content:
            yield part.content
            if not part.truncated:
                return
            part = read(part.offset + len(part.content))

    name = download_name(first.entry.path)
    return StreamingResponse(chunks(), media_type="application/octet-stream", headers={
        "content-disposition": f'attachment; filename="{name}"',
        "cache-control": "no-store"})


async def restore(console: Console, request: Request, s: Session) -> Response:
    """The Restore form of a file's page: RestoreSnapshotFiles for that one path, to the
    path it had or to the one typed in; then the task's page."""
    form = await console.form(request, s)
    snapshot_id = request.path_params["snapshot_id"]
    path = str(form.get("path", ""))
    target = str(form.get("target", "")).strip() or None
    instance_id = str(form.get("instance_id", ""))
    try:
        result = await run_in_threadpool(lambda: restore_files.restore_snapshot_files(
            console.ctx, s.account_id, instance_id, snapshot_id, [path], target_path=target,
            region_id=s.region))
    except EcsError as exc:
        return console.error(request, s, exc.http_status, exc.code, exc.message)
    where = "into the guest" if result.mode == restore_files.GUEST else \
        f"onto disk {result.disk_id}"
    s.flash = {"text": f"Restoring {path} to {result.items[0][1]} {where}.", "kind": "ok"}
    return RedirectResponse(str(request.url_for("task", task_id=result.task_id).path),
                            status_code=303)
