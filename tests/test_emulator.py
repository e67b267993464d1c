"""What only the emulator has: its kexec triggers, its limits, and its memory use."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys

import pytest

from luo_systemd import errors
from luo_systemd.liveupdate import emulator_backend
from tests.contract.scenarios import PAGE, digest, expect, memfd, pattern
from tests.harness import Emulator

GiB = 1 << 30


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def preserve_one(emu: Emulator, name: bytes, content: bytes) -> int:
    with emu.backend.device() as dev:
        session = dev.create_session(name)
    fd = memfd("one", content)
    emu.backend.preserve_fd(session, fd, 1)
    os.close(fd)
    return session


def test_sparse_gib_memfd_costs_the_emulator_no_memory(emulator: Emulator) -> None:
    """A 1 GiB sparse memfd crosses the emulated kexec; the emulator holds it without copying."""
    before = rss_kib(emulator.proc.pid)
    fd = memfd("gib", size=GiB)
    marks = {0: b"first page", GiB // 2: b"middle", GiB - 16: b"last bytes here"}
    for offset, data in marks.items():
        os.pwrite(fd, data, offset)
    with emulator.backend.device() as dev:
        session = dev.create_session(b"gib")
    emulator.backend.preserve_fd(session, fd, 1)
    os.close(fd)
    emulator.live_update()
    with emulator.backend.device() as dev:
        incoming = dev.retrieve_session(b"gib")
    got = emulator.backend.retrieve_fd(incoming, 1)
    assert os.fstat(got).st_size == GiB
    for offset, data in marks.items():
        assert os.pread(got, len(data), offset) == data
    after = rss_kib(emulator.proc.pid)
    print(f"\nluo-emu VmRSS: {before} KiB before, {after} KiB holding the 1 GiB memfd (+{after - before} KiB)")
    assert after - before < 16 * 1024, "the emulator must not hold the memfd's contents"
    os.close(got)
    os.close(incoming)


def test_size_change_is_reported(emulator: Emulator) -> None:
    """The kernel forbids resizing a preserved memfd (EPERM); the emulator cannot, so it reports it."""
    with emulator.backend.device() as dev:
        session = dev.create_session(b"resized")
    fd = memfd("resized", b"a" * PAGE)
    emulator.backend.preserve_fd(session, fd, 1)
    os.ftruncate(fd, 2 * PAGE)  # would be EPERM on a kernel
    emulator.live_update()
    warnings = emulator.status()["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1
    assert "size changed after preserve (4096 -> 8192)" in warnings[0]
    assert "size changed after preserve" in emulator.stop()
    os.close(fd)
    os.close(session)


@pytest.mark.parametrize(
    ("how", "luo_after"),
    [("cold", True), ("no-kernel", True), ("legacy-load", True), ("cmdline-without-liveupdate", False)],
)
def test_kexec_without_live_update_loses_everything(emulator: Emulator, how: str, luo_after: bool) -> None:
    """Only a kernel loaded with kexec_file_load and booted with kho=on liveupdate=on carries sessions."""
    session = preserve_one(emulator, b"lost", b"data")
    if how == "legacy-load":
        emulator.load(legacy=True)
    elif how == "cmdline-without-liveupdate":
        emulator.load(cmdline="console=ttyS0 kho=on")
    elif how == "no-kernel":
        pass  # systemd-shutdown reboots when nothing is loaded
    result = emulator.kexec(cold=how == "cold")
    assert result["carried"] == [] and result["luo_enabled"] is luo_after
    if luo_after:
        with emulator.backend.device() as dev:
            expect(errno.ENOENT, errors.NoSuchSession, lambda: dev.retrieve_session(b"lost"))
    else:
        with pytest.raises(errors.NotSupported, match="no Live Update Orchestrator"):
            with emulator.backend.device():
                pass
    os.close(session)


def test_incoming_state_survives_client_restarts(emulator: Emulator) -> None:
    """Clients come and go (a crashed agent, a restarted service): the incoming sessions stay."""
    session = preserve_one(emulator, b"survivor", pattern("s", PAGE))
    emulator.live_update()
    os.close(session)  # the old boot's fd: it means nothing any more
    code = "from luo_systemd.liveupdate import emulator_backend as e; b=e(%r)\nwith b.device() as d: pass\n".replace(
        "%r", repr(emulator.socket)
    )
    for _ in range(3):
        subprocess.run([sys.executable, "-c", code], check=True)
    with emulator.backend.device() as dev:
        incoming = dev.retrieve_session(b"survivor")
    fd = emulator.backend.retrieve_fd(incoming, 1)
    assert digest(fd) == hashlib.sha256(pattern("s", PAGE)).hexdigest()
    os.close(fd)
    os.close(incoming)


def test_fds_of_the_old_boot_are_dead(emulator: Emulator) -> None:
    """After the emulated kexec, session fds of the old boot are no sessions any more."""
    session = preserve_one(emulator, b"old", b"x")
    emulator.live_update()
    assert not emulator.backend.is_session(session)
    os.close(session)


def test_shutdown_hook(emulator: Emulator) -> None:
    """`luo-emu shutdown-hook kexec` is the kexec; any other verb is a cold boot."""
    session = preserve_one(emulator, b"hooked", b"x")
    emulator.load()
    env = dict(os.environ, LUO_EMU_SOCKET=emulator.socket)
    out = subprocess.run(
        [sys.executable, "-m", "luo_systemd.emulator", "shutdown-hook", "kexec"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert '"carried": ["hooked"]' in out
    os.close(session)
    out = subprocess.run(
        [sys.executable, "-m", "luo_systemd.emulator", "shutdown-hook", "reboot"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert '"how": "cold boot"' in out


def test_no_emulator_is_no_luo(tmp_path: object) -> None:
    """Without a running emulator the emulated device does not exist: NotSupported, with the reason."""
    backend = emulator_backend("/nonexistent/luo-emu.sock")
    with pytest.raises(errors.NotSupported) as e, backend.device():
        pass
    assert e.value.errno == errno.ENOENT
