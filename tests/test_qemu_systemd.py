"""A real live update under systemd as PID 1: the LUO kernel booted in qemu (TCG) from a Debian disk image
(systemd 252, 257 and 262) with the project's luo-systemd package installed; the demo service survives real
in-guest kexecs (liveupdatectl kexec; liveupdatectl prepare then plain systemctl kexec; on 262 prepare then plain
systemctl reboot), liveupdatectl verify says so after each, and on 262 a second kernel build of another LUO format
(luo-v6) is refused by the pre-flight, then kexeced into with --force for the record.  tests/qemu/run-systemd.sh
does the work; see tests/qemu/README.md.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.test_qemu import QEMU, why_not

pytestmark = [
    pytest.mark.slow,
    pytest.mark.kernel,
    pytest.mark.skipif(bool(why_not()), reason=f"skipped because {why_not()}"),
]


def run_systemd(suite: str) -> str:
    proc = subprocess.run(
        [str(QEMU / "run-systemd.sh"), suite], capture_output=True, text=True, timeout=3600, check=False
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    return proc.stdout


def check_summary(out: str, triggers: list[str], native: bool) -> None:
    assert re.search(r"^RESULT PASS$", out, re.M), out
    assert ", 0 failed" in out, out
    rows = re.findall(r"^BLACKOUT update=(\d) trigger=(\S+) unit=(\S+) host=([\d.]+)s", out, re.M)
    assert {(n, t) for n, t, u, _ in rows if u == "demo"} == {(str(i), t) for i, t in enumerate(triggers, 1)}, out
    if native:
        assert {n for n, t, u, _ in rows if u == "native"} == {str(i) for i in range(1, len(triggers) + 1)}, out
    verified = re.findall(r"liveupdatectl verify: (\S+) \(exit (\d+)\), 1/1 unit\(s\) have their fds back", out)
    assert verified == [("ok", "0")] * len(triggers), out


def test_live_update_bookworm() -> None:
    """systemd 252: luod carries the demo's memfd across both kexecs."""
    check_summary(run_systemd("bookworm"), ["liveupdatectl", "systemctl-kexec"], native=False)


def test_live_update_trixie() -> None:
    """systemd 257 (Debian 13, RHEL 10): luod carries the demo's memfd across both kexecs."""
    check_summary(run_systemd("trixie"), ["liveupdatectl", "systemctl-kexec"], native=False)


@pytest.mark.skipif(
    os.environ.get("LUO_QEMU_VM") != "1",
    reason="skipped because it takes about 30 minutes on 2 cores (QEMU nested under TCG); LUO_QEMU_VM=1 runs it",
)
def test_a_vm_carries_on_across_real_kexecs_sid() -> None:
    """systemd 262 with QEMU: luo-qemu@demo.service's guest (nested TCG) keeps running across both kexecs."""
    out = run_systemd("sid-qemu")
    check_summary(out, ["liveupdatectl", "systemctl-kexec"], native=True)
    rows = re.findall(r"VM guest: boot id (\S+) -> (\S+), .*, 16 MiB sha256 (\S+)", out)
    assert len(rows) == 2 and all(b == a and s == "identical" for b, a, s in rows), out
    assert len(re.findall(r"VM: RAM 134217728 bytes kept", out)) == 2, out


def test_live_update_sid() -> None:
    """systemd 262: the demo through luod and a native fd-store service through systemd's own LUO support;
    a plain systemctl reboot after prepare is a live update; a kernel of another LUO format is refused."""
    out = run_systemd("sid")
    check_summary(out, ["liveupdatectl", "systemctl-kexec", "systemctl-reboot"], native=True)
    assert re.search(r"mismatch: liveupdatectl prepare luo-v6 kernel -> exit 3: .*target kernel luo-v6", out, re.S), out
    assert "forced: liveupdatectl kexec --force into the luo-v6 kernel" in out, out
    assert re.search(r"forced kernel: .*LUO state is incompatible", out), (
        "for the record: what luo-v6 does with v5 state"
    )
