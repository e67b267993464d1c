"""Shared fixtures: a real luo-emu process per test, and the real kernel where /dev/liveupdate exists."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_systemd import uapi
from luo_systemd.liveupdate import Backend, EmuControl, EmulatorTransport, emulator_backend, kernel_backend

READY_TIMEOUT = 10.0


def wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes], what: str) -> None:
    """Waits for READY=1 on a NOTIFY_SOCKET we own (no sleep-polling for sockets to appear)."""
    notify.settimeout(READY_TIMEOUT)
    while True:
        try:
            msg = notify.recv(4096)
        except socket.timeout:
            proc.kill()
            raise RuntimeError(f"{what} did not become ready in {READY_TIMEOUT}s") from None
        if b"READY=1" in msg.split(b"\n"):
            return


class Emulator:
    """A running ``luo-emu serve`` process."""

    def __init__(self, directory: Path) -> None:
        self.socket = str(directory / "luo-emu.sock")
        notify_path = str(directory / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            env = dict(os.environ, NOTIFY_SOCKET=notify_path)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "luo_systemd.emulator", "--socket", self.socket, "serve"],
                env=env,
                stderr=subprocess.PIPE,
            )
            wait_ready(notify, self.proc, "luo-emu")
        self.transport = EmulatorTransport(self.socket)
        self.backend = emulator_backend(self.socket)

    def status(self) -> dict[str, object]:
        return dict(json.loads(self.transport.control(EmuControl.STATUS)))

    def load(self, cmdline: str = "kho=on liveupdate=on", legacy: bool = False) -> None:
        fd = os.open("/proc/self/exe", os.O_RDONLY | os.O_CLOEXEC)  # any file stands in for a bzImage
        try:
            payload = json.dumps({"cmdline": cmdline, "legacy": legacy}).encode()
            self.transport.control(EmuControl.LOAD_KERNEL, payload, [fd])
        finally:
            os.close(fd)

    def kexec(self, cold: bool = False) -> dict[str, object]:
        return dict(json.loads(self.transport.control(EmuControl.KEXEC, json.dumps({"cold": cold}).encode())))

    def live_update(self) -> dict[str, object]:
        """Loads a LUO-enabled kernel the right way and kexecs into it."""
        self.load()
        return self.kexec()

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        return err.decode()


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path)
    try:
        yield emu
    finally:
        stderr = emu.stop()
        assert "Traceback" not in stderr, stderr


def kernel_available() -> bool:
    return os.path.exists(uapi.LIVEUPDATE_DEV)


@pytest.fixture(params=["emulator", "kernel"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "kernel":
        if not kernel_available():
            pytest.skip("skipped because this kernel has no /dev/liveupdate (the qemu tier runs these)")
        yield kernel_backend()
        return
    emu = Emulator(tmp_path)
    try:
        yield emu.backend
    finally:
        stderr = emu.stop()
        assert "Traceback" not in stderr, stderr
