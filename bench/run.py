"""ecsnap benchmarks: every figure is measured side by side with its reference, in one run,
repeated, and reported as median, spread and ratio (machines here are noisy: absolute
times are context only).

  1. instance snapshot of a stopped 3-disk instance through the API (request -> group
     accomplished) vs bare `qemu-img snapshot -c` on the same three files, per size;
  2. rollback of 3 disks (ResetDisks, safety snapshot on) vs bare `qemu-img snapshot -c`
     + `-a` on the same files, per size;
  3. the alternatives a user would otherwise use, same disks: `cp --sparse=always`,
     `qemu-img convert`, a btrfs subvolume snapshot and XFS `cp --reflink` on loop-mounted
     file systems (bench/alternatives.py); plots of cost vs size (bench/plots.py);
  4. and 6. in a real guest: the write stall of a live snapshot, and guest write
     throughput with 0-50 snapshots on the disk (bench/guest.py);
  5. metadata scale: 10,000 snapshot groups (30,000 snapshots) and 1,000 instances; p50/p99
     latency and requests/s of DescribeSnapshotGroups (NextToken walk, pages of 100),
     DescribeInstances and DescribeSnapshots under a bounded loopback load, SQLite and
     PostgreSQL side by side, each against the bare SQL of the same answer (bench/scale.py).

Usage: python -m bench.run [--sizes 0.1,1,4,8] [--repeats 5] [--out docs/benchmarks.md]
       python -m bench.run --smoke   (tiny sizes, what `make test` runs so nothing rots)
       (--out rewrites the figures it measured and keeps the rest of the file: the
       hand-written section "What was slow, what was fixed, and what remains", and with
       --only the sections not measured again, each marked with the run it comes from)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench.alternatives import alternatives_rows, reflink_alternatives
from bench.guest import run_guest_benchmarks
from bench.plots import plot_costs
from bench.scale import LeanClient, bench_scale, scale_section, seed_metadata

ROOT = Path(__file__).parents[1]
GIB = 1024**3
# the hand-written analysis at the end of the report: a rerun keeps it (and its author
# updates it to the new figures)
FINDINGS = "## What was slow, what was fixed, and what remains"
KEPT = "From the run of"  # marks a section kept from an earlier report (a run with --only)


@dataclass
class Series:
    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> str:
        return f"{min(self.samples) * 1000:.1f}-{max(self.samples) * 1000:.1f} ms"


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def sh_all(*cmds: list[str]) -> None:
    for cmd in cmds:
        sh(*cmd)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Server:
    """`ecsnap serve` on a fresh data dir, and a signed client of it."""

    def __init__(self, data_dir: Path, database_url: str = "") -> None:
        from ecsnap import bootstrap, config
        from ecsnap.service import images, setup

        self.data_dir = data_dir
        self.env = {**os.environ, "ECSNAP_ACCEL": "tcg"}
        if database_url:
            self.env["ECSNAP_DATABASE_URL"] = database_url
        settings = config.load(data_dir, database_url=database_url or "",
                               region_vcpus=100000, region_memory_mib=100000000)
        self.ctx = bootstrap.build(settings, background=False)
        done = setup.initialise(self.ctx, "local-1")
        template = data_dir / "template.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(template), "1G")
        self.image = images.register_image(self.ctx, "local-1", name="bench", os_name="bench",
                                           template=template, size_gib=1).id
        self.account_id = done.account.id
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        creds = json.loads((data_dir / "credentials.json").read_text()) if \
            (data_dir / "credentials.json").exists() else {}
        creds.update(AccessKeyId=done.access_key.id, AccessKeySecret=done.access_key.secret,
                     RegionId="local-1", Endpoint=f"http://127.0.0.1:{self.port}/")
        (data_dir / "credentials.json").write_text(json.dumps(creds))
        self.log = (data_dir / "serve.log").open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ecsnap", "serve", "--data-dir",
                                     str(data_dir), "--listen", f"127.0.0.1:{self.port}"],
                                    cwd=ROOT, env=self.env, stdout=self.log, stderr=self.log)
        # the client: signed like the SDKs sign (RPC v1, a fresh nonce per request) over one
        # keep-alive connection, without a client library's own cost (httpx, the CLI's:
        # about 1 ms per request here), which is the client's, not ecsnap's
        self.api = LeanClient(creds)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.call("DescribeRegions")
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def call(self, action: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return dict(json.loads(self.api.call(action, params or {})))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def wait_task(self, task_id: str) -> dict[str, Any]:
        while True:
            task = self.call("DescribeTaskAttribute", {"TaskId": task_id})
            if task["TaskStatus"] != "Processing":
                if task["TaskStatus"] != "Finished":
                    raise RuntimeError(task)
                return dict(task)
            time.sleep(0.005)

    def delete_group(self, group_id: str) -> None:
        task_id = self.call("DeleteSnapshotGroup", {"SnapshotGroupId": group_id})["TaskId"]
        if task_id:
            self.wait_task(task_id)

    def instance_with_data(self, gib: float) -> tuple[str, dict[str, str]]:
        """A stopped instance with 3 disks, each with `gib` GiB written."""
        body = self.call("CreateInstance", {"ImageId": self.image,
                                            "InstanceType": "ecs.t5-lc2m1.nano",
                                            "SystemDisk.Size": 20,
                                            "DataDisk.1.Size": 20, "DataDisk.2.Size": 20})
        iid = body["InstanceId"]
        while self.call("DescribeInstances", {"InstanceIds": json.dumps([iid])})[
                "Instances"]["Instance"][0]["Status"] != "Stopped":
            time.sleep(0.05)
        disks = self.call("DescribeDisks", {"InstanceId": iid})["Disks"]["Disk"]
        pool = self.data_dir / "pools" / "local-1"
        paths = {d["DiskId"]: str(pool / f"{d['DiskId']}.qcow2") for d in disks}
        size = max(65536, int(gib * GIB) // 65536 * 65536)
        for n, path in enumerate(paths.values()):
            step = min(size, GIB)
            for offset in range(0, size, step):
                sh("qemu-io", "-f", "qcow2", "-c",
                   f"write -P {0x40 + n} {offset} {min(step, size - offset)}", path)
        return iid, paths


def alternate(repeats: int, ours: Series, run_ours: Callable[[int], float], ref: Series,
              run_ref: Callable[[int], float]) -> None:
    """Each repeat measures both, ecsnap first in even repeats and the reference first in
    odd ones: what the previous measurement left behind (the disk still writing back the
    metadata a delete freed, say) falls on both alike."""
    for r in range(repeats):
        pair = [(ours, run_ours), (ref, run_ref)]
        for into, run in pair if r % 2 == 0 else pair[::-1]:
            into.samples.append(run(r))


def bench_snapshot_and_rollback(server: Server, gib: float, repeats: int,
                                work: Path) -> dict[str, Series | str]:
    iid, paths = server.instance_with_data(gib)
    files = list(paths.values())
    out = {k: Series(k) for k in ("group", "bare_snapshot", "rollback", "bare_rollback",
                                  "cp", "convert")}

    def ecsnap(action: str, params: dict[str, str], made: str) -> Callable[[int], float]:
        """One API request timed until its task has ended; the group it `made` then goes."""
        def run(r: int) -> float:
            start = time.perf_counter()
            body = server.call(action, params)
            server.wait_task(body["TaskId"])
            took = time.perf_counter() - start
            server.delete_group(body[made])
            return took
        return run

    def bare(revert_to: dict[str, str] | None = None) -> Callable[[int], float]:
        """Bare `qemu-img snapshot -c` on each file in turn (a script's way), then `-a` of
        the file's snapshot in `revert_to` if given, timed; the new snapshot then goes."""
        def run(r: int) -> float:
            calls = []
            for f in files:
                calls.append(["qemu-img", "snapshot", "-c", f"bare-{r}", f])
                if revert_to:
                    calls.append(["qemu-img", "snapshot", "-a", revert_to[f], f])
            took = timed(partial(sh_all, *calls))
            for f in files:
                sh("qemu-img", "snapshot", "-d", f"bare-{r}", f)
            return took
        return run

    alternate(repeats, out["group"], ecsnap("CreateSnapshotGroup", {"InstanceId": iid},
                                            "SnapshotGroupId"),
              out["bare_snapshot"], bare())

    body = server.call("CreateSnapshotGroup", {"InstanceId": iid})
    server.wait_task(body["TaskId"])
    target = body["SnapshotGroupId"]
    members = server.call("DescribeSnapshotGroups", {"SnapshotGroupId.1": target})[
        "SnapshotGroups"]["SnapshotGroup"][0]["Snapshots"]["Snapshot"]
    params: dict[str, str] = {}
    for n, s in enumerate(members, 1):
        params[f"Disk.{n}.DiskId"], params[f"Disk.{n}.SnapshotId"] = s["SourceDiskId"], \
            s["SnapshotId"]
    of_file = {paths[s["SourceDiskId"]]: s["SnapshotId"] for s in members}
    alternate(repeats, out["rollback"], ecsnap("ResetDisks", params, "SafetySnapshotGroupId"),
              out["bare_rollback"], bare(revert_to=of_file))
    for r in range(max(1, min(repeats, 3))):
        copies = work / f"copies-{r}"
        copies.mkdir()
        out["cp"].samples.append(timed(partial(
            sh_all, *(["cp", "--sparse=always", f, str(copies)] for f in files))))
        sh("rm", "-rf", str(copies))
        copies.mkdir()
        out["convert"].samples.append(timed(partial(sh_all, *(
            ["qemu-img", "convert", "-O", "qcow2", f, str(copies / Path(f).name)]
            for f in files))))
        sh("rm", "-rf", str(copies))
    server.delete_group(target)
    results: dict[str, Series | str] = dict(out)
    results.update(reflink_alternatives(files, work, max(1, min(repeats, 3))))
    # the disks of this size go, so that the largest size has the room it needs
    server.call("DeleteInstance", {"InstanceId": iid, "Force": "true"})
    deadline = time.monotonic() + 120
    while any(Path(f).exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.1)
    return results


def machine() -> str:
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout
    return (f"{platform.node()}: {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{qemu.splitlines()[0]}, {platform.platform()}")


def series(results: dict[str, Series | str], key: str) -> Series:
    value = results[key]
    assert not isinstance(value, str), value  # (under -m, Series may be bench.run's twin)
    return value


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def disk_sections(sizes: list[float], per_size: dict[float, dict[str, Series | str]],
                  out: Path | None) -> list[str]:
    """The report of benchmarks 1-3, with its plots when written to a file."""
    lines: list[str] = []
    for title, ours, ref, target in (
            ("1. Instance snapshot, stopped instance, 3 disks: API end to end vs bare "
             "`qemu-img snapshot -c`", "group", "bare_snapshot", 1.3),
            ("2. Rollback of 3 disks (ResetDisks, safety snapshot on) vs bare "
             "`qemu-img snapshot -c` + `-a`", "rollback", "bare_rollback", 1.5)):
        lines += [f"## {title}", "",
                  row("GiB written per disk", "ecsnap median", "ecsnap spread",
                      "reference median", "reference spread", "ratio", "target", "met"),
                  row(*["---"] * 8)]
        for size in sizes:
            a, b = series(per_size[size], ours), series(per_size[size], ref)
            ratio = a.median / b.median
            lines.append(row(size, f"{a.median * 1000:.1f} ms", a.spread,
                             f"{b.median * 1000:.1f} ms", b.spread, f"{ratio:.2f}",
                             f"≤ {target}", "yes" if ratio <= target else "no"))
        flat = series(per_size[sizes[-1]], ours).median / \
            series(per_size[sizes[0]], ours).median
        lines += ["", f"Flat in size: {sizes[-1]} GiB / {sizes[0]} GiB = {flat:.2f} "
                      f"(target ≤ 1.2: {'met' if flat <= 1.2 else 'not met'}).", ""]
    lines += [
        "Method: a stopped instance with 3 disks (20 GiB qcow2 each, the size written into "
        "each from the host first). ecsnap: a signed API request over loopback "
        "(CreateSnapshotGroup, or ResetDisks of all 3 disks with its safety snapshot), "
        "answered when its task has ended, and the DescribeTaskAttribute that sees it "
        "Finished; the client signs each request as the SDKs do (RPC v1, a fresh nonce) on "
        "one keep-alive connection, with no client library's own cost. Reference: the bare "
        "`qemu-img` calls on the same files one after the other, as a script would run them "
        "(ecsnap runs its per-disk calls side by side). Every repeat measures both, in "
        "turns which goes first; each is undone (snapshot deleted) before the next.", ""]
    lines += alternatives_rows(sizes, per_size)
    if out is not None:
        lines += [f"![{p.stem}]({p.name})" for p in plot_costs(sizes, per_size, out.parent)]
        lines.append("")
    return lines


def report(sizes: list[float], per_size: dict[float, dict[str, Series | str]],
           guest: list[str], scale: dict[str, dict[str, tuple[float, float, float]]],
           out: Path | None, groups: int, instances: int, clients: int = 4) -> str:
    lines = ["# ecsnap benchmarks", "",
             f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {machine()}.",
             "Every ecsnap figure is measured in the same run as its reference, on the same "
             "files, interleaved; medians over the repeats, spread is min-max.", ""]

    if per_size:
        lines += disk_sections(sizes, per_size, out)
    # in the order: the guest lines hold sections 4 and 6, with 5 between them
    six = next((n for n, line in enumerate(guest) if line.startswith("## 6.")), len(guest))
    lines += guest[:six]
    if scale:
        lines += scale_section(scale, groups, instances, clients)
    lines += guest[six:]
    text = "\n".join(lines)
    if out and out.exists():
        text = keep_from_earlier(text, out.read_text())
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def _sections(text: str) -> tuple[str, dict[str, str]]:
    """The text before the first "## " heading, and each section by its number ("1".."6")
    or, for the hand-written one, FINDINGS."""
    head, *parts = ("\n" + text).split("\n## ")
    sections: dict[str, str] = {}
    for part in parts:
        key = FINDINGS if ("## " + part).startswith(FINDINGS) else part.split(".", 1)[0]
        sections[key] = "## " + part.rstrip("\n") + "\n"
    return head.lstrip("\n"), sections


def keep_from_earlier(text: str, earlier: str) -> str:
    """A new report `text`, with what it does not hold taken from the `earlier` report in
    its place: the hand-written findings, and the sections a run with --only did not
    measure again (each marked with the run it comes from, unless it says its own: the
    sections other benchmarks write, with their "Run on" line)."""
    head, new = _sections(text)
    old_head, old = _sections(earlier)
    when = next((line.removeprefix("Run on ").split(",", 1)[0]
                 for line in old_head.splitlines() if line.startswith("Run on ")), "unknown")
    merged = dict(new)
    for key, section in old.items():
        if key in merged:
            continue
        if key != FINDINGS and KEPT not in section and "\nRun on " not in section:
            heading, rest = section.split("\n", 1)
            section = f"{heading}\n\n{KEPT} {when}, not measured again in this one.\n{rest}"
        merged[key] = section
    order = sorted(merged, key=lambda k: (k == FINDINGS, k))
    return head.rstrip("\n") + "\n\n" + "\n".join(merged[k] for k in order)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.1,1,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--groups", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--only", choices=("disks", "guest", "scale"), default=None,
                        help="run only benchmarks 1-3 (disks), 4 and 6 (guest) or 5 (scale)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat: proves the benchmarks still run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats, args.groups, args.seconds = "0.01,0.02", 1, 30, 0.5
    sizes = [float(s) for s in args.sizes.split(",")]
    per_size: dict[float, dict[str, Series | str]] = {}
    guest: list[str] = []
    scale: dict[str, dict[str, tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ecsnap-bench-") as tmp:
        work = Path(tmp)
        if args.only in (None, "disks"):
            server = Server(work / "data")
            try:
                for size in sizes:
                    print(f"bench 1-3 at {size} GiB per disk", file=sys.stderr)
                    per_size[size] = bench_snapshot_and_rollback(server, size, args.repeats,
                                                                 work)
            finally:
                server.stop()
        if args.only in (None, "guest"):
            print("bench 4 and 6 in a guest", file=sys.stderr)
            guest = run_guest_benchmarks(work / "guest", repeats=args.repeats,
                                         smoke=args.smoke)
        databases = [("SQLite", "")] if args.only in (None, "scale") else []
        pg = None
        if databases and not args.no_postgres:
            sys.path.insert(0, str(ROOT))
            from tests.pg import PostgresServer

            (work / "pg").mkdir()
            pg = PostgresServer(work / "pg")
            pg.start()
            databases.append(("PostgreSQL", pg.fresh_database()))
        try:
            for name, url in databases:
                print(f"bench 5 on {name}", file=sys.stderr)
                scaled = Server(work / f"scale-{name}", url)
                try:
                    seed_metadata(scaled, args.groups, min(1000, args.groups))
                    scale[name] = bench_scale(scaled, args.seconds, args.clients)
                finally:
                    scaled.stop()
        finally:
            if pg is not None:
                pg.stop()
    print(report(sizes, per_size, guest, scale, args.out, args.groups, min(1000, args.groups),
                 args.clients))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
