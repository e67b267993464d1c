"""Received fds are owned from their arrival (``ownedfd``) and closed on every path: the owning type itself,
and luod's two interfaces run in this process, on the real emulator and a real dbus-daemon, with a step
of the broker made to fail unexpectedly in the middle of a call that brought fds."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, Optional, TypeVar

import pytest

from luo_systemd import broker as broker_module
from luo_systemd import errors, varlink
from luo_systemd.broker import Broker, BrokerConfig
from luo_systemd.dbus_client import AgentClient
from luo_systemd.dbus_service import BUS_NAME, OBJECT_PATH, Agent1, AgentBus, install_fd_guard, watch_peers
from luo_systemd.ownedfd import OwnedFd, OwnedFds
from luo_systemd.policy import Policy
from luo_systemd.state import NoFdStore
from luo_systemd.varlink_service import VarlinkService
from tests.contract.scenarios import memfd
from tests.harness import DBusDaemon, Emulator

T = TypeVar("T")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def settled_fds() -> int:
    """The fd count once earlier tests' garbage is collected: an abandoned event loop's sockets closing later
    would otherwise lower the count under a test and hide a leak of the same size."""
    gc.collect()
    return open_fds()


def test_an_owned_fd_is_closed_once_and_handed_on_by_detach() -> None:
    fd = os.memfd_create("secret-name", os.MFD_CLOEXEC)
    with OwnedFd(fd) as owned:
        assert owned.fileno() == fd and repr(owned) == f"<OwnedFd {fd}>", "the number, never the file"
    assert owned.closed and repr(owned) == "<OwnedFd closed>"
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the with
    owned.close()  # a second close does nothing
    with pytest.raises(ValueError, match="closed or handed on"):
        owned.detach()
    kept = OwnedFd(os.memfd_create("kept", os.MFD_CLOEXEC))
    number = kept.detach()
    kept.close()
    os.fstat(number)  # still open: detach handed it on
    os.close(number)


def test_owned_fds_close_what_was_not_taken_even_on_an_exception() -> None:
    before = open_fds()
    with pytest.raises(RuntimeError), OwnedFds.wrap([memfd("a", b"a"), memfd("b", b"b")]) as fds:
        taken = fds[0].detach()
        raise RuntimeError("unexpected")
    assert open_fds() == before + 1, "the taken one stays open, the other is closed"
    os.close(taken)
    moved = OwnedFds.wrap([memfd("c", b"c")])
    with moved:
        mine = moved.take_all()
    assert not moved and open_fds() == before + 1, "take_all moved it out of the with"
    mine.close()
    assert open_fds() == before


class InProcessLuod:
    """The broker, the Varlink service and the D-Bus service as luod runs them, in this process on a
    thread of their own, so that a step can be made to fail.  demo.service is opted in."""

    def __init__(self, directory: Path, emulator: Emulator, bus: DBusDaemon) -> None:
        policies = {"demo.service": Policy()}
        self.broker = Broker(emulator.backend, policies.get, NoFdStore(), BrokerConfig(env_dir=str(directory / "env")))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.socket = str(directory / "luod.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket)
        self.listener.listen()
        self.varlink = asyncio.run_coroutine_threadsafe(
            VarlinkService(self.broker, "/", self.listener).serve(), self.loop
        )
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address
        self.bus: AgentBus = self.run(self._join_bus())

    async def _join_bus(self) -> AgentBus:
        bus = AgentBus()
        await bus.connect()
        agent = Agent1(bus, self.broker, "/")
        install_fd_guard(bus, agent)
        await watch_peers(bus)
        bus.export(OBJECT_PATH, agent)
        await bus.request_name(BUS_NAME)
        return bus

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.varlink.cancel)
        self.loop.call_soon_threadsafe(self.bus.disconnect)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.listener.close()
        del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]


@pytest.fixture
def luod(tmp_path: Path, emulator: Emulator, bus: DBusDaemon) -> Iterator[InProcessLuod]:
    agent = InProcessLuod(tmp_path, emulator, bus)
    try:
        yield agent
    finally:
        agent.stop()


def fds_fall_to(count: int, timeout: float = 5.0) -> int:
    """This process's fd count once it is at most ``count`` (luod's side closes a call's fds as the call's
    task ends, a moment after the client has its reply), or the last count after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (now := open_fds()) > count and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


def boom(fd: int) -> int:
    raise RuntimeError("a step failed unexpectedly")


class DBusCaller:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.client = self.loop.run_until_complete(AgentClient.connect())

    def store(self, items: list[tuple[str, int]]) -> None:
        self.loop.run_until_complete(self.client.store_fds(items, unit="demo.service"))

    def close(self) -> None:
        self.client.disconnect()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


def store_over(interface: str, luod: InProcessLuod, caller: Optional[DBusCaller], items: list[tuple[str, int]]) -> None:
    if caller is not None:
        caller.store(items)
        return
    with varlink.Client(luod.socket, timeout=10) as client:
        client.call("Store", {"unit": "demo.service", "names": [n for n, _ in items]}, [fd for _, fd in items])


@pytest.mark.parametrize("interface", ["varlink", "dbus"])
def test_an_unexpected_exception_mid_call_leaks_no_received_fd(
    luod: InProcessLuod, monkeypatch: pytest.MonkeyPatch, interface: str
) -> None:
    caller = DBusCaller() if interface == "dbus" else None
    try:
        mine = [memfd(f"m{i}", b"x" * 4096) for i in range(8)]
        items = [(f"fd{i}", fd) for i, fd in enumerate(mine)]
        baseline = settled_fds()
        with monkeypatch.context() as patch:
            # After every fd was probed, inside the broker: the call's fds are neither stored nor returned.
            patch.setattr(broker_module, "memfd_bytes", boom)
            with pytest.raises(errors.LuoError, match="internal error"):
                store_over(interface, luod, caller, items)
        assert fds_fall_to(baseline) == baseline, "every received fd was closed"
        assert "demo.service" not in luod.broker.units or not luod.broker.units["demo.service"].stored

        store_over(interface, luod, caller, items)  # the same call, nothing failing: the broker keeps them
        kept = baseline + len(items) + 1  # the received fds themselves, and the broker's state snapshot
        assert fds_fall_to(kept) == kept, "the received fds are kept, no copies, nothing else left open"
        assert list(luod.broker.units["demo.service"].stored) == [n for n, _ in items]
    finally:
        if caller is not None:
            caller.close()


@pytest.mark.parametrize(
    ("indices", "error"),
    [([0, 0], "one fd is named twice in the call"), ([0, 3], "no fd arrived")],
)
def test_a_dbus_call_naming_fds_wrongly_leaks_none(luod: InProcessLuod, indices: list[int], error: str) -> None:
    """StoreFds whose 'h' values name one fd twice, or an fd the message does not carry (dbus-next makes it
    None): refused by name, and the fds that came are all closed."""
    caller = DBusCaller()
    try:
        mine = [memfd("a", b"a"), memfd("b", b"b")]
        baseline = settled_fds()
        body = ["demo.service", [[f"fd{i}", index] for i, index in enumerate(indices)]]
        with pytest.raises((errors.InvalidRequest, errors.InvalidFd), match=error):
            caller.loop.run_until_complete(caller.client.call("StoreFds", "sa(sh)", body, mine))
        assert fds_fall_to(baseline) == baseline
        assert "demo.service" not in luod.broker.units
    finally:
        caller.close()
