"""The D-Bus service io.liveupdate.Agent1 at /io/liveupdate/Agent1 (dbus-next, server side).

Method bodies are thin: find the caller, call the broker, map errors.  The known dbus-next defects are
worked around here, each with a test in tests/test_dbus.py:
- dbus-next never closes the fds a message brings: ``install_fd_guard`` owns them from its arrival
  (``OwnedFds``); a call of one of our methods takes them over and closes what the broker did not keep,
  however it ends; the fds of every other call (unknown method, wrong signature, built-in handlers) are
  closed once dispatch is over;
- closing a returned fd before the reply is written kills the connection: returned fds are closed when
  the send completes (``AgentBus.send``);
- a full socket buffer (EAGAIN) tears the connection down: ``PatientWriter`` waits for writability;
- unhandled exceptions go back with a traceback: every method maps errors itself (``dbus_method``), and
  ``AgentBus._make_method_handler`` stops dbus-next from re-raising a sent error into the event loop;
- at most 16 fds per message: calls and replies are limited to 16 fds;
- a client without fd negotiation sends ``None`` for 'h': refused as InvalidFd.

No ``from __future__ import annotations`` here: dbus-next reads the D-Bus signatures from annotations.
"""

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable
from typing import Any, Callable, Optional

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType, PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from luo_systemd import authz, errors
from luo_systemd.api import AGENT, Caller, Problem
from luo_systemd.broker import Broker, when_free
from luo_systemd.journal import log
from luo_systemd.ownedfd import OwnedFd, OwnedFds
from luo_systemd.varlink import close_all

BUS_NAME = "io.liveupdate.Agent1"
OBJECT_PATH = "/io/liveupdate/Agent1"
INTERFACE = "io.liveupdate.Agent1"
REVISION = 2  # bumped on changes (2: problems carry left_out); the "1" in the name is the major version
CURRENT_SENDER: contextvars.ContextVar[str] = contextvars.ContextVar("sender")
RECEIVED: contextvars.ContextVar[OwnedFds] = contextvars.ContextVar("received")  # the current call's fds
MAX_FDS_PER_MESSAGE = 16  # the bus daemon's limit as dbus-next handles it: more silently become None
MAX_KNOWN_PEERS = 1024  # credentials kept per bus connection, dropped when the peer goes (NameOwnerChanged)
NO_PROCESS_FD = (
    "the bus gives no pidfd for this peer (ProcessFD: dbus-daemon >= 1.15.8 and dbus-broker >= 34 give it); "
    "only root is served over D-Bus here: use the Varlink socket"
)


def _patient_write_callback(writer: Any) -> None:
    """A copy of dbus-next 0.2.3's loop, with BlockingIOError treated as "try again when writable"."""
    import array  # noqa: PLC0415
    import socket  # noqa: PLC0415

    from dbus_next.aio.message_bus import _future_set_exception, _future_set_result  # noqa: PLC0415

    try:
        while True:
            if writer.buf is None:
                if writer.messages.qsize() == 0:
                    writer.loop.remove_writer(writer.fd)
                    return
                buf, unix_fds, fut = writer.messages.get_nowait()
                writer.unix_fds = unix_fds
                writer.buf = memoryview(buf)
                writer.offset = 0
                writer.fut = fut
            try:
                if writer.unix_fds and writer.negotiate_unix_fd:
                    ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", writer.unix_fds))]
                    writer.offset += writer.sock.sendmsg([writer.buf[writer.offset :]], ancdata)
                    writer.unix_fds = None
                else:
                    writer.offset += writer.sock.send(writer.buf[writer.offset :])
            except BlockingIOError:
                return  # still registered as a writer: called again when the socket drains
            if writer.offset >= len(writer.buf):
                writer.buf = None
                _future_set_result(writer.fut, None)
            else:
                return
    except Exception as e:
        _future_set_exception(writer.fut, e)
        writer.bus._finalize(e)


class AgentBus(MessageBus):
    def __init__(self, bus_type: BusType = BusType.SYSTEM) -> None:
        super().__init__(bus_type=bus_type, negotiate_unix_fd=True)
        # dbus-next has no hook for this: replace the one method of its writer.
        self._writer.write_callback = functools.partial(_patient_write_callback, self._writer)  # type: ignore[method-assign]

    def _make_method_handler(self, interface: ServiceInterface, method: Any) -> Callable[[Message, Any], None]:
        """dbus-next sends the error reply of a failed coroutine method and then re-raises the exception into
        the event loop (its SendReply.__exit__ drops _exit's result), which logs a traceback each time."""

        def handler(msg: Message, send_reply: Any) -> None:
            args = ServiceInterface._msg_body_to_args(msg)  # should this raise, install_fd_guard closes the fds
            received = RECEIVED.get().take_all()  # this call owns the message's fds from here

            async def call() -> Any:
                with received:  # closes what the broker did not take, whatever happens
                    RECEIVED.set(received)  # in this task's own context
                    return await method.fn(interface, *args)

            def done(fut: "asyncio.Future[Any]") -> None:
                try:
                    result = fut.result()
                except DBusError as e:  # dbus_method turns every failure into one
                    send_reply(e._as_message(msg))
                    return
                body, fds = ServiceInterface._fn_result_to_body(result, method.out_signature_tree)
                send_reply(Message.new_method_return(msg, method.out_signature, body, fds))

            task = asyncio.ensure_future(call())
            task.add_done_callback(done)

        return handler

    def send(self, msg: Message) -> "asyncio.Future[None]":  # type: ignore[override]  # the aio bus returns a Future
        future: asyncio.Future[None] = super().send(msg)
        if msg.message_type is MessageType.METHOD_RETURN and msg.unix_fds:
            fds = list(msg.unix_fds)
            future.add_done_callback(lambda _: close_all(fds))  # only once they are on the wire
        return future


def driver_call(member: str, signature: str, body: list[Any]) -> Message:
    """A call of the bus itself (org.freedesktop.DBus)."""
    return Message(
        destination="org.freedesktop.DBus",
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member=member,
        signature=signature,
        body=body,
    )


def _owned(items: list[Any]) -> list[tuple[str, OwnedFd]]:
    """StoreFds' (name, fd) pairs, each fd the call's own ``OwnedFd`` (dbus-next put in the numbers)."""
    by_number = {fd.fileno(): fd for fd in RECEIVED.get() if not fd.closed}
    out = []
    for name, number in items:
        fd = by_number.pop(number, None)
        if fd is None:
            raise errors.InvalidRequest("one fd is named twice in the call")
        out.append((str(name), fd))
    return out


def _problems(problems: "list[Problem] | tuple[Problem, ...]") -> list[list[object]]:
    return [[p.unit, p.message, p.left_out] for p in problems]


def dbus_method(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """Resolves the caller, runs the body, maps every error to a named D-Bus error."""

    @functools.wraps(fn)
    async def wrapper(self: "Agent1", *args: Any) -> Any:
        try:
            caller = await self.caller()
            if fn.__name__ == "Preserve" and self.before_preserve is not None:
                authz.authorize(caller, args[0])  # before any work: a stranger forks nothing
                await self.before_preserve()
            return await when_free(self.broker, lambda: fn(self, caller, *args))
        except errors.LuoError as e:
            raise DBusError(e.dbus_name, e.message) from None
        except DBusError:
            raise
        except Exception as e:
            log.exception("Internal error in %s", fn.__name__)
            raise DBusError(errors.LuoError().dbus_name, f"internal error: {type(e).__name__}") from None

    # dbus-next reads the D-Bus signature from the annotations: show it the method without ``caller``.
    signature = inspect.signature(fn)
    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in signature.parameters.items() if name != "caller"]
    )
    return wrapper


class Agent1(ServiceInterface):
    def __init__(
        self,
        bus: MessageBus,
        broker: Broker,
        cgroup_root: str,
        before_preserve: Optional[Callable[[], Awaitable[None]]] = None,
    ) -> None:
        super().__init__(INTERFACE)
        self.bus = bus
        self.broker = broker
        self.cgroup_root = cgroup_root
        self.before_preserve = before_preserve  # lets a kexec that systemd started arm the agent first
        self._peers: dict[str, tuple[int, int, Optional[OwnedFd]]] = {}  # sender: (uid, pid, pidfd)
        self._last_phase = broker.phase
        broker.listeners.append(self._broker_changed)

    async def caller(self) -> Caller:
        """The caller of the current method, from the bus's credentials of its connection.  The pidfd the
        bus gives (ProcessFD) pins the process that connected; without one, only the uid is trusted."""
        sender = CURRENT_SENDER.get()
        peer = self._peers.get(sender)
        if peer is None:
            reply = await self.bus.call(driver_call("GetConnectionCredentials", "s", [sender]))
            if reply is None or reply.message_type is MessageType.ERROR:
                raise errors.AccessDenied(f"cannot get the credentials of {sender}")
            with OwnedFds.wrap(list(reply.unix_fds)) as fds:
                body = reply.body[0]
                uid, pid = int(body["UnixUserID"].value), int(body["ProcessID"].value)
                peer = (uid, pid, fds.pop(body["ProcessFD"].value) if "ProcessFD" in body else None)
            while len(self._peers) >= MAX_KNOWN_PEERS:
                self.forget(next(iter(self._peers)))
            self._peers[sender] = peer
        uid, pid, pidfd = peer
        return authz.identify(uid, pid, pidfd, self.cgroup_root, NO_PROCESS_FD)

    def forget(self, name: str) -> None:
        peer = self._peers.pop(name, None)
        if peer is not None and peer[2] is not None:
            peer[2].close()

    def _broker_changed(self) -> None:
        phase = self.broker.phase
        self.emit_properties_changed(
            {
                "Phase": phase.value,
                "LiveUpdateCount": self.broker.update_count,
                "Problems": _problems(self.broker.problems),
            }
        )
        if phase is not self._last_phase:
            self._last_phase = phase
            self.PhaseChanged(phase.value)

    # -- the fd-store-compatible part

    @method()
    @dbus_method
    def StoreFds(self, caller: Caller, unit: "s", fds: "a(sh)") -> "":
        if len(fds) > MAX_FDS_PER_MESSAGE:
            raise errors.LimitExceeded(f"at most {MAX_FDS_PER_MESSAGE} fds per call; send several calls")
        if any(fd is None for _, fd in fds):
            raise errors.InvalidFd("no fd arrived: connect with unix fd negotiation (negotiate_unix_fd=True)")
        self.broker.store(caller, unit, _owned(fds))

    @method()
    @dbus_method
    def RemoveFds(self, caller: Caller, unit: "s", names: "as") -> "":
        self.broker.remove(caller, unit, list(names))

    @method()
    @dbus_method
    def ListFds(self, caller: Caller, unit: "s") -> "a(sssus)":
        return [[f.name, f.kind, f.state, f.order, f.session] for f in self.broker.list_fds(caller, unit)]

    @method()
    @dbus_method
    def RetrieveFds(self, caller: Caller, unit: "s", names: "as") -> "a(sh)":
        return [[name, fd] for name, fd in self.broker.retrieve(caller, unit, list(names), MAX_FDS_PER_MESSAGE)]

    @method()
    @dbus_method
    def Finish(self, caller: Caller, unit: "s") -> "b":
        return self.broker.finish(caller, unit)

    @method()
    @dbus_method
    def Preserve(self, caller: Caller, unit: "s") -> "u":
        return self.broker.preserve(caller, unit)

    @method()
    @dbus_method
    def CreateSession(self, caller: Caller, unit: "s", name: "s") -> "h":
        return self.broker.create_session(caller, unit, name)

    @method()
    @dbus_method
    def RetrieveSession(self, caller: Caller, unit: "s", name: "s") -> "h":
        return self.broker.retrieve_session(caller, unit, name)

    # -- management

    @method()
    @dbus_method
    def ListUnits(self, caller: Caller) -> "a(suuuub)":
        return [
            [u.unit, u.stored, u.preserved, u.restored, u.sessions, u.finished]
            for u in self.broker.status(caller).units
        ]

    @method()
    @dbus_method
    def Preflight(self, caller: Caller) -> "a(ssb)":
        return _problems(self.broker.preflight(caller))

    @method()
    @dbus_method
    def Arm(self, caller: Caller, force: "b") -> "a(ssb)":
        return _problems(self.broker.arm(caller, force))

    @method()
    @dbus_method
    def Cancel(self, caller: Caller) -> "":
        self.broker.cancel(caller)

    @method()
    @dbus_method
    def Discard(self, caller: Caller, unit: "s") -> "":
        self.broker.discard(caller, unit)

    # -- properties and signals

    @dbus_property(access=PropertyAccess.READ)
    def Phase(self) -> "s":
        return self.broker.phase.value

    @dbus_property(access=PropertyAccess.READ)
    def Supported(self) -> "b":
        return self.broker.status(AGENT).supported

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":
        return self.broker.backend.kind

    @dbus_property(access=PropertyAccess.READ)
    def LiveUpdateCount(self) -> "u":
        return self.broker.update_count

    @dbus_property(access=PropertyAccess.READ)
    def Problems(self) -> "a(ssb)":
        return _problems(self.broker.problems)

    @dbus_property(access=PropertyAccess.READ)
    def Revision(self) -> "u":
        return REVISION

    @signal()
    def PhaseChanged(self, phase: str) -> "s":
        return phase


def install_fd_guard(bus: MessageBus, agent: Agent1) -> None:
    """Owns the fds of every call from its arrival: one of our methods takes them over (``AgentBus``), the
    rest are closed once dispatch is over.  Remembers each call's sender for ``Agent1.caller``."""
    loop = asyncio.get_event_loop()

    def handler(msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.member == "NameOwnerChanged" and not msg.body[2]:
            agent.forget(msg.body[0])
        if msg.message_type is not MessageType.METHOD_CALL:
            return
        # dbus-next dispatches the message right after this, in this context: a method of ours takes the fds
        # over there (and copies the sender into its task); the fds of anything else are closed after.
        CURRENT_SENDER.set(msg.sender)
        received = OwnedFds.wrap(list(msg.unix_fds))
        RECEIVED.set(received)
        if received:
            loop.call_soon(received.close)

    bus.add_message_handler(handler)


async def watch_peers(bus: MessageBus) -> None:
    """Asks the bus for NameOwnerChanged, so a peer's cached credentials go when the peer goes."""
    reply = await bus.call(
        driver_call("AddMatch", "s", ["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"])
    )
    if reply is None or reply.message_type is MessageType.ERROR:
        raise errors.LuoError("the bus refused to report departing peers (AddMatch NameOwnerChanged)")
