"""The agent's Varlink service io.liveupdate.Agent on /run/luod/liveupdate.sock.

The same operations as the D-Bus API, for hooks and light clients, plus fds in both directions (SCM_RIGHTS).
The caller is the peer of the socket, pinned by SO_PEERPIDFD (see authz.py).  Everything a peer can make
luod hold is bounded: connections per uid and in all, bytes and fds pending on a connection (varlink.Reader),
the JSON's depth; replies of any size are delivered as the peer reads them.

Two ways to serve, one after the other: ``serve_early`` answers the calls of restored units right after
READY=1 while the broker restores the memfds and then asyncio loads in a thread, between the calls (asyncio
alone takes longer to import than the whole restore of a unit, and every restored unit waits for its
answer), and ``serve`` takes over its connections on the event loop.  Nothing here imports asyncio before
``serve``.
"""

from __future__ import annotations

import _socket
import select
import sys
import time

from luo_systemd import authz, cgroups, errors, varlink
from luo_systemd.api import Caller, Problem, wire
from luo_systemd.broker import Broker, when_free
from luo_systemd.errors import DeviceBusy
from luo_systemd.journal import log
from luo_systemd.ownedfd import OwnedFd, OwnedFds

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from _thread import LockType
    from collections.abc import Awaitable, Sequence
    from typing import Any, Callable, ClassVar, Optional, Union

    Reply = tuple[dict[str, Any], list[int]]
    Method = Callable[["VarlinkService", Caller, dict[str, Any], OwnedFds], Reply]

MAX_FDS_PER_CALL = 64
MAX_CONNECTIONS = 512  # in all; each costs luod two fds
MAX_CONNECTIONS_PER_UID = 32  # one user cannot take the others' share
ACCEPT_BACKOFF_SEC = 0.1  # after an accept error (EMFILE, ENFILE, ENOBUFS): the listener carries on
NO_PIDFD = "the kernel gives no pidfd for this peer (SO_PEERPIDFD, Linux >= 6.5): only root is served"
# While asyncio loads in a thread, the thread gives the GIL back to a call being served only every switch
# interval (5 ms by default), and a call gives it up at each socket operation: serving early, switch often.
# (A whole restore of 1,000 fds took as long at 50 us, 0.5 ms and 5 ms, within noise; this bounds the wait
# of a single answer.)
EARLY_SWITCH_INTERVAL_SEC = 0.0005
# serve_early lets that thread load on once no call has come for this long (longer than between a client's
# calls one after another, short beside a unit's start), or once it has held it back for the longest: a
# steady stream of calls does not keep the event loop (and Preserve, Status, D-Bus) from loading.
EARLY_QUIET_MS = 5
EARLY_HOLD_MAX_SEC = 1.0

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


class Connection:
    """A peer's connection, as accepted: its credentials, what it sent that is not handled yet, and what
    ``serve_early`` left to the event loop (a call that must wait, the rest of a reply the peer did not take)."""

    def __init__(self, sock: _socket.socket, pid: int, uid: int, pidfd: Optional[OwnedFd]) -> None:
        self.sock = sock
        self.pid = pid
        self.uid = uid
        self.pidfd = pidfd
        self.reader = varlink.Reader()
        self.waiting: Optional[tuple[dict[str, Any], OwnedFds]] = None
        self.unsent: Optional[tuple[bytes, list[tuple[int, int, bytes]], list[int]]] = None  # data, anc, fds

    def send(self, data: bytes, anc: list[tuple[int, int, bytes]], fds: list[int]) -> None:
        """Sends without waiting; what the peer's buffer does not take is kept in ``unsent``.  The reply's
        fds are closed once they are on their way (they go with the first byte)."""
        try:
            sent = self.sock.sendmsg([data], anc)
        except BlockingIOError:
            self.unsent = (data, anc, fds)
            return
        varlink.close_all(fds)
        self.unsent = (data[sent:], [], []) if sent < len(data) else None

    def close(self) -> None:
        if self.waiting is not None:
            self.waiting[1].close()
        self.reader.close()
        self.sock.close()
        if self.pidfd is not None:
            self.pidfd.close()


async def send_rest(conn: Connection) -> None:
    """Sends ``conn.unsent``, waiting while the peer's buffer is full: a large reply is delivered as the peer
    reads it, and a peer that never reads holds only its own connection."""
    import asyncio  # noqa: PLC0415 - see the module's docstring

    loop = asyncio.get_running_loop()
    while conn.unsent is not None:
        writable = loop.create_future()
        loop.add_writer(conn.sock.fileno(), writable.set_result, None)
        try:
            await writable
        finally:
            loop.remove_writer(conn.sock.fileno())
        conn.send(*conn.unsent)


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


def _failure(method: object, e: Exception) -> Reply:
    if isinstance(e, errors.LuoError):
        return varlink.error_reply(e), []
    # a bug: log it whole, answer without a traceback
    log.exception("Internal error in %s", method)
    return varlink.error_reply(errors.LuoError(f"internal error in {method}: {type(e).__name__}")), []


class VarlinkService:
    def __init__(
        self,
        broker: Broker,
        cgroup_root: str,
        listener: _socket.socket,
        before_preserve: Optional[Callable[[], Awaitable[None]]] = None,
    ) -> None:
        self.broker = broker
        self.cgroup_root = cgroup_root
        self.listener = listener
        listener.setblocking(False)
        self.before_preserve = before_preserve  # lets a kexec that systemd started arm the agent first
        self.tasks: set[asyncio.Task[None]] = set()
        self.open = 0
        self.per_uid: dict[int, int] = {}

    def serve_early(self, until: int, restored: Callable[[], object], answering: LockType) -> list[Connection]:
        """Answers calls, and restores the memfds the broker has yet to (``Broker.restore_step``, one unit per
        turn), until ``until`` (an fd) is readable and the restore has ended, without an event loop; returns
        the connections still open, for ``serve``.  ``restored`` is called once the restore has ended (at
        once without one).  While the restore is under way only the calls that read a unit's fds run (its
        memfds first); the others wait for its end.  A call that must wait longer --
        Preserve (it may arm the agent first), the ones that run the pre-flight (its checks load with the
        event loop), one that finds the device busy -- and every later call on its connection are left to
        ``serve``, as is the rest of a reply the peer does not take at once.  The manifest's session is
        finished (``Broker.finish_manifest``) once calls are quiet, or at the return.  ``answering`` is held while
        calls come (up to ``EARLY_HOLD_MAX_SEC`` after the restore): a thread that loads in steps and takes it
        between them does not slow the answers down with its share of the GIL and the CPU."""
        broker, listener = self.broker, self.listener
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        poller.register(until, select.POLLIN)
        conns: dict[int, Connection] = {}
        held: list[Connection] = []  # waiting, unregistered: resumed when the restore ends
        loaded = False
        interval = sys.getswitchinterval()
        sys.setswitchinterval(EARLY_SWITCH_INTERVAL_SEC)
        holding = answering.acquire()
        hold_until = 0.0

        def restore_ended() -> None:
            nonlocal hold_until
            hold_until = time.monotonic() + EARLY_HOLD_MAX_SEC
            restored()

        if not broker.restoring:
            restore_ended()
        try:
            while True:
                if loaded and not broker.restoring:
                    self._finish_manifest()
                    return list(conns.values())
                restoring = broker.restoring
                events = poller.poll(0 if restoring else EARLY_QUIET_MS if holding else None)
                if not restoring and not events:
                    self._finish_manifest()  # calls are quiet: the restore's last step, which none waits for
                if not restoring:
                    hold = bool(events) and time.monotonic() < hold_until
                    if hold and not holding:
                        answering.acquire()
                    elif holding and not hold:
                        answering.release()
                    holding = hold
                for fd, _ in events:
                    if fd == until:
                        loaded = True
                        poller.unregister(until)
                        continue
                    if fd == listener.fileno():
                        try:
                            conn = self._accept()
                        except OSError:  # out of fds or memory: ``serve`` accepts, with a backoff
                            poller.unregister(fd)
                            continue
                        if conn is not None:
                            conns[conn.sock.fileno()] = conn
                            poller.register(conn.sock, select.POLLIN)
                        continue
                    self._turn(conns[fd], conns, poller, held, self._serve_now)
                if restoring:
                    self._restore_step()
                    if not broker.restoring:
                        restore_ended()
                        for conn in held:
                            poller.register(conn.sock, select.POLLIN)
                            self._turn(conn, conns, poller, [], self._resume)
                        held.clear()
        finally:
            if holding:
                answering.release()
            sys.setswitchinterval(interval)

    def _turn(
        self,
        conn: Connection,
        conns: dict[int, Connection],
        poller: select.poll,
        held: list[Connection],
        serve: Callable[[Connection], bool],
    ) -> None:
        """Serves ``conn`` as far as it can; a connection that ended is released, one that waits leaves the
        poller (for ``held`` while the restore is under way, else for ``serve``)."""
        fd = conn.sock.fileno()
        try:
            done = not serve(conn)
        except OSError as e:
            log.debug("Varlink connection ended: %s", e)
            done = True
        if done:
            del conns[fd]
            poller.unregister(fd)
            self._release(conn)
        elif conn.waiting is not None or conn.unsent is not None:
            poller.unregister(fd)
            if conn.waiting is not None and self.broker.restoring:
                held.append(conn)

    def _restore_step(self) -> None:
        try:
            self.broker.restore_step()
        except (errors.LuoError, OSError) as e:
            log.error("The restore failed: %s", e)

    def _finish_manifest(self) -> None:
        try:
            self.broker.finish_manifest()
        except (errors.LuoError, OSError) as e:
            log.error("Failed to finish the manifest's session: %s", e)

    def _resume(self, conn: Connection) -> bool:
        """Runs the call ``conn`` waited with, then serves it on (``_serve_now``); a call for the event loop
        waits on."""
        assert conn.waiting is not None
        msg, conn.waiting = conn.waiting, None
        return not self._answer(conn, msg) or self._serve_now(conn)

    def _serve_now(self, conn: Connection) -> bool:
        """Answers what ``conn`` sent, as far as it can without waiting; False once the peer has gone."""
        while conn.waiting is None and conn.unsent is None:
            msg = conn.reader.next_message()
            if msg is None:
                try:
                    if not conn.reader.feed(conn.sock):
                        return False
                except BlockingIOError:
                    return True
                continue
            if not self._answer(conn, msg):
                return True
        return True

    def _answer(self, conn: Connection, msg: tuple[dict[str, Any], OwnedFds]) -> bool:
        """Answers one call; False if it must wait (it is kept in ``conn.waiting``)."""
        doc, fds = msg
        reply = self._call_now(doc, fds, conn)
        if reply is None:
            conn.waiting = msg
            return False
        if not doc.get("oneway"):
            conn.send(*varlink.encode(reply[0], reply[1]), reply[1])
        else:
            varlink.close_all(reply[1])
        return True

    def _call_now(self, doc: dict[str, Any], fds: OwnedFds, conn: Connection) -> Optional[Reply]:
        """Runs a call at once, or None if it must wait for the end of the restore or for the event loop
        (nothing was done then)."""
        prepared = self._prepare(doc, fds, conn)
        if isinstance(prepared, dict):
            fds.close()
            return prepared, []
        handler, caller, params = prepared
        if handler in WAIT_FOR_EVENT_LOOP or (self.broker.restoring and handler not in DURING_RESTORE):
            return None
        self.broker.last_try = False  # a busy device raises: the event loop tries again later
        try:
            out, out_fds = handler(self, caller, params, fds)
        except DeviceBusy:  # broker calls change nothing before they fail: the fds stay with the call
            return None
        except Exception as e:
            fds.close()
            return _failure(doc.get("method"), e)
        finally:
            self.broker.last_try = True
        fds.close()  # what the broker did not take
        return {"parameters": out}, out_fds

    async def serve(self, adopted: Sequence[Connection] = ()) -> None:
        """Serves until cancelled, first the connections ``serve_early`` left.  A connection is accepted by a
        reader callback, one per readiness of the listener: asyncio's sock_accept would make a future, wake
        this task and register the listener with epoll anew for every connection, a good part of what a call
        costs luod."""
        import asyncio  # noqa: PLC0415 - see the module's docstring

        loop = asyncio.get_running_loop()
        fd = self.listener.fileno()
        failed: asyncio.Future[None] = loop.create_future()  # a bug in _accept ends the service, loudly
        retry: Optional[asyncio.TimerHandle] = None

        def accept() -> None:
            nonlocal retry
            try:
                conn = self._accept()
            except OSError as e:  # out of fds or memory: those waiting are served once some are freed
                log.warning("Varlink: cannot accept a connection: %s", e)
                loop.remove_reader(fd)
                retry = loop.call_later(ACCEPT_BACKOFF_SEC, loop.add_reader, fd, accept)
                return
            except Exception as e:
                if not failed.done():
                    failed.set_exception(e)
                return
            if conn is not None:
                self._start(conn)

        for conn in adopted:
            self._start(conn)
        loop.add_reader(fd, accept)
        try:
            await failed
        finally:
            loop.remove_reader(fd)
            if retry is not None:
                retry.cancel()
            for task in list(self.tasks):
                task.cancel()

    def _accept(self) -> Optional[Connection]:
        """The next connection, or None: nobody waiting, or refused (its peer is gone, or over the limits).
        Raises OSError when accept fails (out of fds or memory)."""
        try:
            # The C half's accept (socket.accept wraps it): a bare fd, CLOEXEC; socket itself imports enum and
            # selectors, which would delay the first answer
            fd, _ = self.listener._accept()  # type: ignore[attr-defined]
        except BlockingIOError:
            return None
        sock = _socket.socket(fileno=fd)
        sock.setblocking(False)
        try:
            pid, uid, pidfd = cgroups.peer_credentials(sock)
        except OSError:
            sock.close()
            return None
        if self.open >= MAX_CONNECTIONS or self.per_uid.get(uid, 0) >= MAX_CONNECTIONS_PER_UID:
            log.warning("Varlink: refusing a connection of PID %d (uid %d): too many connections", pid, uid)
            if pidfd is not None:
                pidfd.close()
            sock.close()
            return None
        self.open += 1
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        return Connection(sock, pid, uid, pidfd)

    def _release(self, conn: Connection) -> None:
        conn.close()
        self.open -= 1
        self.per_uid[conn.uid] -= 1
        if not self.per_uid[conn.uid]:
            del self.per_uid[conn.uid]

    def _start(self, conn: Connection) -> None:
        import asyncio  # noqa: PLC0415 - see the module's docstring

        task = asyncio.ensure_future(self._connection(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connection(self, conn: Connection) -> None:
        import asyncio  # noqa: PLC0415 - see the module's docstring

        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(conn.sock.fileno(), readable.set)
        try:
            await send_rest(conn)
            while True:
                msg = conn.waiting or conn.reader.next_message()
                conn.waiting = None
                if msg is None:
                    try:  # read first: a client sends its call right after connecting
                        if not conn.reader.feed(conn.sock):
                            return
                    except BlockingIOError:
                        readable.clear()
                        await readable.wait()
                    continue
                doc, fds = msg
                with fds:  # what the broker did not take is closed here, whatever happened
                    reply, reply_fds = await self._call(doc, fds, conn)
                if doc.get("oneway"):
                    varlink.close_all(reply_fds)
                    continue
                conn.send(*varlink.encode(reply, reply_fds), reply_fds)
                await send_rest(conn)
        except OSError as e:
            log.debug("Varlink connection ended: %s", e)
        finally:
            loop.remove_reader(conn.sock.fileno())
            if conn.unsent is not None:
                varlink.close_all(conn.unsent[2])
            self._release(conn)

    def _prepare(
        self, doc: dict[str, Any], fds: OwnedFds, conn: Connection
    ) -> Union[dict[str, Any], tuple[Method, Caller, dict[str, Any]]]:
        """A call's handler, caller and parameters, or the reply when there is nothing to run (a refused
        call, org.varlink.service)."""
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
                return self._service_call(method, params)
            if not method.startswith(varlink.INTERFACE + "."):
                return {
                    "error": "org.varlink.service.InterfaceNotFound",
                    "parameters": {"interface": method.rpartition(".")[0]},
                }
            handler = self.methods.get(method[len(varlink.INTERFACE) + 1 :])
            if handler is None:
                return {"error": "org.varlink.service.MethodNotFound", "parameters": {"method": method}}
            caller = authz.identify(
                conn.uid, conn.pid, conn.pidfd, self.cgroup_root, NO_PIDFD, names_unit=bool(params.get("unit"))
            )
        except Exception as e:
            return _failure(method, e)[0]
        return handler, caller, params

    async def _call(self, doc: dict[str, Any], fds: OwnedFds, conn: Connection) -> Reply:
        """Runs one call; the broker takes over the received fds it stores, the caller closes the rest."""
        prepared = self._prepare(doc, fds, conn)
        if isinstance(prepared, dict):
            return prepared, []
        handler, caller, params = prepared
        try:
            if handler is VarlinkService.preserve and self.before_preserve is not None:
                authz.authorize(caller, _unit(params))  # before any work: a stranger forks nothing
                await self.before_preserve()
            out, out_fds = await when_free(self.broker, lambda: handler(self, caller, params, fds))
        except Exception as e:
            return _failure(doc.get("method"), e)
        return {"parameters": out}, out_fds

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


# Calls that ``serve_early`` leaves to the event loop, and the only ones it runs during the restore: see its
# docstring.
WAIT_FOR_EVENT_LOOP = (VarlinkService.preserve, VarlinkService.status, VarlinkService.preflight, VarlinkService.arm)
DURING_RESTORE = (VarlinkService.list_fds, VarlinkService.retrieve, VarlinkService.retrieve_session)
