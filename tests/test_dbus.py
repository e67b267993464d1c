"""io.liveupdate.Agent1 on a private system bus, and a test for each dbus-next defect we work around."""

from __future__ import annotations

import asyncio
import os
import socket
import types
from collections.abc import Iterator
from queue import Queue

import pytest
from dbus_next.constants import MessageType
from dbus_next.message import Message

from luo_systemd import errors
from luo_systemd.dbus_client import AgentClient
from luo_systemd.dbus_service import BUS_NAME, INTERFACE, OBJECT_PATH, _patient_write_callback
from tests.contract.scenarios import memfd
from tests.harness import NOBODY, Agent, DBusDaemon


@pytest.fixture
def client(agent: Agent) -> Iterator[AgentClient]:
    assert agent.bus is not None
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = agent.bus.address
    loop = asyncio.new_event_loop()
    c = loop.run_until_complete(AgentClient.connect())
    c.loop = loop  # type: ignore[attr-defined]
    try:
        yield c
    finally:
        c.disconnect()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]


def run(client: AgentClient, coro: object) -> object:
    return client.loop.run_until_complete(coro)  # type: ignore[attr-defined]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def agent_pid(agent: Agent) -> int:
    assert agent.proc is not None
    return agent.proc.pid  # bash exec'd python: same PID


def test_store_list_retrieve_over_dbus(agent: Agent, client: AgentClient) -> None:
    fds = [memfd(f"m{i}", f"content {i}".encode()) for i in range(20)]
    items = [(f"fd{i}", fd) for i, fd in enumerate(fds)]
    caller_list = list(items)
    run(client, client.store_fds(caller_list, unit="demo.service"))  # 20 fds: two messages of at most 16
    assert caller_list == items, "the caller's list is left as it was (dbus-next's proxies overwrite it)"
    listing = run(client, client.list_fds(unit="demo.service"))
    assert [f["name"] for f in listing] == [n for n, _ in items]  # type: ignore[attr-defined]
    with pytest.raises(errors.NotFound, match="no restored fd named 'fd0'"):
        run(client, client.retrieve_fds(["fd0"], unit="demo.service"))
    for fd in fds:
        os.close(fd)


def test_refusals_are_named_errors_without_tracebacks(agent: Agent, client: AgentClient) -> None:
    r, w = os.pipe()
    with pytest.raises(errors.InvalidFd) as e:
        run(client, client.store_fds([("p", r)], unit="demo.service"))
    assert "a pipe" in str(e.value) and "Traceback" not in str(e.value)
    with pytest.raises(errors.InvalidName, match="contains ':'"):
        run(client, client.store_fds([("a:b", w)], unit="demo.service"))
    with pytest.raises(errors.AccessDenied, match="has not opted in"):
        run(client, client.store_fds([("x", w)], unit="stranger.service"))
    os.close(r)
    os.close(w)


def test_fds_of_unclaimed_calls_are_not_leaked(agent: Agent, client: AgentClient) -> None:
    """dbus-next leaks fds attached to unknown methods, wrong signatures and failing handlers."""
    pid = agent_pid(agent)
    before = open_fds(pid)
    r, w = os.pipe()
    for member, signature, body in (
        ("NoSuchMethod", "h", [0]),  # unknown method
        ("StoreFds", "h", [0]),  # wrong signature
        ("StoreFds", "sa(sh)", ["demo.service", [["p", 0]]]),  # reaches the method, which refuses it
    ):
        msg = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=INTERFACE,
            member=member,
            signature=signature,
            body=body,
            unix_fds=[r],
        )
        reply = run(client, client.bus.call(msg))
        assert isinstance(reply, Message) and reply.message_type is MessageType.ERROR
    # Introspection of the bus daemon's own round trip guarantees luod finished dispatching.
    run(client, client.list_fds(unit="demo.service"))
    assert open_fds(pid) <= before  # none leaked (a connection still closing may count in "before")
    os.close(r)
    os.close(w)


def test_returned_fds_survive_the_reply(agent: Agent, client: AgentClient) -> None:
    """Closing a returned fd before the reply is written would kill the connection; we close after."""
    fd = run(client, client.create_session("vm0", unit="demo.service"))
    assert isinstance(fd, int) and fd >= 0
    again = run(client, client.create_session("vm0", unit="demo.service"))  # the same session, new fd
    assert isinstance(again, int)
    assert os.fstat(fd).st_ino == os.fstat(again).st_ino
    pid = agent_pid(agent)
    run(client, client.list_fds(unit="demo.service"))  # a round trip: earlier replies' fds are closed by now
    before = open_fds(pid)
    for _ in range(5):
        os.close(run(client, client.create_session("vm0", unit="demo.service")))  # type: ignore[arg-type]
    run(client, client.list_fds(unit="demo.service"))
    assert open_fds(pid) == before, "the agent closes its copy once the reply is sent"
    os.close(fd)
    os.close(again)


@pytest.mark.parametrize("bus", ["host", "pidfd"], indirect=True)
def test_unit_callers_over_dbus(bus: DBusDaemon, agent: Agent, client: AgentClient) -> None:
    """The unit comes from the pidfd the bus gives for the caller's connection (ProcessFD, dbus >= 1.15.8:
    trixie's 1.16 here), as on the Varlink socket.  A bus that gives none (the host's 1.14): callers other
    than root are refused by name, never looked up by PID."""
    assert agent.bus is not None
    code = f"""
    import asyncio
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = {agent.bus.address!r}
    from luo_systemd.dbus_client import AgentClient
    async def main():
        c = await AgentClient.connect()
        fd = os.memfd_create("x", os.MFD_CLOEXEC)
        try:
            await c.store_fds([("mine", fd)])
            print("own:", [f["name"] for f in await c.list_fds()])
        except errors.AccessDenied as e:
            print("refused:", e)
        for call in (c.list_fds(unit="demo.service"), c.call("Arm", "b", [False])):
            try:
                await call
            except errors.AccessDenied as e:
                print("denied:", e)
    asyncio.run(main())
    """
    out = agent.run_as("other.service", code, uid=NOBODY)
    if bus.pidfds:
        assert "own: ['mine']" in out.stdout, out.stdout + out.stderr
        listing, _ = agent.call("List", {"unit": "other.service"})  # root, over Varlink: where it landed
        assert [f["name"] for f in listing["fds"]] == ["mine"]
    else:
        assert "refused:" in out.stdout and "gives no pidfd for this peer (ProcessFD" in out.stdout, out.stdout
        assert run(client, client.list_fds(unit="other.service")) == [], "nothing was stored"
    assert out.stdout.count("denied:") == 2, out.stdout


def test_full_socket_buffer_waits_instead_of_disconnecting() -> None:
    """dbus-next tears the connection down on EAGAIN; the patched writer waits for writability."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    loop = asyncio.new_event_loop()
    finalized: list[Exception] = []
    writer = types.SimpleNamespace(
        messages=Queue(),
        buf=None,
        offset=0,
        unix_fds=None,
        fut=loop.create_future(),
        negotiate_unix_fd=True,
        sock=ours,
        fd=ours.fileno(),
        loop=types.SimpleNamespace(remove_writer=lambda fd: None),
        bus=types.SimpleNamespace(_finalize=finalized.append),
    )
    payload = os.urandom(1 << 20)
    done = loop.create_future()
    writer.messages.put_nowait((payload, [], done))
    _patient_write_callback(writer)  # fills the buffer, gets EAGAIN
    assert not finalized and not done.done() and 0 < writer.offset < len(payload)
    received = bytearray()
    while not done.done():
        received += theirs.recv(1 << 16)
        _patient_write_callback(writer)
    assert not finalized and bytes(received + theirs.recv(1 << 20, socket.MSG_DONTWAIT)) == payload
    loop.close()
    ours.close()
    theirs.close()


def test_preserve_outside_a_live_update_does_nothing(agent: Agent, client: AgentClient) -> None:
    """The stop hook's call when no live update is under way (nor a kexec job queued): nothing is preserved."""
    fd = memfd("cache", b"x")
    run(client, client.store_fds([("cache", fd)], unit="demo.service"))
    reply = run(client, client.call("Preserve", "s", ["demo.service"]))
    assert isinstance(reply, Message) and reply.body == [0]
    assert [f["state"] for f in run(client, client.list_fds(unit="demo.service"))] == ["stored"]  # type: ignore[attr-defined]
    os.close(fd)
