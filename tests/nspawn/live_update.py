"""A full live update of a real systemd service, in a container, on the emulator.

The container is a Debian root file system (bookworm: systemd 252, trixie: 257, sid: 262) with the
project's Debian packages installed and the demo service (demo/luo-demo-cache: a 64 MiB cache in a memfd)
opted in.  The emulator runs on the host; its socket is bind-mounted to /run/luo-emu in the container.

  boot 1: start the demo (it builds its cache and hands the memfd to luod)
          liveupdatectl kexec  (or systemd's own kexec.target)  ->  units stop, hooks preserve,
          luod survives the final kill, the system-shutdown hook tells the emulator "kexec now"
  boot 2: luod restores, the demo gets its memfd back, checks it, carries on, its session is finished

``python3 -m tests.nspawn.live_update --suite bookworm`` prints the before/after (the README's demo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from tests.harness import Emulator
from tests.images import CURRENT, kernel_image
from tests.nspawn import harness

TOP = Path(__file__).resolve().parent.parent.parent
DEMO = TOP / "demo"
GUEST_KERNEL = "/boot/vmlinuz-demo"  # a synthetic bzImage of the emulator's LUO formats
OLD_KERNEL = "/boot/vmlinuz-luo-v4"  # the same of an older LUO format, which the pre-flight refuses
TRIGGERS = ("liveupdatectl", "kexec.target", "SIGRTMIN+6")
SIGRTMIN_6_TO_PID1 = "python3 -c 'import os, signal; os.kill(1, signal.SIGRTMIN + 6)'"  # dash's kill lacks it


SPARSE_SERVICE = """#!/usr/bin/python3
import os, signal
from luo_systemd import varlink
fd = os.memfd_create("big", os.MFD_CLOEXEC)
os.ftruncate(fd, 1 << 40)
with varlink.Client("/run/luod/liveupdate.sock") as c:
    c.call("Store", {"names": ["big"]}, [fd])
signal.pause()
"""
SPARSE_UNIT = """[Service]
ExecStart=/usr/local/bin/luo-sparse

[X-LiveUpdate]
FileDescriptorNames=big
BytesMax=2T
"""


@dataclasses.dataclass
class Outcome:
    suite: str
    systemd: str
    trigger: str
    before: dict[str, Any]
    after: dict[str, Any]
    blackout_sec: float
    carried: dict[str, Any]
    status_after: dict[str, Any]
    finished: bool
    unit_warnings: list[str]  # what systemd said about the drop-ins the generator wrote
    verify: dict[str, Any]  # liveupdatectl verify --json after the boot
    verify_exit: int

    @property
    def ok(self) -> bool:
        return (
            self.after.get("restored") is True
            and self.after.get("live_update") is True
            and self.after.get("sha256") == self.before.get("sha256")
            and self.after.get("counter_at_start", -1) >= self.before.get("counter", 0)
            and self.finished
            and not self.unit_warnings
            and self.verify_exit == 0
        )


def install(c: harness.Container, debs: list[Path]) -> None:
    names = " ".join(f"/mnt/debs/{d.name}" for d in debs)
    c.sh(f"dpkg -i {names}", check=True, timeout=120)
    c.write_file("/usr/local/bin/luo-demo-cache", (DEMO / "luo-demo-cache").read_text(), mode=0o755)
    c.write_file("/etc/systemd/system/luo-demo-cache.service", (DEMO / "luo-demo-cache.service").read_text())
    c.write_file(GUEST_KERNEL, kernel_image(CURRENT))
    c.write_file(OLD_KERNEL, kernel_image(["luo-v4", "memfd-v2", "kho-v4"], "xz"))
    c.sh("systemctl daemon-reload && systemctl enable luod.socket luod.service luo-demo-cache.service", check=True)
    c.sh("systemctl start luod.service", check=True)


def demo_status(c: harness.Container) -> dict[str, Any]:
    # Type=notify: start returns once the demo is READY (a no-op if it already is).
    c.sh("systemctl start luo-demo-cache.service", check=True, timeout=120)
    return dict(json.loads(c.read_file("/run/luo-demo/status.json")))


def journal(c: harness.Container, *units: str, boot: str = "-1") -> str:
    args = " ".join(f"-u {u}" for u in units)
    return str(c.sh(f"journalctl -b {boot} --no-pager -o short-monotonic {args}", timeout=30).stdout)


class LiveUpdateBed:
    """A booted container with the packages and the demo installed, on an emulator of its own."""

    journal_units: tuple[str, ...] = ("luod.service", "luo-demo-cache.service")  # shown when a test fails

    def __init__(
        self,
        suite: str,
        debs: list[Path],
        workdir: Path,
        rootfs: Optional[Path] = None,
        binds: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.suite = suite
        self.debs = debs
        emu_dir = workdir / "luo-emu"
        emu_dir.mkdir(parents=True, exist_ok=True)
        self.emulator = Emulator(emu_dir, name="liveupdate.sock")
        self.c = harness.Container(
            rootfs or harness.ensure_rootfs(suite, quiet=True),
            workdir / "container",
            binds=[(str(emu_dir), "/run/luo-emu"), *binds],
            binds_ro=[(str(debs[0].parent), "/mnt/debs")],
        )

    def __enter__(self) -> LiveUpdateBed:
        try:
            self.c.boot()
            self.c.wait_running()
            install(self.c, self.debs)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None and self.c.running:
            print(journal(self.c, *self.journal_units, boot="0"), file=sys.stderr)
        if self.c.running:
            self.c.poweroff()
            self.c.wait_exit(timeout=60)
        self.c.close()
        self.emulator.stop()

    def luod_status(self) -> dict[str, Any]:
        return dict(json.loads(self.c.sh("liveupdatectl --json=short status", check=True).stdout))

    def kexec(self, trigger: str, timeout: float = 120.0) -> float:
        """Starts a kexec (one of TRIGGERS) and waits until the
        container has gone down by it; returns when that was."""
        c = self.c
        if trigger == "liveupdatectl":
            c.sh(f"liveupdatectl kexec --kernel {GUEST_KERNEL}", check=True, timeout=120)
        elif trigger == "kexec.target":  # systemd's own kexec of a kernel another tool loaded
            c.sh(f"luo-emu load {GUEST_KERNEL} --cmdline 'kho=on liveupdate=on'", check=True)
            c.start_kexec()
        else:  # prepared, then the signal fleet tools send to PID 1 (kured's signal method)
            c.sh(f"liveupdatectl prepare {GUEST_KERNEL}", check=True, timeout=120)
            c.sh(SIGRTMIN_6_TO_PID1, check=True)
        code = c.wait_exit(timeout=timeout)
        if code != 0 or c.shutdown_kind() not in (None, "kexec"):
            raise harness.HarnessError(f"the container went down with {code} ({c.shutdown_kind()})")
        return time.time()

    def live_update(self, trigger: str = "liveupdatectl") -> Outcome:
        c = self.c
        demo_status(c)
        time.sleep(0.3)  # let the counter move, so that carrying on is visible
        before = dict(json.loads(c.read_file("/run/luo-demo/status.json")))
        start = time.time()
        self.kexec(trigger)
        carried = self.emulator.status()
        c.boot()
        c.wait_running()
        after = demo_status(c)
        status_after = self.luod_status()
        warnings = c.sh("journalctl -b --no-pager -o cat _PID=1 | grep -F 50-liveupdate.conf", timeout=30).stdout
        verify = c.sh("liveupdatectl --json=short verify", timeout=30)
        return Outcome(
            self.suite,
            str(c.systemd_version),
            trigger,
            before,
            after,
            after["ready"] - start,
            carried,
            status_after,
            status_after["phase"] == "idle",
            warnings.splitlines(),
            json.loads(verify.stdout),
            verify.returncode,
        )

    def refused_update(self) -> dict[str, Any]:
        """The demo stored its cache, then lost its opt-in (an admin removed [X-LiveUpdate]): the pre-flight
        refuses, nothing is stopped."""
        before = demo_status(self.c)
        self.c.sh(
            "sed -i '/^\\[X-LiveUpdate\\]/,$d' /etc/systemd/system/luo-demo-cache.service && systemctl daemon-reload",
            check=True,
        )
        proc = self.c.sh(f"liveupdatectl kexec --kernel {GUEST_KERNEL}", timeout=120)
        demo = self.c.sh("systemctl is-active luo-demo-cache.service").stdout.strip()
        after = dict(json.loads(self.c.read_file("/run/luo-demo/status.json")))
        return {
            "exit_code": proc.returncode,
            "stderr": proc.stderr,
            "demo": demo,
            "same_process": after["pid"] == before["pid"],
            "luod": self.luod_status(),
            "system": self.c.system_state(),
        }

    def refused_target(self) -> dict[str, Any]:
        """A kernel of another LUO format: prepare and kexec refuse it; nothing is loaded, nothing stopped."""
        before = demo_status(self.c)
        prepare = self.c.sh(f"liveupdatectl prepare {OLD_KERNEL}", timeout=120)
        kexec = self.c.sh(f"liveupdatectl kexec --kernel {OLD_KERNEL}", timeout=120)
        after = dict(json.loads(self.c.read_file("/run/luo-demo/status.json")))
        return {
            "prepare": (prepare.returncode, prepare.stderr),
            "kexec": (kexec.returncode, kexec.stderr),
            "loaded": self.emulator.status()["kernel"],
            "demo": self.c.sh("systemctl is-active luo-demo-cache.service").stdout.strip(),
            "same_process": after["pid"] == before["pid"],
        }

    def add_sparse_unit(self) -> None:
        """A unit stores a sparse 1 TiB memfd (it costs nothing now; the preserve would fill it): the
        pre-flight's memory check fails."""
        self.c.write_file("/usr/local/bin/luo-sparse", SPARSE_SERVICE, mode=0o755)
        self.c.write_file("/etc/systemd/system/luo-sparse.service", SPARSE_UNIT)
        self.c.sh("systemctl daemon-reload && systemctl start luo-sparse.service", check=True, timeout=60)

    def refused_memory(self) -> dict[str, Any]:
        self.add_sparse_unit()
        demo_status(self.c)
        kexec = self.c.sh(f"liveupdatectl kexec --kernel {GUEST_KERNEL}", timeout=120)
        preflight = self.c.sh("liveupdatectl --json=short preflight", timeout=60)
        return {
            "kexec": (kexec.returncode, kexec.stderr),
            "preflight": json.loads(preflight.stdout),
            "active": self.c.sh("systemctl is-active luo-demo-cache.service luo-sparse.service").stdout.split(),
        }

    def blocked_shutdown(self) -> dict[str, Any]:
        """The old kernel loaded behind liveupdatectl's back: luod blocks shutdown through logind, giving the
        pre-flight's reason; systemctl reports it."""
        c = self.c
        c.sh(f"luo-emu load {OLD_KERNEL} --cmdline 'kho=on liveupdate=on'", check=True)
        listing = self.wait_inhibitors(lambda text: "luod" in text)
        checked = {verb: c.sh(f"systemctl --check-inhibitors=yes {verb}", timeout=60) for verb in ("kexec", "reboot")}
        if c.systemd_version is not None and c.systemd_version < 257:  # root goes through: it would reboot
            plain = None
        else:
            plain = c.sh("systemctl reboot", timeout=60)  # root, no tty: what a fleet tool runs
            time.sleep(2)
        still_running = c.running
        c.sh("luo-emu unload", check=True)  # what kexec -u is for a real kernel
        released = self.wait_inhibitors(lambda text: "luod" not in text)
        return {
            "inhibitors": listing,
            "checked": {verb: (p.returncode, p.stderr) for verb, p in checked.items()},
            "plain_reboot": None if plain is None else (plain.returncode, plain.stderr),
            "still_running": still_running,
            "released": "luod" not in released,
        }

    def wait_inhibitors(self, done: Callable[[str], bool], timeout: float = 40.0) -> str:
        """``systemd-inhibit --list`` once ``done`` says so (luod re-checks every 15 s)."""
        deadline = time.monotonic() + timeout
        listing = self.c.sh("systemd-inhibit --list --mode=block --no-pager").stdout
        while not done(listing) and time.monotonic() < deadline:
            time.sleep(1)
            listing = self.c.sh("systemd-inhibit --list --mode=block --no-pager").stdout
        return str(listing)

    def refused_signal(self) -> dict[str, Any]:
        """SIGRTMIN+6 with the old kernel loaded: luod refuses at the first stop hook and unloads the kernel, so
        the machine reboots instead of kexecing into a kernel that would not understand LUO's state."""
        c = self.c
        before = demo_status(c)
        c.sh(f"luo-emu load {OLD_KERNEL} --cmdline 'kho=on liveupdate=on'", check=True)
        c.sh(SIGRTMIN_6_TO_PID1, check=True)
        code = c.wait_exit(timeout=120)
        went_down = c.shutdown_kind()
        carried = self.emulator.status()
        c.boot()
        c.wait_running()
        after = demo_status(c)
        return {
            "exit": code,
            "went_down": went_down,
            "carried": carried["incoming"],
            "rebuilt": not after["restored"] and after["pid"] != before["pid"],
            "luod_log": journal(c, "luod.service", boot="-1"),
            "verify": c.sh("liveupdatectl verify").returncode,
        }

    def kill_agent(self) -> str:
        """SIGKILL luod after the demo stored its cache; systemd restarts it.  Returns what it logged."""
        demo_status(self.c)
        # The main process only: systemd 252 in a cgroup-v1 container can fail the cgroup-wide kill with EIO
        # ("auxiliary processes"), and luod's crash is the point, not its cgroup's.
        self.c.sh("systemctl kill --kill-who=main --signal=SIGKILL luod.service", check=True)
        self.c.sh("systemctl start luod.service", check=True, timeout=60)  # waits for the restart's READY=1
        return str(self.c.sh("journalctl -b --no-pager -o cat -u luod.service", timeout=30).stdout)


def run(suite: str, debs: list[Path], workdir: Path, trigger: str = "liveupdatectl") -> Outcome:
    with LiveUpdateBed(suite, debs, workdir) as bed:
        return bed.live_update(trigger)


def report(o: Outcome) -> str:
    b, a = o.before, o.after
    lines = [
        f"Live update of luo-demo-cache.service on systemd {o.systemd} ({o.suite}), triggered by {o.trigger}:",
        f"  before: {b['cache_bytes'] >> 20} MiB cache built in {b['ready'] - b['started']:.2f}s, "
        f"sha256 {b['sha256'][:16]}…, counter {b['counter']}",
        f"  kexec:  the emulator carried {o.carried['incoming']['sessions']} session(s) with "
        f"{o.carried['incoming']['files']} file(s) into the new boot",
        f"  after:  cache {'restored' if a['restored'] else 'REBUILT'} in {a['ready'] - a['started']:.2f}s, "
        f"sha256 {a['sha256'][:16]}… ({'identical' if a['sha256'] == b['sha256'] else 'DIFFERENT'}), "
        f"counter carried on from {a['counter_at_start']}, LIVEUPDATE_COUNT={a['live_update_count']}",
        f"  blackout (kexec request to service ready): {o.blackout_sec:.2f}s",
        f"  luod after: phase {o.status_after['phase']}, live updates {o.status_after['live_update_count']}",
        f"  verify: {o.verify['verdict']} (exit {o.verify_exit}), "
        f"{o.verify['RestoredUnitsCount']}/{o.verify['CarriedUnitsCount']} unit(s) have their fds back",
        *(f"  systemd warned: {w}" for w in o.unit_warnings),
        f"  result: {'PASS' if o.ok else 'FAIL'}",
    ]
    return "\n".join(lines)


def demo_arguments(doc: Optional[str], default_suite: str, argv: Optional[list[str]]) -> argparse.Namespace:
    """--suite, --trigger and the .debs, for this demo and the VM's (vm_update.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--suite", default=default_suite, choices=harness.SUITES)
    parser.add_argument("--trigger", default="liveupdatectl", choices=TRIGGERS)
    parser.add_argument("debs", nargs="+", type=Path)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = demo_arguments(__doc__, "bookworm", argv)
    with tempfile.TemporaryDirectory(prefix="luo-demo-") as tmp:
        outcome = run(args.suite, [d.resolve() for d in args.debs], Path(tmp), args.trigger)
    print(report(outcome))
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
