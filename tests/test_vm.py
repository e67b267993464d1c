"""luo-qemu: a QEMU virtual machine kept running across a live update.

The pure parts (configuration, QEMU's command line, the checks that tell a live update from a copy) here
directly; the whole thing in nspawn containers with QEMU (tests/nspawn/vm_update.py): trixie (systemd 257,
QEMU 10.0) and sid (262, QEMU 11.x) live-update a running guest, bookworm (252, QEMU 7.2: no cpr-reboot) is
refused by the pre-flight.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luo_systemd import agent, vm
from luo_systemd.errors import InvalidRequest, VmmFailed
from luo_systemd.kexec_watch import kexec_job_listed
from tests.nspawn import harness
from tests.nspawn.vm_update import UNIT, VmBed, VmOutcome, report

OK, WHY = harness.available()

GOOD: dict[str, Any] = {"machine": "pc-q35-10.0", "memory_mib": 128, "args": ["-accel", "tcg", "-nodefaults"]}


def test_config_is_checked_key_by_key() -> None:
    cfg = vm.parse_config("web", GOOD)
    assert (cfg.machine, cfg.memory_bytes, cfg.args) == ("pc-q35-10.0", 128 << 20, ("-accel", "tcg", "-nodefaults"))
    bad = [
        ({**GOOD, "machine": "q35"}, "versioned machine type"),
        ({**GOOD, "memory_mib": "128"}, "memory_mib"),
        ({**GOOD, "memory_mib": 0}, "memory_mib"),
        ({**GOOD, "args": ["-m", "1G"]}, "may not contain -m"),
        ({**GOOD, "args": ["-object", "memory-backend-ram,id=r,size=1G"]}, "memory-backend-ram"),
        ({**GOOD, "args": ["-device", "loader,file=x"]}, "-device loader"),
        ({**GOOD, "qemu": "qemu-system-x86_64"}, "absolute path"),
        ({**GOOD, "ram": 1}, "unknown setting 'ram'"),
    ]
    for doc, message in bad:
        with pytest.raises(InvalidRequest, match=message):
            vm.parse_config("web", doc)


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "web.toml").write_text('machine = "pc-q35-10.0"\nmemory_mib = [\n')
    with pytest.raises(InvalidRequest, match=r"web\.toml"):
        vm.load_config("web", str(tmp_path))
    with pytest.raises(InvalidRequest, match=r"nothing\.toml"):
        vm.load_config("nothing", str(tmp_path))


def test_qemu_argv_keeps_ram_in_a_shared_file_and_adds_incoming_only_to_resume() -> None:
    cfg = vm.parse_config("web", GOOD)
    cold = vm.qemu_argv(cfg, 7, 8, None, "/run/luo-qemu/web/qmp.sock")
    assert "memory-backend-file,id=ram0,size=128M,mem-path=/proc/self/fd/7,share=on" in cold
    assert "pc-q35-10.0,memory-backend=ram0" in cold and "-incoming" not in cold
    resume = vm.qemu_argv(cfg, 7, 8, 9, "/run/luo-qemu/web/qmp.sock")
    assert resume[: len(cold)] == cold, "the same command line on both sides"
    assert resume[len(cold) :] == ["-add-fd", "fd=9,set=2,opaque=restored-vm-state", "-incoming", "defer"]


def test_a_copy_of_the_ram_is_no_live_update() -> None:
    ram = 128 << 20
    assert not vm.ram_was_copied({"ram": {"total": 532480}}, ram)
    assert vm.ram_was_copied({"ram": {"total": ram + 532480}}, ram)


def test_a_live_updated_vm_whose_memory_did_not_arrive_is_not_booted_over(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = vm.parse_config("web", GOOD)
    ram = os.memfd_create("guest-ram")
    os.ftruncate(ram, cfg.memory_bytes)
    try:
        monkeypatch.delenv("LIVEUPDATE_RESTORED", raising=False)
        assert not vm.restorable(cfg, -1, -1)  # an ordinary start boots
        monkeypatch.setenv("LIVEUPDATE_RESTORED", "1")
        for got_ram, got_state in ((-1, -1), (ram, -1), (-1, ram)):
            with pytest.raises(VmmFailed, match="not booting over it"):
                vm.restorable(cfg, got_ram, got_state)
    finally:
        os.close(ram)


def test_cpr_support_from_the_migration_parameters() -> None:
    version = {"qemu": {"major": 7, "minor": 2, "micro": 19}}
    assert vm.cpr_support({"mode": "normal", "downtime-limit": 300}, version) == ""
    assert "QEMU 7.2.19 cannot keep the guest" in vm.cpr_support({"downtime-limit": 300}, version)


def test_instance_names() -> None:
    assert vm.instance_of("luo-qemu@web-1.service") == "web-1"
    for unit in ("luo-qemu.service", "qemu@web.service", "luo-qemu@.service", "luo-qemu@a/b.service"):
        with pytest.raises(InvalidRequest):
            vm.instance_of(unit)


def test_inhibitors_make_the_preflight_refuse(tmp_path: Path) -> None:
    check = agent.inhibitor_check(str(tmp_path / "inhibit"))
    assert check() == []
    (tmp_path / "inhibit").mkdir()
    (tmp_path / "inhibit" / "luo-qemu@web.service").write_text("QEMU 7.2.19 cannot keep the guest\n")
    (tmp_path / "inhibit" / "not a unit").write_text("ignored")
    (tmp_path / "inhibit" / "big.service").write_bytes(b"x" * 100_000)
    os.symlink("/etc/passwd", tmp_path / "inhibit" / "link.service")
    os.mkfifo(tmp_path / "inhibit" / "fifo.service")
    problems = check()
    assert [(p.unit, p.message) for p in problems] == [
        ("big.service", "x" * agent.MAX_REASON),
        ("luo-qemu@web.service", "QEMU 7.2.19 cannot keep the guest"),
    ]


def test_kexec_job_listing() -> None:
    assert kexec_job_listed("42 kexec.target start waiting\n")
    assert not kexec_job_listed("42 reboot.target start waiting\n")
    assert not kexec_job_listed("")


# -- in containers


@pytest.fixture
def bed(request: pytest.FixtureRequest, debs: list[Path], tmp_path: Path) -> Iterator[VmBed]:
    with VmBed(request.param, debs, tmp_path) as testbed:
        yield testbed


def check(outcome: VmOutcome) -> None:
    print("\n" + report(outcome))
    b, a = outcome.before, outcome.after
    assert a["boot_id"] == b["boot_id"], "the guest was not rebooted"
    assert a["region_sha256"] == b["region_sha256"], "guest memory came back identical"
    assert a["counter"] > b["counter"] and a["uptime_sec"] > b["uptime_sec"], "the guest carried on"
    assert a["status"] == "running"
    assert outcome.boots == 1, "the guest printed its boot line once: at the first boot only"
    assert outcome.save["ram_copied_bytes"] < outcome.save["ram_bytes"] // 16, "QEMU did not copy the guest RAM"
    assert outcome.restore["state_bytes"] < outcome.save["ram_bytes"] // 16, "the state is a small fraction of RAM"
    assert outcome.finished
    assert outcome.ok


@pytest.mark.slow
@pytest.mark.skipif(not OK, reason=f"skipped because {WHY}")
@pytest.mark.parametrize("bed", ["trixie", "sid"], indirect=True)
def test_the_guest_carries_on_across_two_live_updates(bed: VmBed) -> None:
    """liveupdatectl kexec, then a kexec that systemd starts by itself (kexec.target)."""
    check(bed.vm_update("liveupdatectl"))
    check(bed.vm_update("kexec.target"))
    # An ordinary restart is a fresh boot: nothing restored is used again.
    before = bed.probe()
    bed.c.sh(f"systemctl restart {UNIT}", check=True, timeout=120)
    after = bed.probe()
    assert after["boot_id"] != before["boot_id"] and after["counter"] < before["counter"]


@pytest.mark.slow
@pytest.mark.skipif(not OK, reason=f"skipped because {WHY}")
@pytest.mark.parametrize("bed", ["bookworm"], indirect=True)
def test_a_qemu_without_cpr_reboot_is_refused_before_anything_stops(bed: VmBed) -> None:
    refused = bed.refused_update()
    assert refused["exit_code"] == 3, refused
    assert "nothing was stopped" in refused["stderr"]
    assert f"{UNIT}: QEMU 7.2" in refused["stderr"] and "no cpr-reboot" in refused["stderr"], refused["stderr"]
    assert refused["vm"] == "active" and refused["same_qemu"] and refused["same_guest"], refused
    assert refused["luod"]["phase"] == "idle"
