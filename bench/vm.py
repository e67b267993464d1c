"""The VM's share of a live update's blackout against a bare QEMU restart of the same guest, measured in the
same run (README, "Tests").

    .venv/bin/python bench/vm.py [--suites trixie,sid] [--rounds 4] [--bare 3] $(packaging/build-deb.sh --no-lintian)

One container per suite (tests/nspawn/vm_update.py's VmBed: luo-qemu@demo.service with the demo guest, on the
emulator).  Each round, in that container:
- a live update of luo-qemu@demo.service (``liveupdatectl kexec``); the VM's share of its blackout is the save
  and quit plus the restore from the unit's start in the new boot, or luod's READY=1 if that came later (the
  unit has Restore=early: it starts while luod restores), to the guest running (systemd's exec, the launcher,
  luod's answer, QEMU's start, the load): the host's kexec and boot are left out;
- ``--bare`` restarts of a second guest of the same configuration without systemd, luod or a kexec
  (bench/vm_restart.py: luo-qemu's own command line and QMP steps, the RAM memfd held by that process): the
  same save and quit, then at once a new QEMU on the same RAM loading the state.
Per suite: every figure, the medians, and their ratio.  Nothing asserts; a live update whose guest did not carry
on is reported (with the unit's and luod's journal) and counted.  Needs root and the nspawn tier's root file
systems (tests/nspawn/build-qemu-rootfs.sh), like tests/test_vm.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP)]

from tests.nspawn.live_update import journal  # noqa: E402
from tests.nspawn.vm_update import VM, VmBed, VmOutcome, report, restore_start, restore_steps  # noqa: E402

BARE = "bench"  # the second guest: /etc/luo-qemu/bench.toml, its own disk image and serial port


def bare_restarts(bed: VmBed, count: int) -> list[dict[str, float]]:
    c = bed.c
    rows = [
        json.loads(line)
        for line in c.sh(f"python3 /root/vm_restart.py {BARE} {count}", check=True, timeout=300).stdout.splitlines()
    ]
    boots = rows.pop()["boots"]
    if boots != 1:
        print(f"  bare restart: the guest booted {boots} times (it should once)", flush=True)
    return rows


def ms(values: list[float]) -> str:
    low, high = min(values) * 1000, max(values) * 1000
    return f"{statistics.median(values) * 1000:6.0f} ms (of {len(values)}: {low:.0f}-{high:.0f})"


def suite_run(suite: str, packages: list[Path], rounds: int, bare: int) -> tuple[int, int]:
    """The rounds in one container; (live updates whose guest carried on, live updates)."""
    outcomes: list[VmOutcome] = []
    restarts: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix=f"luo-bench-vm-{suite}-") as tmp, VmBed(suite, packages, Path(tmp)) as bed:
        c = bed.c
        c.write_file("/root/vm_restart.py", (TOP / "bench" / "vm_restart.py").read_text())
        config = c.read_file(f"/etc/luo-qemu/{VM}.toml").replace(f"luo-qemu/{VM}.img", f"luo-qemu/{BARE}.img")
        c.write_file(f"/etc/luo-qemu/{BARE}.toml", config.replace(f"luo-qemu-{VM}.serial", f"luo-qemu-{BARE}.serial"))
        c.sh(f"cp /var/lib/luo-qemu/{VM}.img /var/lib/luo-qemu/{BARE}.img", check=True)
        for i in range(rounds):
            outcome = bed.vm_update("liveupdatectl")
            outcomes.append(outcome)
            print(f"[{suite} round {i + 1}/{rounds}]\n{report(outcome)}", flush=True)
            if not outcome.ok:
                for boot in ("-1", "0"):
                    print(journal(c, *bed.journal_units, boot=boot), flush=True)
            got = bare_restarts(bed, bare)
            restarts += got
            print(
                "  bare restarts (save+quit, restart, total ms): "
                + "; ".join(
                    f"{r['save_quit'] * 1000:.0f}, {r['restart'] * 1000:.0f}, {r['total'] * 1000:.0f}" for r in got
                ),
                flush=True,
            )
    good = [o for o in outcomes if o.ok]
    first = outcomes[0]
    print(f"\n== {suite}: systemd {first.systemd}, QEMU {first.qemu}: ", end="")
    print(f"{len(good)} of {len(outcomes)} live updates carried the guest on")
    if good:
        steps: dict[str, list[float]] = {}
        for o in good:
            for label, a, b in restore_steps(o.unit, o.restore):
                steps.setdefault(label, []).append(b - a)
        share = [o.vm_share_sec for o in good]
        print(f"  luo-qemu, the VM's share:   {ms(share)}")
        print(f"    save+quit                 {ms([o.save['exited'] - o.save['paused'] for o in good])}")
        restores = [o.restore["running"] - restore_start(o.unit, o.restore) for o in good]
        print(f"    restore, from unit start and luod ready {ms(restores)}")
        for label, values in steps.items():
            print(f"      {label:<50} {ms(values)}")
        print(f"  bare QEMU restart:          {ms([r['total'] for r in restarts])}")
        print(f"    save+quit                 {ms([r['save_quit'] for r in restarts])}")
        print(f"    new QEMU -> running       {ms([r['restart'] for r in restarts])}")
        ratio = statistics.median(share) / statistics.median([r["total"] for r in restarts])
        print(f"  ratio (medians), luo-qemu / bare: {ratio:.2f}", flush=True)
    return len(good), len(outcomes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--suites", default="trixie,sid")
    parser.add_argument("--rounds", type=int, default=4, help="live updates per suite")
    parser.add_argument("--bare", type=int, default=3, help="bare restarts after each live update")
    parser.add_argument("debs", nargs="+", type=Path, help="the project's .debs (packaging/build-deb.sh)")
    args = parser.parse_args()
    packages = [d.resolve() for d in args.debs]
    results: dict[str, Any] = {}
    for suite in args.suites.split(","):
        results[suite] = suite_run(suite, packages, args.rounds, args.bare)
    print("\n" + ", ".join(f"{s}: {g} of {n} live updates carried the guest on" for s, (g, n) in results.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
