"""luod answers Varlink calls right after READY=1, while asyncio loads (``VarlinkService.serve_early``), and the
event loop takes its connections over (``serve``): on the real emulator, real sockets, in this process."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest

from luo_systemd import journal, varlink, varlink_service
from luo_systemd.api import Caller
from luo_systemd.broker import Broker, BrokerConfig
from luo_systemd.ownedfd import OwnedFd
from luo_systemd.policy import Policy, parse_policy
from luo_systemd.state import NoFdStore
from luo_systemd.varlink_service import Connection, VarlinkService
from tests.contract.scenarios import digest, memfd
from tests.harness import Emulator, close_held

UNIT = "demo.service"
LOADER_STEPS = 3
METHOD = varlink.INTERFACE + "."
ROOT = Caller(uid=0, pid=os.getpid(), unit=None)


class Early:
    """A Varlink service in its early phase on a thread; ``take_over`` ends it and serves on an event loop.
    Once the restore has ended a loader thread takes ``LOADER_STEPS`` steps, as luod's import of the event
    loop does (luo_systemd.agent.serve_while_loading): each waits for ``answering``, and ``steps`` has
    their times."""

    def __init__(self, directory: Path, emulator: Emulator, policies: Optional[dict[str, Policy]] = None) -> None:
        policies = policies or {UNIT: Policy()}
        self.broker = Broker(emulator.backend, policies.get, NoFdStore(), BrokerConfig(env_dir=str(directory / "env")))
        self.manifest = self.broker.begin_restore()  # as luod's start-up, before READY=1
        self.socket = str(directory / "luod.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.socket)
        self.listener.listen()
        self.service = VarlinkService(self.broker, "/", self.listener)
        self.loaded, self.wake = os.pipe()
        self.adopted: list[Connection] = []
        self.thread = threading.Thread(target=self._early)
        self.loop = asyncio.new_event_loop()
        self.serving: Optional[asyncio.Task[None]] = None
        self.answering = threading.Lock()
        self.loader = threading.Thread(target=self._load)
        self.steps: list[float] = []

    def start(self) -> Early:
        self.thread.start()
        return self

    def _early(self) -> None:
        self.adopted = self.service.serve_early(self.loaded, self.loader.start, self.answering)

    def _load(self) -> None:
        for _ in range(LOADER_STEPS):
            with self.answering:
                pass
            self.steps.append(time.monotonic())

    @property
    def early(self) -> bool:
        return self.thread.is_alive()

    def take_over(self) -> list[tuple[str, bool]]:
        """Ends the early phase; for each connection it left: the method of the call left waiting ("" for
        none), and whether part of a reply is unsent."""
        os.write(self.wake, b"\0")
        self.thread.join(10)
        assert not self.thread.is_alive(), "serve_early returns once its fd is readable"
        left = [(c.waiting[0]["method"] if c.waiting else "", c.unsent is not None) for c in self.adopted]
        self.serving = self.loop.create_task(self.service.serve(self.adopted))
        self.thread = threading.Thread(target=self.loop.run_forever)
        self.thread.start()
        return left

    def close(self) -> None:
        if self.serving is None:
            self.take_over()

        async def cancel() -> None:
            assert self.serving is not None
            self.serving.cancel()
            await asyncio.gather(self.serving, *self.service.tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.listener.close()
        close_held(self.broker)
        if self.loader.ident is not None:
            self.loader.join(10)
        for fd in (self.loaded, self.wake):
            os.close(fd)


@pytest.fixture
def early(tmp_path: Path, emulator: Emulator) -> Iterator[Early]:
    service = Early(tmp_path, emulator).start()
    try:
        yield service
    finally:
        service.close()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def send(sock: socket.socket, method: str, parameters: dict[str, Any]) -> None:
    varlink.send_message(sock, {"method": METHOD + method, "parameters": parameters})


def replies(sock: socket.socket, count: int) -> list[tuple[dict[str, Any], list[int]]]:
    reader, got = varlink.Reader(), []
    while len(got) < count:
        msg = reader.next_message()
        if msg is None:
            assert reader.feed(sock), "luod closed the connection"
            continue
        doc, fds = msg
        with fds:
            got.append((doc, [fd.detach() for fd in fds]))
    return got


def pending_bytes(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


def nothing_to_read(sock: socket.socket, seconds: float = 0.3) -> bool:
    sock.settimeout(seconds)
    try:
        return not sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(10)


def test_calls_are_answered_before_the_event_loop_and_what_must_wait_is_carried_over(early: Early) -> None:
    data = [os.urandom(4096) for _ in range(2)]
    with varlink.Client(early.socket, timeout=10) as client:
        client.call("Store", {"unit": UNIT, "names": ["a", "b"]}, [memfd(n, d) for n, d in zip("ab", data)])
        listed = client.call("List", {"unit": UNIT})[0]["fds"]
    assert [f["name"] for f in listed] == ["a", "b"]
    assert early.early, "answered by serve_early: the event loop has not started"

    # Preserve may arm the agent (before_preserve), Status runs the pre-flight: both wait for the event loop,
    # and so does what their connection sends after them.  A connection that sent nothing is carried over.
    preserve, status, idle = connect(early.socket), connect(early.socket), connect(early.socket)
    send(preserve, "Preserve", {"unit": UNIT})
    send(preserve, "List", {"unit": UNIT})
    send(status, "Status", {})
    with varlink.Client(early.socket, timeout=10) as client:  # others are still served meanwhile
        assert client.call("List", {"unit": UNIT})[0]["fds"] == listed
    assert nothing_to_read(preserve) and nothing_to_read(status)

    left = early.take_over()
    assert sorted(method for method, _ in left if method) == [METHOD + "Preserve", METHOD + "Status"]
    (preserved, _), (after, _) = replies(preserve, 2)
    assert preserved == {"parameters": {"preserved": 0}}, "no live update is under way"
    assert [f["name"] for f in after["parameters"]["fds"]] == ["a", "b"], "the call after it, in order"
    assert replies(status, 1)[0][0]["parameters"]["phase"] == early.broker.phase.value
    send(idle, "Retrieve", {"unit": UNIT, "names": ["a"]})
    (got, fds) = replies(idle, 1)[0]
    assert "error" in got, "nothing was restored: Retrieve refuses, on the event loop, over the carried connection"
    assert not fds
    for sock in (preserve, status, idle):
        sock.close()


def test_a_reply_the_peer_does_not_take_is_delivered_in_order_after_the_take_over(early: Early) -> None:
    """Calls sent in a row, their replies not read: the socket's buffer fills during the early phase, the rest
    of the reply waits, later calls wait behind it, and the event loop delivers everything in order."""
    with varlink.Client(early.socket, timeout=10) as client:
        client.call("Store", {"unit": UNIT, "names": ["x" * 200]}, [memfd("x", b"x")])
    sock = connect(early.socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    calls = 2000
    payload = b"".join(
        varlink.encode({"method": METHOD + "List", "parameters": {"unit": UNIT}}, [])[0] for _ in range(calls)
    )
    sock.sendall(payload)
    queued = -1  # the early phase answers until the socket's buffers are full, then leaves the rest
    while queued != (queued := pending_bytes(sock)):
        time.sleep(0.1)
    assert early.early
    assert any(unsent for _, unsent in early.take_over()), "the early phase left the rest of a reply to the loop"
    got = replies(sock, calls)
    assert all(doc["parameters"]["fds"][0]["name"] == "x" * 200 for doc, _ in got)
    assert nothing_to_read(sock), "one reply per call, no more"
    sock.close()


@pytest.mark.parametrize(("hold_max", "stream", "stepped_during"), [(5.0, 0.6, False), (0.3, 1.5, True)])
def test_the_loading_waits_while_calls_come_but_not_for_ever(
    tmp_path: Path,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
    hold_max: float,
    stream: float,
    stepped_during: bool,
) -> None:
    """While calls come one after another the loader takes no step (it would take the GIL and a CPU from
    them); it goes on once none has come for EARLY_QUIET_MS, or once EARLY_HOLD_MAX_SEC have passed since
    the restore ended: a caller that never stops does not keep the event loop from loading."""
    monkeypatch.setattr(varlink_service, "EARLY_QUIET_MS", 200)  # no gap between two calls here is that long
    monkeypatch.setattr(varlink_service, "EARLY_HOLD_MAX_SEC", hold_max)
    early = Early(tmp_path, emulator)
    try:
        begun = time.monotonic()
        early.start()  # nothing to restore: the loader starts at once
        with varlink.Client(early.socket, timeout=10) as client:
            while time.monotonic() - begun < stream:
                client.call("List", {"unit": UNIT})
        ended = time.monotonic()
        early.loader.join(10)
        assert len(early.steps) == LOADER_STEPS, "the loader went on"
        if stepped_during:
            assert begun + hold_max * 0.8 <= early.steps[0] < ended, (early.steps[0] - begun, ended - begun)
        else:
            assert early.steps[0] >= ended + 0.15, "not before the calls had stopped for EARLY_QUIET_MS"
    finally:
        early.close()


def test_a_stored_memfd_keeps_its_bytes_through_the_early_phase(early: Early) -> None:
    fd = memfd("cache", os.urandom(1 << 16))
    with varlink.Client(early.socket, timeout=10) as client:
        client.call("Store", {"unit": UNIT, "names": ["cache"]}, [fd])
    early.take_over()
    assert digest(early.broker.units[UNIT].stored["cache"].held.fd) == digest(fd)
    os.close(fd)


def test_after_a_kexec_the_memfds_follow_ready_those_asked_for_first(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY=1 waits for the manifest, the sessions and the environment files only (Broker.begin_restore);
    the memfds follow in the early phase, a unit a turn, first those of a unit that asks.  A call that
    changes state waits for the end of the restore (nothing is logged before it), then runs early."""
    policy = parse_policy(["[X-LiveUpdate]\nPreserveAt=store\n"])  # preserved at Store: no Arm needed
    policies = {f"u{i:02}.service": policy for i in range(60)}
    before = Broker(emulator.backend, policies.get, NoFdStore(), BrokerConfig(env_dir=str(tmp_path / "env0")))
    data = {(unit, i): os.urandom(256) for unit in policies for i in range(10)}
    for unit in policies:
        before.store(ROOT, unit, [(f"f{i}", OwnedFd(memfd(f"f{i}", data[unit, i]))) for i in range(10)])
    emulator.live_update()
    close_held(before)  # its memfds went across in the emulator
    restored: list[str] = []  # units, in the order of their "Restored ..." events
    event = journal.event

    def record(message_id: str, message: str, **fields: Any) -> None:
        if message_id == journal.RESTORED:
            restored.append(message.rpartition(" ")[2])
        event(message_id, message, **fields)

    monkeypatch.setattr(journal, "event", record)
    early = Early(tmp_path, emulator, policies)
    try:
        assert early.broker.restoring and not restored, "no memfd before READY=1"
        assert sorted(p.name for p in (tmp_path / "env").iterdir()) == sorted(policies), "every unit's env file"
        last, finish, status = connect(early.socket), connect(early.socket), connect(early.socket)
        send(last, "Retrieve", {"unit": "u59.service"})  # queued before the early phase, as a unit at boot
        send(finish, "Finish", {"unit": "u00.service"})
        send(status, "Status", {})  # waits for the event loop, beyond the restore
        early.start()
        got, fds = replies(last, 1)[0]
        assert got["parameters"]["names"] == [f"f{i}" for i in range(10)]
        assert [os.pread(fd, 256, 0) for fd in fds] == [data["u59.service", i] for i in range(10)]
        varlink.close_all(fds)
        assert "u59.service" in restored[:3], restored  # the early phase accepts, restores one, then serves
        assert replies(finish, 1)[0][0] == {"parameters": {"finished": True}}
        assert not early.broker.restoring and len(restored) == 60, "Finish waited for the end of the restore"
        assert early.early, "and ran before the event loop"
        assert nothing_to_read(status)
        with varlink.Client(early.socket, timeout=10) as client:
            for unit in sorted(policies)[1:]:  # u00 finished: its memfds are stored again
                _, got_fds = client.call("Retrieve", {"unit": unit})
                assert [os.pread(fd, 256, 0) for fd in got_fds] == [data[unit, i] for i in range(10)], unit
                varlink.close_all(got_fds)
        assert [method for method, _ in early.take_over() if method] == [METHOD + "Status"]
        assert len(replies(status, 1)[0][0]["parameters"]["units"]) == 60
        for sock in (last, finish, status):
            sock.close()
    finally:
        early.close()


def test_the_manifest_is_finished_after_the_calls_the_restore_held(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore's end logs everything restored and releases the calls that waited for it; the incoming
    manifest's session is FINISHed after their answers, once calls are quiet, still in the early phase."""
    policies = {f"u{i}.service": Policy() for i in range(3)}  # preserved as they stop
    before = Broker(emulator.backend, policies.get, NoFdStore(), BrokerConfig(env_dir=str(tmp_path / "env0")))
    for unit in policies:
        before.store(ROOT, unit, [("mem", OwnedFd(memfd("mem", unit.encode())))])
    before.arm(ROOT, force=True)  # force: the agent under test is no '@' process
    for unit in policies:
        before.preserve(ROOT, unit)
    emulator.live_update()
    close_held(before)
    finished: list[bytes] = []  # the sessions FINISHed, in order
    real = emulator.backend.finish

    def finish(session: int) -> None:
        finished.append(emulator.backend.session_name(session))
        real(session)

    monkeypatch.setattr(emulator.backend, "finish", finish)
    early = Early(tmp_path, emulator, policies)
    try:
        waiting = [connect(early.socket) for _ in range(2)]
        for sock, unit in zip(waiting, policies):
            send(sock, "Finish", {"unit": unit})  # both wait for the end of the restore
        early.start()
        for sock in waiting:
            assert replies(sock, 1)[0][0] == {"parameters": {"finished": True}}
            sock.close()
        deadline = time.monotonic() + 10
        while len(finished) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert finished == [b"luod/u0.service", b"luod/u1.service", b"luod"], finished
        assert early.early and early.broker.manifest_session is None
    finally:
        early.close()
