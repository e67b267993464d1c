"""The agent's Varlink service io.liveupdate.Agent on /run/luod/liveupdate.sock.

The same operations as the D-Bus API, for hooks and light clients, plus fds in both directions (SCM_RIGHTS).
The caller is the peer of the socket, pinned by SO_PEERPIDFD (see authz.py).  Everything a peer can make
luod hold is bounded: connections per uid and in all, bytes and fds pending on a connection (varlink.Reader),
the JSON's depth; replies of any size are delivered as the peer reads them.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Sequence
from typing import Any, Callable, ClassVar, Optional

from luo_systemd import authz, cgroups, errors, varlink
from luo_systemd.api import Caller, Problem, wire
from luo_systemd.broker import Broker, when_free
from luo_systemd.journal import log
from luo_systemd.ownedfd import OwnedFd, OwnedFds

MAX_FDS_PER_CALL = 64
MAX_CONNECTIONS = 512  # in all; each costs luod two fds
MAX_CONNECTIONS_PER_UID = 32  # one user cannot take the others' share
ACCEPT_BACKOFF_SEC = 0.1  # after an accept error (EMFILE, ENFILE, ENOBUFS): the listener carries on
NO_PIDFD = "the kernel gives no pidfd for this peer (SO_PEERPIDFD, Linux >= 6.5): only root is served"

IDL = """\
# Kernel live updates for systemd units: store named fds (memfds, LUO sessions) for a unit, get them back
# after a live update.  A caller acts on its own unit (unit omitted); root may name any unit.
interface io.liveupdate.Agent

type FdInfo (name: string, kind: string, state: string, order: int, session: string)
type UnitStatus (unit: string, stored: int, preserved: int, restored: int, sessions: int, finished: bool)
# left_out: the unit is left out of the live update (its OnPreflightFailure=leave-out); it does not refuse Arm.
type Problem (unit: string, message: string, left_out: bool)

# Stores the attached fds under the given names (one name per fd, in order); a stored name is replaced.
method Store(unit: ?string, names: []string) -> ()
# Forgets stored fds, like FDSTOREREMOVE=1.
method Remove(unit: ?string, names: []string) -> ()
method List(unit: ?string) -> (fds: []FdInfo)
# After a live update: the restored fds (all, or by name), attached in the order of names.
method Retrieve(unit: ?string, names: ?[]string) -> (names: []string)
# Ends the unit's restore; its restored memfds are carried into the next update.
method Finish(unit: ?string) -> (finished: bool)
# The ExecStop= hook: preserves the unit's fds if a live update is under way.
method Preserve(unit: ?string) -> (preserved: int)
# A LUO session of the unit's own, kept alive by the agent until the kexec (the fd is attached).
method CreateSession(unit: ?string, name: string) -> ()
method RetrieveSession(unit: ?string, name: string) -> ()
method Status() -> (phase: string, supported: bool, backend: string, live_update_count: int,
                    units: []UnitStatus, problems: []Problem)
method Preflight() -> (problems: []Problem)
# Root only: decide a live update (no problem may refuse it, unless force; units left out are not carried).
method Arm(force: ?bool) -> (problems: []Problem)
method Cancel() -> ()
method Discard(unit: string) -> ()
"""

ERRORS_IDL = "".join(f"error {cls.name} (message: string, errno: ?int)\n" for cls in errors.all_error_classes())

SERVICE_INFO = {
    "vendor": "luo-systemd",
    "product": "luod",
    "version": "1",
    "url": "https://github.com/luo-systemd/luo-systemd",
    "interfaces": ["org.varlink.service", varlink.INTERFACE],
}


async def send_reply(sock: socket.socket, doc: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Sends on a non-blocking socket, waiting while the peer's buffer is full: a large reply is delivered
    as the peer reads it, and a peer that never reads holds only its own connection."""
    loop = asyncio.get_running_loop()
    data, anc = varlink.encode(doc, fds)
    while True:
        try:
            sent = sock.sendmsg([data], anc)  # the fds go with the first byte
            break
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())
    if sent < len(data):  # a send of nothing would fail with EPIPE once the peer has its reply and left
        await loop.sock_sendall(sock, data[sent:])


def _unit(params: dict[str, Any]) -> str:
    unit = params.get("unit")
    if unit is None:
        return ""
    if not isinstance(unit, str):
        raise errors.InvalidRequest("'unit' must be a string")
    return unit


def _string(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str):
        raise errors.InvalidRequest(f"'{key}' must be a string")
    return value


def _bool(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise errors.InvalidRequest(f"'{key}' must be true or false")
    return value


def _names(params: dict[str, Any], key: str = "names") -> list[str]:
    value = params.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise errors.InvalidRequest(f"'{key}' must be an array of strings")
    return value


def _problems(problems: list[Problem]) -> dict[str, Any]:
    return {"problems": wire(problems)}


class VarlinkService:
    def __init__(
        self, broker: Broker, cgroup_root: str, before_preserve: Optional[Callable[[], Awaitable[None]]] = None
    ) -> None:
        self.broker = broker
        self.cgroup_root = cgroup_root
        self.before_preserve = before_preserve  # lets a kexec that systemd started arm the agent first
        self.connections: set[asyncio.Task[None]] = set()
        self.per_uid: dict[int, int] = {}

    async def serve(self, listener: socket.socket) -> None:
        """Serves until cancelled.  A connection is accepted by a reader callback, one per readiness of the
        listener: asyncio's sock_accept would make a future, wake this task and register the listener with
        epoll anew for every connection, a good part of what a call costs luod."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        fd = listener.fileno()
        failed: asyncio.Future[None] = loop.create_future()  # a bug in _admit ends the service, loudly
        retry: Optional[asyncio.TimerHandle] = None

        def accept() -> None:
            nonlocal retry
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:  # out of fds or memory: those waiting are served once some are freed
                log.warning("Varlink: cannot accept a connection: %s", e)
                loop.remove_reader(fd)
                retry = loop.call_later(ACCEPT_BACKOFF_SEC, loop.add_reader, fd, accept)
                return
            try:
                self._admit(conn)
            except Exception as e:
                if not failed.done():
                    failed.set_exception(e)

        loop.add_reader(fd, accept)
        try:
            await failed
        finally:
            loop.remove_reader(fd)
            if retry is not None:
                retry.cancel()
            for task in list(self.connections):
                task.cancel()

    def _admit(self, conn: socket.socket) -> None:
        try:
            pid, uid, pidfd = cgroups.peer_credentials(conn)
        except OSError:
            conn.close()
            return
        if len(self.connections) >= MAX_CONNECTIONS or self.per_uid.get(uid, 0) >= MAX_CONNECTIONS_PER_UID:
            log.warning("Varlink: refusing a connection of PID %d (uid %d): too many connections", pid, uid)
            if pidfd is not None:
                pidfd.close()
            conn.close()
            return
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        task = asyncio.ensure_future(self._connection(conn, pid, uid, pidfd))
        self.connections.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.connections.discard(t)
            self.per_uid[uid] -= 1
            if not self.per_uid[uid]:
                del self.per_uid[uid]

        task.add_done_callback(done)

    async def _connection(self, conn: socket.socket, pid: int, uid: int, pidfd: Optional[OwnedFd]) -> None:
        loop = asyncio.get_running_loop()
        reader = varlink.Reader()
        readable = asyncio.Event()
        conn.setblocking(False)
        loop.add_reader(conn.fileno(), readable.set)
        try:
            while True:
                msg = reader.next_message()
                if msg is None:
                    try:  # read first: a client sends its call right after connecting
                        if not reader.feed(conn):
                            return
                    except BlockingIOError:
                        readable.clear()
                        await readable.wait()
                    continue
                doc, fds = msg
                with fds:  # what the broker did not take is closed here, whatever happened
                    reply, reply_fds = await self._call(doc, fds, pid, uid, pidfd)
                try:
                    if not doc.get("oneway"):
                        await send_reply(conn, reply, reply_fds)
                finally:
                    varlink.close_all(reply_fds)
        except OSError as e:
            log.debug("Varlink connection ended: %s", e)
        finally:
            loop.remove_reader(conn.fileno())
            reader.close()
            conn.close()
            if pidfd is not None:
                pidfd.close()

    async def _call(
        self, doc: dict[str, Any], fds: OwnedFds, pid: int, uid: int, pidfd: Optional[OwnedFd]
    ) -> tuple[dict[str, Any], list[int]]:
        """Runs one call; the broker takes over the received fds it stores, the caller closes the rest."""
        method = doc.get("method")
        params = doc.get("parameters")
        try:
            if not isinstance(method, str):
                raise errors.InvalidRequest("'method' must be a string")
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise errors.InvalidRequest("'parameters' must be an object")
            if len(fds) > MAX_FDS_PER_CALL:
                raise errors.LimitExceeded(f"at most {MAX_FDS_PER_CALL} fds per call")
            if method.startswith("org.varlink.service."):
                return self._service_call(method, params), []
            if not method.startswith(varlink.INTERFACE + "."):
                return {
                    "error": "org.varlink.service.InterfaceNotFound",
                    "parameters": {"interface": method.rpartition(".")[0]},
                }, []
            handler = self.methods.get(method[len(varlink.INTERFACE) + 1 :])
            if handler is None:
                return {"error": "org.varlink.service.MethodNotFound", "parameters": {"method": method}}, []
            caller = authz.identify(uid, pid, pidfd, self.cgroup_root, NO_PIDFD, names_unit=bool(params.get("unit")))
            if handler is VarlinkService.preserve and self.before_preserve is not None:
                authz.authorize(caller, _unit(params))  # before any work: a stranger forks nothing
                await self.before_preserve()
            out, out_fds = await when_free(self.broker, lambda: handler(self, caller, params, fds))
            return {"parameters": out}, out_fds
        except errors.LuoError as e:
            return varlink.error_reply(e), []
        except Exception as e:  # a bug: log it whole, answer without a traceback
            log.exception("Internal error in %s", method)
            return varlink.error_reply(errors.LuoError(f"internal error in {method}: {type(e).__name__}")), []

    def _service_call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "org.varlink.service.GetInfo":
            return {"parameters": SERVICE_INFO}
        if method == "org.varlink.service.GetInterfaceDescription":
            if params.get("interface") != varlink.INTERFACE:
                return {"error": "org.varlink.service.InterfaceNotFound", "parameters": {}}
            return {"parameters": {"description": IDL + "\n" + ERRORS_IDL}}
        return {"error": "org.varlink.service.MethodNotFound", "parameters": {"method": method}}

    # -- methods: (caller, parameters, fds) -> (reply parameters, reply fds)

    def store(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        names = _names(p)
        if len(names) != len(fds):
            raise errors.InvalidRequest(f"{len(names)} name(s) but {len(fds)} fd(s) attached")
        self.broker.store(caller, _unit(p), list(zip(names, fds)))
        return {}, []

    def remove(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        self.broker.remove(caller, _unit(p), _names(p))
        return {}, []

    def list_fds(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        return {"fds": wire(self.broker.list_fds(caller, _unit(p)))}, []

    def retrieve(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        got = self.broker.retrieve(caller, _unit(p), _names(p), varlink.MAX_FDS)
        return {"names": [n for n, _ in got]}, [fd for _, fd in got]

    def finish(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        return {"finished": self.broker.finish(caller, _unit(p))}, []

    def preserve(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        return {"preserved": self.broker.preserve(caller, _unit(p))}, []

    def create_session(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        return {}, [self.broker.create_session(caller, _unit(p), _string(p, "name"))]

    def retrieve_session(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        return {}, [self.broker.retrieve_session(caller, _unit(p), _string(p, "name"))]

    def status(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        return wire(self.broker.status(caller)), []

    def preflight(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        return _problems(self.broker.preflight(caller)), []

    def arm(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        return _problems(self.broker.arm(caller, force=_bool(p, "force"))), []

    def cancel(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        self.broker.cancel(caller)
        return {}, []

    def discard(self, caller: Caller, p: dict[str, Any], fds: OwnedFds) -> tuple[dict[str, Any], list[int]]:
        self.broker.discard(caller, _string(p, "unit"))
        return {}, []

    Method = Callable[["VarlinkService", Caller, dict[str, Any], OwnedFds], tuple[dict[str, Any], list[int]]]
    methods: ClassVar[dict[str, Method]] = {
        "Store": store,
        "Remove": remove,
        "List": list_fds,
        "Retrieve": retrieve,
        "Finish": finish,
        "Preserve": preserve,
        "CreateSession": create_session,
        "RetrieveSession": retrieve_session,
        "Status": status,
        "Preflight": preflight,
        "Arm": arm,
        "Cancel": cancel,
        "Discard": discard,
    }
