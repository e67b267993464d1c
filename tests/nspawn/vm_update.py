"""A virtual machine kept running across a live update: luo-qemu@demo.service, in a container, on the emulator.

The container is build-qemu-rootfs.sh's tree (a Debian root file system with QEMU) with the project's
packages installed.  The VM is demo/vm/guest.S under TCG with 128 MiB of RAM: a boot sector that keeps a boot
id, a counter and its uptime in guest RAM and fills 16 MiB with data derived from the boot id;
demo/vm/luo-vm-probe reads them over QMP.

  boot 1: luo-qemu@demo.service boots the guest (guest RAM in a memfd held by luod)
          liveupdatectl kexec (or kexec.target) -> luo-qemu stop: cpr-reboot into the state memfd, quit;
          luo-hook stop preserves both memfds; the emulator carries them
  boot 2: luo-qemu start: QEMU on the same RAM with -incoming defer, migrate-incoming; the guest carries on

``python3 -m tests.nspawn.vm_update --suite trixie DEBS...`` prints the before/after (scripts/demo.sh vm).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from tests.nspawn import harness
from tests.nspawn.live_update import GUEST_KERNEL, LiveUpdateBed, demo_arguments, journal

TOP = Path(__file__).resolve().parent.parent.parent
VM_DEMO = TOP / "demo" / "vm"
VM = "demo"
UNIT = f"luo-qemu@{VM}.service"
SERIAL = f"/var/log/luo-qemu-{VM}.serial"  # as in demo/vm/demo.toml


def qemu_rootfs(suite: str) -> Path:
    """SUITE's root file system with QEMU (built once, cached)."""
    subprocess.run([str(TOP / "tests" / "nspawn" / "build-qemu-rootfs.sh"), suite], check=True, capture_output=True)
    return harness.rootfs_path(f"{suite}-qemu")


def guest_image(directory: Path) -> Path:
    image = directory / "guest.img"
    subprocess.run([str(VM_DEMO / "build-guest.sh"), str(image)], check=True)
    return image


def vm_config(machine: str) -> str:
    return (VM_DEMO / "demo.toml").read_text().replace("@MACHINE@", machine)


def versioned_q35(c: harness.Container) -> str:
    """The versioned machine type that 'q35' stands for in the container's QEMU (pc-q35-10.0, ...)."""
    out = c.sh("qemu-system-x86_64 -machine help", check=True).stdout
    m = re.search(r"^q35\s.*\(alias of (pc-q35-[0-9.]+)\)", out, re.MULTILINE)
    if not m:
        raise harness.HarnessError(f"no versioned q35 machine type in:\n{out}")
    return m.group(1)


@dataclasses.dataclass
class VmOutcome:
    suite: str
    systemd: str
    qemu: str
    trigger: str
    before: dict[str, Any]
    after: dict[str, Any]
    figures: dict[str, Any]  # /var/lib/luo-qemu/demo.json: the save (old boot) and the restore (new boot)
    kexec_requested: float
    container_down: float
    boots: int  # "booted" lines of the guest on its serial port, in all
    finished: bool
    unit: dict[str, float]  # "started": when systemd started the unit (wall clock)

    @property
    def save(self) -> dict[str, Any]:
        return dict(self.figures.get("save", {}))

    @property
    def restore(self) -> dict[str, Any]:
        return dict(self.figures.get("restore", {}))

    @property
    def vm_pause_sec(self) -> float:
        """QEMU stopped the guest (the save began) -> the guest runs in the new QEMU."""
        return float(self.restore["running"] - self.save["paused"])

    @property
    def vm_share_sec(self) -> float:
        """The VM's own part of the pause: the save and quit, and the restore from the unit's start in the new
        boot (systemd's exec, the launcher's interpreter, QEMU's start, the load)."""
        restore = self.restore["running"] - restore_start(self.unit, self.restore)
        return float(self.save["exited"] - self.save["paused"] + restore)

    @property
    def ok(self) -> bool:
        b, a = self.before, self.after
        return bool(
            self.restore
            and a["boot_id"] == b["boot_id"]
            and a["region_sha256"] == b["region_sha256"]
            and a["counter"] > b["counter"]
            and a["uptime_sec"] > b["uptime_sec"]
            and a["status"] == "running"
            and self.restore["state_bytes"] * 10 < self.save["ram_bytes"]
            and self.boots == 1
            and self.finished
        )


class VmBed(LiveUpdateBed):
    """A booted container with QEMU, the packages, and luo-qemu@demo.service running the demo guest."""

    journal_units = ("luod.service", UNIT)

    def __init__(self, suite: str, debs: list[Path], workdir: Path) -> None:
        super().__init__(suite, debs, workdir, rootfs=qemu_rootfs(suite))
        self.image = guest_image(workdir)

    def __enter__(self) -> VmBed:
        super().__enter__()
        try:
            c = self.c
            # The demo cache would compete for the two CPUs in the blackout: the VM's figures are the point.
            c.sh("systemctl disable --now luo-demo-cache.service", check=True)
            c.write_file(f"/var/lib/luo-qemu/{VM}.img", self.image.read_bytes())
            c.write_file(f"/etc/luo-qemu/{VM}.toml", vm_config(versioned_q35(c)))
            c.write_file("/usr/local/bin/luo-vm-probe", (VM_DEMO / "luo-vm-probe").read_text(), mode=0o755)
            c.sh(f"systemctl enable {UNIT} && systemctl start {UNIT}", check=True, timeout=120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def probe(self) -> dict[str, Any]:
        proc = self.c.sh(f"luo-vm-probe {VM}", timeout=120)
        if proc.returncode != 0:
            raise harness.HarnessError(f"luo-vm-probe failed: {proc.stdout} {proc.stderr}")
        return dict(json.loads(proc.stdout))

    def qemu_version(self) -> str:
        return str(self.c.sh("dpkg-query -W -f='${Version}' qemu-system-x86", check=True).stdout)

    def vm_update(self, trigger: str = "liveupdatectl") -> VmOutcome:
        c = self.c
        self.probe()  # the guest has booted
        time.sleep(1.0)  # let the counter and the uptime move, so that carrying on is visible
        before = self.probe()
        start = time.time()
        down = self.kexec(trigger, timeout=180)
        c.boot()
        c.wait_running(timeout=120)
        c.sh(f"systemctl start {UNIT}", check=True, timeout=120)
        unit = self.unit_times()
        after = self.probe()
        figures = json.loads(c.read_file(f"/var/lib/luo-qemu/{VM}.json"))
        boots = c.read_file(SERIAL).count("luo-vm-guest: booted")
        status = self.luod_status()
        return VmOutcome(
            self.suite,
            str(c.systemd_version),
            self.qemu_version(),
            trigger,
            before,
            after,
            figures,
            start,
            down,
            boots,
            status["phase"] == "idle",
            unit,
        )

    def unit_times(self) -> dict[str, float]:
        """When the unit's last start began, and when luod last became ready (READY=1): systemd's monotonic
        timestamps (microseconds; the container shares the host's CLOCK_MONOTONIC) turned into wall-clock
        time.  (Not ExecMainStartTimestamp: MAINPID= moves it to QEMU's start.)"""
        offset = time.time() - time.monotonic()
        unit = self.c.sh(f"systemctl show -P InactiveExitTimestampMonotonic {UNIT}", check=True).stdout
        luod = self.c.sh("systemctl show -P ActiveEnterTimestampMonotonic luod.service", check=True).stdout
        return {"started": int(unit) / 1e6 + offset, "luod_ready": int(luod) / 1e6 + offset}

    def refused_update(self) -> dict[str, Any]:
        """liveupdatectl kexec with a QEMU that cannot keep the guest (bookworm's 7.2): refused, nothing stops."""
        c = self.c
        before = self.probe()
        pid = c.sh(f"systemctl show -P MainPID {UNIT}", check=True).stdout.strip()
        proc = c.sh(f"liveupdatectl kexec --kernel {GUEST_KERNEL}", timeout=120)
        after = self.probe()
        return {
            "exit_code": proc.returncode,
            "stderr": proc.stderr,
            "vm": c.sh(f"systemctl is-active {UNIT}").stdout.strip(),
            "same_qemu": c.sh(f"systemctl show -P MainPID {UNIT}", check=True).stdout.strip() == pid,
            "same_guest": after["boot_id"] == before["boot_id"] and after["counter"] > before["counter"],
            "luod": self.luod_status(),
        }


def restore_start(unit: dict[str, float], restore: dict[str, Any]) -> float:
    """When the VM's part of the restore began: the unit's start, or the launcher's process start if that came
    first (without ExecStartPre= systemd marks the unit started only once it has spawned ExecStart=), but not
    before luod's READY=1: the unit (Restore=early) starts while luod restores, which is the host's boot."""
    return max(min(unit["started"], restore["process_started"]), unit["luod_ready"])


def restore_steps(unit: dict[str, float], restore: dict[str, Any]) -> list[tuple[str, float, float]]:
    """The restore's steps from ``restore_start``: (what, from, to), wall clock; what was done while luod
    restored counts 0 (the memfds' Store overlaps QEMU's start).  The launcher's fork has the 10 ms
    resolution of /proc's start times."""
    r, start = restore, restore_start(unit, restore)
    steps = [
        (
            "systemd: unit start -> launcher forked (10 ms ticks)",
            min(unit["started"], r["process_started"]),
            r["process_started"],
        ),
        ("systemd's exec, Python and imports", r["process_started"], r["started"]),
        ("luod Retrieve", r["started"], r["retrieved"]),
        ("QEMU spawned", r["retrieved"], r["qemu_spawned"]),
        ("  (memfds stored in luod meanwhile)", r["qemu_spawned"], r["stored"]),
        ("QEMU up (its QMP greeting)", r["qemu_spawned"], r["qmp_ready"]),
        ("state loaded and guest running", r["qmp_ready"], r["running"]),
    ]
    return [(label, max(a, start), max(b, start)) for label, a, b in steps]


def report(o: VmOutcome) -> str:
    b, a, s, r, u = o.before, o.after, o.save, o.restore, o.unit
    ms = 1000.0
    lines = [
        f"Live update of {UNIT} on systemd {o.systemd} ({o.suite}), QEMU {o.qemu}, triggered by {o.trigger}:",
        f"  before: guest boot id {b['boot_id']}, uptime {b['uptime_sec']:.1f}s, counter {b['counter']}, "
        f"16 MiB region sha256 {b['region_sha256'][:16]}…",
        f"  after:  guest boot id {a['boot_id']} ({'same' if a['boot_id'] == b['boot_id'] else 'REBOOTED'}), "
        f"uptime {a['uptime_sec']:.1f}s, counter {a['counter']}, region sha256 {a['region_sha256'][:16]}… "
        f"({'identical' if a['region_sha256'] == b['region_sha256'] else 'DIFFERENT'}), "
        f"booted {o.boots} time(s) in all",
    ]
    if s and r:
        lines += [
            f"  memory: guest RAM {s['ram_bytes']} bytes kept in place; device state {r['state_bytes']} bytes "
            f"({100.0 * r['state_bytes'] / s['ram_bytes']:.2f} % of RAM)",
            f"  VM pause (QEMU stopped the guest -> guest running again): {o.vm_pause_sec:.2f}s",
            f"    the VM's own share: save+quit {(s['exited'] - s['paused']) * ms:.0f} ms, "
            f"restore (unit started, luod ready -> guest running) {(r['running'] - restore_start(u, r)) * ms:.0f} ms, "
            f"together {o.vm_share_sec * ms:.0f} ms",
            "      restore steps: "
            + ", ".join(f"{label} {(b - a) * ms:.0f} ms" for label, a, b in restore_steps(u, r)),
            f"    the host's: kexec request -> container down {o.container_down - o.kexec_requested:.2f}s, "
            f"QEMU gone -> unit started and luod ready in the new boot {restore_start(u, r) - s['exited']:.2f}s",
        ]
    else:
        lines.append(f"  no save/restore figures: {o.figures}")
    lines.append(f"  result: {'PASS' if o.ok else 'FAIL'}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = demo_arguments(__doc__, "trixie", argv)
    with (
        tempfile.TemporaryDirectory(prefix="luo-vm-demo-") as tmp,
        VmBed(args.suite, [d.resolve() for d in args.debs], Path(tmp)) as bed,
    ):
        outcome = bed.vm_update(args.trigger)
        if not outcome.ok:  # what the VM and luod said, in both boots
            for boot in ("-1", "0"):
                print(journal(bed.c, *bed.journal_units, boot=boot), file=sys.stderr)
    print(report(outcome))
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
