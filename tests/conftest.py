"""Shared fixtures: a real luo-emu process per test (and the real kernel where /dev/liveupdate exists),
a private system bus, cgroups shaped like units, and a real luod."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_systemd import uapi
from luo_systemd.liveupdate import Backend, kernel_backend
from tests.harness import Agent, DBusDaemon, Emulator, UnitTree, rootfs_dbus_daemon


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


@pytest.fixture
def tree(request: pytest.FixtureRequest) -> Iterator[UnitTree]:
    t = UnitTree(f"luo-test-{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**6}")
    try:
        yield t
    finally:
        t.cleanup()


PIDFD_BUS_SUITE = "trixie"  # dbus 1.16.2: ProcessFD in GetConnectionCredentials


@pytest.fixture
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DBusDaemon]:
    """The host's dbus-daemon; ``parametrize("bus", ["pidfd"], indirect=True)``: one that gives ProcessFD
    (trixie's, from the root file system cache)."""
    if getattr(request, "param", "host") == "pidfd":
        argv = rootfs_dbus_daemon(PIDFD_BUS_SUITE)
        if argv is None:  # a brand-new machine: built now, not only once the nspawn tier gets to it
            from tests.nspawn import harness as nspawn  # noqa: PLC0415 - run-contract.sh stages no tests/nspawn

            try:
                nspawn.ensure_rootfs(PIDFD_BUS_SUITE, quiet=True)
            except (OSError, subprocess.CalledProcessError) as e:
                pytest.skip(f"no {PIDFD_BUS_SUITE} root file system in the cache, and building it failed: {e}")
            argv = rootfs_dbus_daemon(PIDFD_BUS_SUITE)
            assert argv is not None, f"build-rootfs.sh {PIDFD_BUS_SUITE} left no dbus-daemon"
        daemon = DBusDaemon(tmp_path, argv)
        assert daemon.pidfds, f"{PIDFD_BUS_SUITE}'s dbus-daemon gives no ProcessFD"
    else:
        daemon = DBusDaemon(tmp_path)
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def agent_unstarted(tmp_path: Path, emulator: Emulator, bus: DBusDaemon, tree: UnitTree) -> Iterator[Agent]:
    """luod (not started yet) for luod.service, with demo.service and other.service opted in."""
    a = Agent(tmp_path, emulator, bus, tree)
    a.opt_in("demo.service")
    a.opt_in("other.service")
    try:
        yield a
    finally:
        a.cleanup()
        assert not a.log.exists() or "Traceback" not in a.log.read_text(), a.log.read_text()


@pytest.fixture
def agent(agent_unstarted: Agent) -> Agent:
    """luod running in luod.service, with demo.service and other.service opted in."""
    agent_unstarted.start()
    return agent_unstarted


@pytest.fixture(scope="session")
def debs() -> list[Path]:
    """The project's Debian packages, built from the tree as it is (cached by packaging/build-deb.sh)."""
    top = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [str(top / "packaging" / "build-deb.sh"), "--no-lintian"], check=True, capture_output=True, text=True
    )
    return [Path(line) for line in out.stdout.split()]
