"""Which accelerator a VM gets: KVM, or TCG (software emulation).

"kvm" or "tcg" as configured; "auto" uses KVM only if a probe boot of the guest kernel
under KVM gets to starting init within a few seconds (on some hosts /dev/kvm exists but
KVM guests hang). The verdict is cached in `<run_root>/accel.json` per QEMU version and
host kernel, and logged with its reason (`<run_root>/accel-probe.log`: the console of the
probe boot). A firmware-booted VM gives no kernel to probe with: without a cached verdict
it gets TCG.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ecsnap.adapters.compute.base import ComputeError, VmSpec
from ecsnap.adapters.compute.qemu.rundir import utc_timestamp

PROBE_TIMEOUT = 8.0  # the KVM probe boot must get to init in this time
PROBE_STALL = 3.0  # ... and may not stay silent this long once it printed something
PROBE_MARKERS = (b"Freeing unused kernel", b"Run /init", b"Run /sbin/init",
                 b"VFS: Unable to mount root")


class Accelerator:
    """The accelerator verdict of one run root (probed at most once, across processes)."""

    def __init__(self, run_root: Path, accel: str, qemu_binary: str,
                 log: logging.Logger) -> None:
        if accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {accel!r}")
        self.run_root = run_root
        self.accel = accel
        self.qemu = qemu_binary
        self.log = log
        self._logged = False

    def _host_key(self) -> dict[str, str]:
        try:
            out = subprocess.run([self.qemu, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ComputeError(f"cannot run {self.qemu}: {exc}") from exc
        return {"qemu": out.splitlines()[0] if out else "unknown",
                "host_kernel": os.uname().release}

    def choose(self, spec: VmSpec | None = None) -> str:
        """The accelerator a VM gets: as configured, or for "auto" the cached verdict of
        the KVM probe (probing now with the spec's kernel when there is none)."""
        if self.accel != "auto":
            return self.accel
        cache = self.run_root / "accel.json"
        key = self._host_key()

        def cached() -> dict[str, Any] | None:
            with contextlib.suppress(OSError, ValueError):
                verdict = dict(json.loads(cache.read_text()))
                if all(verdict.get(k) == v for k, v in key.items()) and \
                        verdict.get("accel") in ("kvm", "tcg"):
                    return verdict
            return None

        verdict = cached()
        if verdict is None:
            if spec is None or spec.boot_mode != "direct" or not spec.kernel_path:
                self.log.warning("accelerator: TCG (software emulation) for now: KVM is "
                                 "unproven on this host and a firmware-booted VM gives no "
                                 "kernel to probe it with")
                return "tcg"
            self.run_root.mkdir(parents=True, exist_ok=True)
            with open(self.run_root / "accel.lock", "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)  # one probe at a time, across processes
                try:
                    verdict = cached()
                    if verdict is None:
                        started = time.monotonic()
                        accel, reason = self._probe(spec)
                        verdict = {**key, "accel": accel, "reason": reason,
                                   "probe_seconds": round(time.monotonic() - started, 1),
                                   "probed_at": utc_timestamp()}
                        tmp = cache.with_suffix(".tmp")
                        tmp.write_text(json.dumps(verdict, indent=2) + "\n")
                        os.replace(tmp, cache)
                        self._log_verdict(verdict, fresh=True)
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
        if not self._logged:
            self._log_verdict(verdict, fresh=False)
        return str(verdict["accel"])

    def reason(self) -> str:
        """Why VMs get the accelerator they get (what vm.json records)."""
        reason = f"accel={self.accel}"
        if self.accel == "auto":
            with contextlib.suppress(OSError, ValueError, KeyError):
                reason = json.loads((self.run_root / "accel.json").read_text())["reason"]
        return reason

    def _log_verdict(self, verdict: dict[str, Any], fresh: bool) -> None:
        self._logged = True
        what = "KVM (hardware virtualisation)" if verdict["accel"] == "kvm" else \
            "TCG (software emulation)"
        where = "" if fresh else f" (verdict cached in {self.run_root / 'accel.json'} at " \
                                 f"{verdict.get('probed_at', '?')})"
        self.log.warning("accelerator: %s: %s%s", what, verdict["reason"], where)

    def _probe(self, spec: VmSpec) -> tuple[str, str]:
        """Boot the spec's kernel under KVM and watch its console for init starting."""
        if not os.path.exists("/dev/kvm"):
            return "tcg", "there is no /dev/kvm"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg", "/dev/kvm is not accessible to this user"
        console = self.run_root / "accel-probe.log"
        console.unlink(missing_ok=True)
        cmd = [self.qemu, "-name", "ecsnap-kvm-probe", "-machine", "q35,accel=kvm",
               "-cpu", "host", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config",
               "-display", "none", "-no-reboot", "-kernel", spec.kernel_path]
        if spec.initrd_path:
            cmd += ["-initrd", spec.initrd_path]
        cmd += ["-append", "console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=7 panic=-1",
                "-serial", f"file:{console}"]
        self.log.info("probing KVM: booting %s under KVM for at most %.0f s",
                      spec.kernel_path, PROBE_TIMEOUT)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        seen, last_growth = b"", time.monotonic()
        try:
            while True:
                now = time.monotonic()
                with contextlib.suppress(OSError):
                    text = console.read_bytes()
                    if len(text) != len(seen):
                        seen, last_growth = text, now
                if any(marker in seen for marker in PROBE_MARKERS):
                    return "kvm", f"a probe boot under KVM got to the guest's init in " \
                                  f"{now - started:.1f} s"
                if proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                    err = "; ".join(line.strip() for line in err.strip().splitlines()[-3:])
                    return "tcg", "KVM probe failed at once, QEMU could not run a KVM " \
                                  f"guest: {err[-300:] or f'exit status {proc.returncode}'}"
                lines = seen.strip().splitlines()
                where = lines[-1].decode(errors="replace").strip()[:80] if lines else ""
                if seen and now - last_growth > PROBE_STALL:
                    return "tcg", f"KVM probe hung: the guest kernel went silent for " \
                                  f"{PROBE_STALL:.0f} s after {where!r} ({now - started:.1f} s " \
                                  "in); /dev/kvm exists but does not run this kernel"
                if now - started > PROBE_TIMEOUT:
                    return "tcg", f"KVM probe timed out after {PROBE_TIMEOUT:.0f} s without " \
                                  f"the guest kernel reaching init (last console line: " \
                                  f"{where or 'none'!r})"
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


__all__ = ["Accelerator"]
