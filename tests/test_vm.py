"""luo-qemu: a QEMU virtual machine kept running across a live update.

The pure parts (configuration, QEMU's command line, the checks that tell a live update from a copy) here
directly; the whole thing in nspawn containers with QEMU (tests/nspawn/vm_update.py): trixie (systemd 257,
QEMU 10.0) and sid (262, QEMU 11.x) live-update a running guest, bookworm (252, QEMU 7.2: no cpr-reboot) is
refused by the pre-flight.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from luo_systemd import agent, vm, vmconfig
from luo_systemd.errors import AgentUnavailable, InvalidRequest, VmmFailed
from luo_systemd.kexec_watch import kexec_job_listed
from luo_systemd.qmp import Qmp
from tests.nspawn import harness
from tests.nspawn.vm_update import UNIT, VmBed, VmOutcome, report

OK, WHY = harness.available()

GOOD: dict[str, Any] = {"machine": "pc-q35-10.0", "memory_mib": 128, "args": ["-accel", "tcg", "-nodefaults"]}


def test_config_is_checked_key_by_key() -> None:
    cfg = vmconfig.parse_config("web", GOOD)
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
        ({**GOOD, "args": ["-name", "a\0b"]}, "without NUL"),
    ]
    for doc, message in bad:
        with pytest.raises(InvalidRequest, match=message):
            vmconfig.parse_config("web", doc)


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "web.toml").write_text('machine = "pc-q35-10.0"\nmemory_mib = [\n')
    with pytest.raises(InvalidRequest, match=r"web\.toml"):
        vmconfig.load_config("web", str(tmp_path))
    with pytest.raises(InvalidRequest, match=r"nothing\.toml"):
        vmconfig.load_config("nothing", str(tmp_path))


def test_qemu_argv_keeps_ram_in_a_shared_file_and_adds_incoming_only_to_resume() -> None:
    launch = vm.Launch.of(vmconfig.parse_config("web", GOOD))
    cold = vm.qemu_argv(launch, 7, 8, None, 6)
    assert "memory-backend-file,id=ram0,size=128M,mem-path=/proc/self/fd/7,share=on" in cold
    assert "pc-q35-10.0,memory-backend=ram0" in cold and "-incoming" not in cold
    assert "socket,id=luo-qmp,fd=6,server=on,wait=off" in cold
    resume = vm.qemu_argv(launch, 7, 8, 9, 6)
    assert resume[: len(cold)] == cold, "the same command line on both sides"
    assert resume[len(cold) :] == ["-add-fd", "fd=9,set=2,opaque=restored-vm-state", "-incoming", "defer"]


def test_the_command_line_travels_in_vm_args() -> None:
    launch = vm.Launch.of(vmconfig.parse_config("web", {**GOOD, "args": ["-drive", "file=a b,if=ide", ""]}))
    back = vm.Launch.decode("web", launch.encode())
    assert vm.qemu_argv(back, 7, 8, 9, 6) == vm.qemu_argv(launch, 7, 8, 9, 6)
    for garbage in (b"", b"qemu\0pc-q35-10.0\0128", b"/usr/bin/qemu\0pc-q35-10.0\0lots"):
        with pytest.raises(VmmFailed, match="not a QEMU command line"):
            vm.Launch.decode("web", garbage)


def test_a_copy_of_the_ram_is_no_live_update() -> None:
    ram = 128 << 20
    assert not vm.ram_was_copied({"ram": {"total": 532480}}, ram)
    assert vm.ram_was_copied({"ram": {"total": ram + 532480}}, ram)
    assert vm.resumable(ram, ram, 292480)
    assert not vm.resumable(ram, ram, 0), "the stop did not save: a fresh boot"
    with pytest.raises(VmmFailed, match="holds a copy of the guest RAM"):
        vm.resumable(ram, ram, ram + 292480)
    with pytest.raises(VmmFailed, match="smaller than memory_mib=128"):
        vm.resumable(ram, ram // 2, 292480)


def test_a_live_updated_vm_whose_memory_does_not_come_is_not_booted_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUOD_SOCKET", "/nonexistent/luod.sock")
    monkeypatch.setattr(vm, "boot", lambda *_: pytest.fail("booted over a live-updated guest"))
    with pytest.raises(AgentUnavailable):
        vm.start("luo-qemu@web.service")


class RestoredByLuod:
    """varlink.Client as luo-qemu's start sees it: luod's answer to Retrieve without names."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.fds = [os.memfd_create(name) for name in names]

    def __call__(self, *_: object, **__: object) -> RestoredByLuod:
        return self

    def __enter__(self) -> RestoredByLuod:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def call(self, method: str, parameters: Any = None) -> tuple[dict[str, Any], list[int]]:
        assert method == "Retrieve" and not parameters, "all that was restored, whatever it is"
        return {"names": self.names}, self.fds

    def closed(self) -> bool:
        return all(not os.path.exists(f"/proc/self/fd/{fd}") for fd in self.fds)


def test_a_start_asks_luod_what_was_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restore=early: LIVEUPDATE_RESTORED may not be set yet; luod's answer decides."""
    monkeypatch.delenv("LIVEUPDATE_RESTORED", raising=False)
    nothing = RestoredByLuod([])
    monkeypatch.setattr(vm.varlink, "Client", nothing)
    monkeypatch.setattr(vm, "boot", lambda unit, name: f"booted {name}")
    assert vm.start("luo-qemu@web.service") == "booted web"

    partial = RestoredByLuod([vm.RAM, vm.ARGS])
    monkeypatch.setattr(vm.varlink, "Client", partial)
    monkeypatch.setattr(vm, "boot", lambda *_: pytest.fail("booted over a live-updated guest"))
    with pytest.raises(VmmFailed, match=r"restored guest-ram vm-args for luo-qemu@web\.service, not "):
        vm.start("luo-qemu@web.service")
    assert partial.closed()


def test_qmp_commands_go_ahead_of_the_greeting_and_events_are_kept() -> None:
    """The client's side of the pipelined restore (the nspawn tests run it against QEMU itself)."""
    ours, qemu = socket.socketpair()
    with ours, qemu:
        qemu.settimeout(5)
        qemu.sendall(
            b'{"QMP": {"version": {}}}\n{"return": {}}\n{"event": "RESUME"}\n'
            b'{"error": {"class": "GenericError", "desc": "no"}}\n{"return": {"status": "completed"}}\n'
        )
        qmp = Qmp(ours, (("migrate-incoming", {"uri": "file:/dev/fdset/2"}),))
        sent = [json.loads(line)["execute"] for line in qemu.recv(4096).decode().splitlines()]
        assert sent == ["qmp_capabilities", "migrate-incoming"]
        with pytest.raises(VmmFailed, match="QEMU refused migrate-incoming: no"):
            qmp.reply("migrate-incoming")
        assert qmp.event(("RESUME",)) == {"event": "RESUME"}, "an event that came before a reply is kept"
        assert qmp.reply("query-migrate") == {"status": "completed"}
        qemu.close()
        with pytest.raises(VmmFailed, match="closed the QMP connection"):
            qmp.event(("RESUME",))


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
