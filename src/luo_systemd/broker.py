"""The broker: the rules of every operation, behind the D-Bus and Varlink adapters.

Who may call what is decided in authz.py; what luod holds, and its crash-safe persistence with the
invariants it keeps, is state.py.  The broker owns every fd it holds and changes state through
``_hold``/``_release``/``_changed`` only, which keep those invariants.  Methods are synchronous: LUO
operations are single ioctls, and running them one at a time keeps the state consistent.  Every refusal is
a ``LuoError`` raised before anything changed.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import stat
import time

from luo_systemd import authz, journal, names, syscalls
from luo_systemd import state as held_state
from luo_systemd.api import AGENT, AgentStatus, Caller, FdInfo, Problem, UnitStatus, refusing
from luo_systemd.errors import (
    AccessDenied,
    BadManifest,
    DeviceBusy,
    InvalidFd,
    InvalidRequest,
    KernelError,
    LimitExceeded,
    LuoError,
    NoSuchSession,
    NoSuchToken,
    NotFound,
    PreflightFailed,
    WrongPhase,
)
from luo_systemd.journal import log
from luo_systemd.liveupdate import Backend, Device
from luo_systemd.manifest import MAX_RECORDS_SIZE, CarriedFd, CarriedUnit, FdKind, Manifest
from luo_systemd.ownedfd import OwnedFd
from luo_systemd.policy import NoReturn, OnPreflightFailure, Policy, PreserveAt
from luo_systemd.records import Choice, NamedTuple
from luo_systemd.state import (
    HELD_KEY_PREFIX,
    LOG_MAX,
    MEMBER_SEP,
    STATE_KEY_PREFIX,
    Entry,
    Globals,
    Held,
    StateLog,
    UnitState,
    crash_point,
    read_all,
    sealed_memfd,
    write_all,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs luod's start-up, before READY=1
    from collections.abc import Iterable
    from typing import Callable, Optional, TypeVar

    from luo_systemd.state import FdStore

    T = TypeVar("T")

MANIFEST_TOKEN = 0
MANIFEST_SLACK = 64  # records a manifest session holds beyond twice its units before it is written whole


class Phase(Choice):  # not enum.Enum: luod imports this module before READY=1 (see luo_systemd.records)
    IDLE = "idle"
    ARMED = "armed"  # a live update was requested: units are preserved as they stop
    RESTORED = "restored"  # this boot followed a live update; some units have not finished yet


class BrokerConfig(NamedTuple):  # not a dataclass: luod builds it before READY=1 (see luo_systemd.records)
    max_fds_total: int = 4096
    busy_retries: int = 5  # EBUSY on /dev/liveupdate (systemd >= 261 opens it briefly): 1.55 s in all
    env_dir: str = "/run/luod/env"  # restore variables, read by the units through EnvironmentFile=-


DEFAULT_CONFIG = BrokerConfig()
BUSY_BACKOFF_SEC = 0.05  # doubling: 0.05, 0.1, 0.2, 0.4, 0.8


async def when_free(broker: Broker, call: Callable[[], T]) -> T:
    """Runs a broker call for an interface.  The device is opened without waiting; EBUSY (another opener,
    such as systemd >= 261 for a moment) is tried again after a doubling delay that does not block the
    event loop, ``busy_retries`` times.  Broker calls change nothing before they fail, so a retry is safe."""
    import asyncio  # noqa: PLC0415 - luod imports this module before READY=1, asyncio only after

    retries = broker.config.busy_retries
    for attempt in range(retries + 1):
        broker.last_try = attempt == retries
        try:
            return call()
        except DeviceBusy:
            if broker.last_try:
                raise
        finally:
            broker.last_try = True
        await asyncio.sleep(BUSY_BACKOFF_SEC * (1 << attempt))
    raise AssertionError("unreachable")


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Broker:
    def __init__(
        self,
        backend: Backend,
        policy_of: Callable[[str], Optional[Policy]],
        store: FdStore,
        config: BrokerConfig = DEFAULT_CONFIG,
        extra_checks: tuple[Callable[[], list[Problem]], ...] = (),
        clock: Callable[[], float] = boottime,
    ) -> None:
        self.backend = backend
        self.policy_of = policy_of
        self.fdstore = store
        self.config = config
        self.extra_checks = extra_checks
        self.clock = clock
        self.units: dict[str, UnitState] = {}
        self.armed = False
        self.update_count = 0
        self.supported = True  # whether /dev/liveupdate opened when status() last looked
        self.manifest_session: Optional[Held] = None
        self._manifest_tokens = 0  # records in the manifest session luod created
        self._carrying: set[str] = set()  # the units those records carry
        self._manifest_synced = False  # whether they (or no session) are what the state carries
        # Units the arm expects a Preserve from: the one that empties it writes the manifest whole, one record
        # for the next boot to read rather than one per unit.  A hint only (a crash forgets it): any Preserve
        # outside it appends a record, as before.
        self._awaiting: set[str] = set()
        self.problems: list[Problem] = []  # found at restore time, shown in status
        self.listeners: list[Callable[[], None]] = []  # called after every change
        self._next_key = 0
        self._log = StateLog(store)
        self._dirty: set[str] = set()  # units changed since the state was last logged
        self._groups: dict[str, str] = {}  # fd store names holding several memfds (_hold_all): their unit
        self._splitting: set[str] = set()  # those of them whose member was released since the last log
        self._counted: dict[str, int] = {}  # stored fds per unit, as last counted (``_count_stored``)
        self._stored_total = 0  # their sum, for max_fds_total
        self.last_try = True  # set by when_free: a busy device is reported rather than raised
        self._retrieved: dict[str, int] = {}  # incoming sessions a crashed predecessor retrieved, by name
        self._incoming: Optional[Held] = None  # the manifest's session while the restore is under way
        self._unfinished: Optional[Held] = None  # and after it, until finish_manifest
        self._pending: dict[str, CarriedUnit] = {}  # units whose memfds it has not restored yet
        self.at_end: Callable[[], None] = lambda: None  # the restore's last step, before the manifest's FINISH
        self._kernel = os.uname().release  # in every manifest record: asked once, it does not change

    # -- bookkeeping

    @property
    def phase(self) -> Phase:
        if self.armed:
            return Phase.ARMED
        if any(not u.finished for u in self.units.values()):
            return Phase.RESTORED
        return Phase.IDLE

    @property
    def left_out(self) -> frozenset[str]:
        """Units left out of the live update under way (OnPreflightFailure=leave-out): not preserved, not
        in the manifest.  Kept as their problems in ``problems``, which the snapshot holds."""
        return frozenset(p.unit for p in self.problems if p.left_out)

    def _new_key(self) -> str:
        self._next_key += 1
        return f"{HELD_KEY_PREFIX}{self._next_key}"

    def _hold(self, fd: OwnedFd) -> Held:
        """Takes ``fd`` over, mirrored in the fd store under a new key; if that fails, ``fd`` is still the
        caller's to close."""
        key = self._new_key()
        self.fdstore.keep(key, fd.fileno())
        held = Held.take(fd, key)
        crash_point("kept " + held.key)
        return held

    def _hold_all(self, unit: str, fds: list[OwnedFd]) -> list[Held]:
        """Takes over memfds luod retrieved for ``unit``, mirrored in the fd store with one push under one
        new name: each is the member 'NAME/INODE' (after a crash the fds of a name are told apart by inode).
        A push per unit rather than per fd: each costs luod a message and the service manager a wakeup, on
        the way to the unit's Retrieve.  The release of a member takes the whole name out of the fd store
        (``_split``)."""
        group = self._new_key()
        inodes = [os.fstat(fd.fileno()).st_ino for fd in fds]
        self.fdstore.keep(group, *(fd.fileno() for fd in fds))
        crash_point("kept " + group)
        self._groups[group] = unit
        return [Held.take(fd, f"{group}{MEMBER_SEP}{inode}") for fd, inode in zip(fds, inodes)]

    def _mirror(self, fd: int) -> str:
        """Pushes a new open file of the memfd ``fd`` to the fd store, under a new key which it returns.
        systemd keeps one copy of an open file in a fd store and drops a second push of it: the open file
        ``fd`` may be there already (see ``_hold_received``, ``_split``)."""
        key = self._new_key()
        copy = os.open(f"/proc/self/fd/{fd}", (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) | os.O_CLOEXEC)
        try:
            self.fdstore.keep(key, copy)
        finally:
            os.close(copy)
        crash_point("kept " + key)
        return key

    def _release(self, held: Optional[Held]) -> None:
        """Closes our fd; its copy leaves the fd store only once a change that no longer names it is logged
        (invariant 1 of crash recovery).  A member's name leaves whole, once its other members have been
        mirrored anew (``_split``)."""
        if held is not None:
            os.close(held.fd)
            if held.key != held.store_key:
                self._splitting.add(held.store_key)
            elif held.key:
                self._log.retired.append(held.key)

    def _split(self) -> None:
        """Before a change is logged: each name a released member had leaves the fd store, and the members
        still held get a key of their own first (as new open files: the name's copies are our open files).
        A member is released when its unit removes, replaces or discards it: rare, and bounded by what the
        unit holds."""
        for group in list(self._splitting):
            unit = self._groups[group]
            state = self.units.get(unit)
            for entry in itertools.chain(state.stored.values(), state.restored.values()) if state else ():
                if entry.held.store_key == group:
                    entry.held = Held(entry.held.fd, self._mirror(entry.held.fd))
                    self._dirty.add(unit)
            del self._groups[group]  # only now: a failed _mirror leaves the rest for the next change's log
            self._splitting.discard(group)
            self._log.retired.append(group)

    def _outgoing(self, fd: int) -> Held:
        """An outgoing session luod creates itself (a unit's, or the manifest's): not mirrored in the fd
        store.  Its name must be free whenever luod creates it again, and the kernel preserves a file in
        one session only; a crash closes it, and recovery creates it again from the state (invariant 2)."""
        return Held(fd=fd, key="")

    def _unit(self, unit: str) -> UnitState:
        return self.units.setdefault(unit, UnitState(unit=unit))

    def _policy(self, unit: str) -> Policy:
        policy = self.policy_of(unit)
        if policy is None:
            raise AccessDenied(f"{unit} has not opted in to live updates (it has no [X-LiveUpdate] section)")
        return policy

    def _changed(self, *units: str) -> None:
        """Logs the change of ``units`` (besides those the helpers below marked) and tells the listeners."""
        self._dirty.update(units)
        self._save_state()
        for listener in self.listeners:
            listener()

    def probe_kind(self, fd: int) -> tuple[FdKind, str]:
        """What an fd is: a memfd, or a LUO session (with its name).  Anything else is refused, and so is
        what PRESERVE_FD would refuse in the blackout: an O_PATH fd (the kernel's fget() does not see it;
        a read-only reopen it preserves, tests/contract/test_rules.py)."""
        try:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH:
                raise InvalidFd(f"{describe_fd(fd)} is an O_PATH fd, which the kernel cannot preserve")
            if syscalls.is_memfd_like(fd):
                return FdKind.MEMFD, ""
        except OSError as e:
            raise InvalidFd(f"fd {fd} cannot be inspected: {e.strerror}") from None
        try:
            return FdKind.SESSION, self.backend.session_name(fd).decode(errors="backslashreplace")
        except KernelError:
            pass
        raise InvalidFd(f"{describe_fd(fd)} cannot be carried across a live update (only memfds and LUO sessions)")

    # -- the fd-store-like API, for a unit's own entries

    def store(self, caller: Caller, unit: str, items: list[tuple[str, OwnedFd]]) -> None:
        """Stores named fds for a unit, taking the received fds over (those left are the caller's to close).
        A stored name is replaced."""
        unit = authz.authorize(caller, unit)
        policy = self._policy(unit)
        state = self.units.get(unit)
        if self.armed and state is not None and state.out_session is not None:
            raise WrongPhase(f"{unit} was already preserved for the live update under way")
        probed: list[tuple[str, OwnedFd, FdKind, str]] = []
        for name, fd in items:
            names.check_fd_name(name)
            if any(p[0] == name for p in probed):
                raise LimitExceeded(f"fd name {name!r} appears twice in one call")
            try:
                kind, session = self.probe_kind(fd.fileno())
            except InvalidFd as e:
                journal.event(
                    journal.REFUSED, f"Refused '{name}' of {unit}: {e}", unit=unit, fdname=name, level=journal.WARNING
                )
                raise InvalidFd(f"Refusing to store {name!r} of {unit}: {e}") from None
            if kind is FdKind.SESSION and (self._holds_session(session) or any(p[3] == session for p in probed)):
                raise InvalidFd(
                    f"Refusing to store {name!r} of {unit}: the agent holds LUO session {session!r} already"
                )
            probed.append((name, fd, kind, session))
        added = sum(1 for p in probed if state is None or p[0] not in state.stored)
        if (len(state.stored) if state else 0) + added > policy.fd_max:
            raise LimitExceeded(f"{unit} may store at most {policy.fd_max} fds (FileDescriptorMax=)")
        self._count_stored(self._dirty)  # changed since the last log (a failed call's rollback): normally none
        if self._stored_total + added > self.config.max_fds_total:
            raise LimitExceeded(f"the agent holds at most {self.config.max_fds_total} fds in all")
        replaced = {p[0] for p in probed}
        kept = [e.held.fd for e in (state.stored.values() if state else ()) if e.name not in replaced]
        pinned = sum(memfd_bytes(fd) for fd in kept) + sum(memfd_bytes(p[1].fileno()) for p in probed)
        if pinned > policy.bytes_max:
            raise LimitExceeded(
                f"{unit} would pin {pinned} bytes across the live update (holes count: preserve fills them); "
                f"its budget is {policy.bytes_max} (BytesMax=)"
            )
        state = self._unit(unit)
        before = dict(state.stored)
        for name, fd, kind, session in probed:
            state.stored.pop(name, None)
            state.stored[name] = Entry(name, kind, state.next_order, self._hold_received(fd, kind), session)
            state.next_order += 1
        if policy.preserve_at is PreserveAt.STORE:
            if any(name in state.preserved for name, *_ in probed):
                self._drop_out_session(state)  # the session holds the replaced files: preserve anew
            try:
                self._preserve_unit(state, policy)
            except LuoError:
                for name, *_ in probed:  # roll back: nothing half-applied
                    self._release(state.stored.pop(name).held)
                state.stored.update(before)
                state.stored = dict(sorted(state.stored.items(), key=lambda kv: kv[1].order))
                self._preserve_unit(state, policy)
                raise
            self._write_manifest(unit)
        for name, _, kind, _ in probed:
            old = before.get(name)
            if old is not None:
                self._release(old.held)
            journal.event(journal.STORED, f"Stored {kind.value} '{name}' of {unit}", unit=unit, fdname=name)
        self._changed(unit)

    def _hold_received(self, fd: OwnedFd, kind: FdKind) -> Held:
        """A client's fd, held: a memfd is mirrored in the fd store as a new open file of its own.  The
        client's open file may be one the fd store has already (the unit stores back what luod handed it
        after a live update, or a dup of what it stored), and systemd keeps one copy of an open file: it
        would drop the push, and the fd with its key when the older entry is released."""
        if kind is not FdKind.MEMFD:
            return self._hold(fd)  # a session: never one luod holds (``_holds_session``)
        return Held.take(fd, self._mirror(fd.fileno()))

    def _holds_session(self, name: str) -> bool:
        """Whether ``name`` is a LUO session luod holds: one of its own ('luod', 'luod/...': the manifest,
        the units' sessions and their client sessions) or one a unit stored.  Storing it again would store
        the same open file twice (see ``_hold_received``)."""
        if name == names.MANIFEST_SESSION or name.startswith(names.SESSION_PREFIX):
            return True
        return any(
            e.kind is FdKind.SESSION and e.session == name
            for state in self.units.values()
            for e in itertools.chain(state.stored.values(), state.restored.values())
        )

    def remove(self, caller: Caller, unit: str, fd_names: list[str]) -> None:
        unit = authz.authorize(caller, unit)
        state = self.units.get(unit)
        missing = [n for n in fd_names if state is None or n not in state.stored]
        if missing:
            raise NotFound(f"{unit} has no stored fd named {', '.join(repr(n) for n in missing)}")
        if state is None or not fd_names:
            return
        for name in fd_names:
            self._release(state.stored.pop(name).held)
        if state.out_session is not None:
            # LUO cannot unpreserve one file: closing the session unpreserves all; preserve the rest again.
            self._drop_out_session(state)
            self._preserve_unit(state, self._policy(unit))
            self._write_manifest(unit)
        self._changed(unit)

    def list_fds(self, caller: Caller, unit: str) -> list[FdInfo]:
        unit = authz.authorize(caller, unit)
        self._restored_first(unit)
        state = self.units.get(unit)
        if state is None:
            return []
        rows = [(e, "preserved" if e.name in state.preserved else "stored") for e in state.stored.values()]
        rows += [(e, "restored") for e in state.restored.values()]
        return [FdInfo(e.name, e.kind.value, s, e.order, e.session) for e, s in rows]

    def retrieve(self, caller: Caller, unit: str, fd_names: list[str], limit: int) -> list[tuple[str, int]]:
        """The fds restored for a unit after a live update (all if ``fd_names`` is empty), as new dups;
        at most ``limit`` (what one reply of the interface carries)."""
        unit = authz.authorize(caller, unit)
        self._restored_first(unit)
        state = self.units.get(unit)
        restored = state.restored if state else {}
        if len(set(fd_names)) != len(fd_names):
            raise InvalidRequest("a name appears more than once")
        if len(fd_names) > limit:
            raise LimitExceeded(f"at most {limit} fds per reply: ask by name, in batches")
        missing = [n for n in fd_names if n not in restored]
        if missing:
            raise NotFound(f"{unit} has no restored fd named {', '.join(repr(n) for n in missing)}")
        chosen = [restored[n] for n in fd_names] if fd_names else sorted(restored.values(), key=lambda e: e.order)
        if len(chosen) > limit:
            raise LimitExceeded(f"{len(chosen)} fds were restored, at most {limit} fit a reply: ask by name")
        return list(zip([e.name for e in chosen], dup_all([e.held.fd for e in chosen])))

    def finish(self, caller: Caller, unit: str) -> bool:
        """Ends the unit's restore: FINISH its incoming session; its restored memfds become stored fds again
        (carried into the next update).  False if there was nothing to finish."""
        unit = authz.authorize(caller, unit)
        state = self.units.get(unit)
        if state is None or state.finished:
            return False
        self._finish_unit(state)
        self._changed(unit)
        return True

    def _finish_unit(self, state: UnitState) -> None:
        self._dirty.add(state.unit)
        if state.in_session is not None:
            try:
                self.backend.finish(state.in_session.fd)
                crash_point("finished the session of " + state.unit)
            except KernelError as e:
                log.warning("Failed to finish the session of %s: %s", state.unit, e, extra=journal.about(state.unit))
            self._release(state.in_session)
            state.in_session = None
        for held in state.restored_client_sessions.values():
            self._release(held)  # the unit holds its own copies
        state.restored_client_sessions.clear()
        for entry in sorted(state.restored.values(), key=lambda e: e.order):
            if entry.kind is FdKind.MEMFD and entry.name not in state.stored:
                entry.order = state.next_order
                state.next_order += 1
                state.stored[entry.name] = entry
            else:
                self._release(entry.held)
        state.restored.clear()
        state.finished = True
        remove_file(self.env_file(state.unit))
        policy = self.policy_of(state.unit)
        if policy is not None and policy.preserve_at is PreserveAt.STORE and state.stored:
            self._preserve_unit(state, policy)
            self._write_manifest(state.unit)
        journal.event(journal.FINISHED, f"Finished the live update of {state.unit}", unit=state.unit)

    # -- client sessions (the LUOD model)

    def create_session(self, caller: Caller, unit: str, name: str) -> int:
        """A named outgoing LUO session of the unit's own; the agent keeps it alive until the kexec."""
        unit = authz.authorize(caller, unit)
        policy = self._policy(unit)
        names.check_client_session_name(name)
        if policy.sessions and name not in policy.sessions:
            raise AccessDenied(f"{unit} may create only the sessions in Sessions= ({' '.join(policy.sessions)})")
        state = self._unit(unit)
        held = state.client_sessions.get(name)
        if held is None:
            if len(state.client_sessions) >= policy.fd_max:
                raise LimitExceeded(f"{unit} may hold at most {policy.fd_max} sessions")
            with self.backend.device() as dev:
                fd = OwnedFd(dev.create_session(names.client_session_name(unit, name).encode()))
            held = state.client_sessions[name] = self._hold(fd)
            self._write_manifest(unit)
            self._changed(unit)
        return os.dup(held.fd)

    def retrieve_session(self, caller: Caller, unit: str, name: str) -> int:
        unit = authz.authorize(caller, unit)
        state = self.units.get(unit)
        held = state.restored_client_sessions.get(name) if state else None
        if held is None:
            raise NotFound(f"{unit} has no restored session named {name!r}")
        return os.dup(held.fd)

    # -- live update

    def preserve(self, caller: Caller, unit: str) -> int:
        """The stop hook: preserve the unit's fds if a live update is under way.  Returns how many files
        its session holds (0: nothing to do)."""
        unit = authz.authorize(caller, unit)
        state = self.units.get(unit)
        if not self.armed or state is None or not state.stored or unit in self.left_out:
            return len(state.preserved) if state else 0
        self._preserve_unit(state, self._policy(unit))
        last = unit in self._awaiting and len(self._awaiting) == 1
        self._awaiting.discard(unit)
        self._write_manifest(*(() if last else (unit,)))
        self._changed(unit)
        return len(state.preserved)

    def _preserve_unit(self, state: UnitState, policy: Policy) -> None:
        """Preserves the unit's carried memfds, in store order (tokens 1..n), into its session luod/UNIT."""
        wanted = tuple(e.name for e in state.stored.values() if e.kind is FdKind.MEMFD and policy.carries(e.name))
        if state.unit in self.left_out:
            wanted = ()  # its fds stay held and go at the kexec, as at an ordinary reboot
        if state.out_session is not None and state.preserved == wanted:
            return
        self._drop_out_session(state)  # marks the unit changed
        if not wanted:
            return
        with self.backend.device() as dev:
            session = self._outgoing(dev.create_session(names.unit_session_name(state.unit).encode()))
            crash_point("created the session of " + state.unit)
        try:
            for token, name in enumerate(wanted, start=1):
                self.backend.preserve_fd(session.fd, state.stored[name].held.fd, token)
                crash_point(f"preserved {state.unit} token {token}")
        except KernelError as e:
            self._release(session)  # unpreserves what was preserved
            journal.event(
                journal.REFUSED,
                f"Failed to preserve '{name}' of {state.unit}: {e.reason}",
                unit=state.unit,
                fdname=name,
                level=journal.ERROR,
            )
            raise
        state.out_session, state.preserved = session, wanted
        journal.event(journal.PRESERVED, f"Preserved {len(wanted)} fd(s) of {state.unit}", unit=state.unit)

    def _drop_out_session(self, state: UnitState) -> None:
        self._dirty.add(state.unit)
        self._release(state.out_session)
        state.out_session = None
        state.preserved = ()

    def _carried(self, unit: str, left_out: frozenset[str]) -> Optional[CarriedUnit]:
        """What the next live update carries of a unit, for the manifest (None: nothing, or left out)."""
        state = self.units.get(unit)
        if state is None or unit in left_out:
            return None
        fds = [
            CarriedFd(n, FdKind.MEMFD, state.stored[n].order, token=t) for t, n in enumerate(state.preserved, start=1)
        ]
        sessions = [e for e in state.stored.values() if e.kind is FdKind.SESSION]
        policy = self.policy_of(state.unit) if sessions else None  # a file read: only where it matters
        fds += [
            CarriedFd(e.name, FdKind.SESSION, e.order, session=e.session)
            for e in sessions
            if policy is None or policy.carries(e.name)
        ]
        clients = tuple((n, names.client_session_name(state.unit, n)) for n in state.client_sessions)
        if not fds and not clients:
            return None
        session = names.unit_session_name(state.unit) if state.out_session else ""
        return CarriedUnit(state.unit, session, tuple(sorted(fds, key=lambda f: f.order)), clients)

    def _manifest_record(self, units: tuple[CarriedUnit, ...]) -> Manifest:
        return Manifest(self.update_count + 1, time.time_ns() // 1000, self._kernel, units)

    def manifest(self) -> Manifest:
        """The whole manifest the next live update would carry."""
        left_out = self.left_out
        return self._manifest_record(tuple(c for c in (self._carried(u, left_out) for u in self.units) if c))

    def _write_manifest(self, *units: str) -> None:
        """Brings the manifest session 'luod' up to date.  With ``units`` (all that changed): one record of
        theirs at the next token (manifest.py).  Without (the arm, its last awaited Preserve), once the records
        outnumber twice the units carried (plus a floor), or after a failure: a new session whose token 0 is
        the whole manifest, so that a change costs what changed, amortised.  None carried: no session."""
        if units and self._manifest_synced:
            left_out = self.left_out
            record = tuple(c for c in (self._carried(u, left_out) for u in units) if c)
            now = {c.unit for c in record}
            gone = tuple(u for u in units if u in self._carrying and u not in now)
            if not record and not gone:
                return  # carried neither before nor now
            # Counted, not copied: the set of every unit carried is not rebuilt at each unit's change.
            carrying = len(self._carrying) + len(now.difference(self._carrying)) - len(gone)
            if (
                self.manifest_session is not None
                and carrying
                and self._manifest_tokens <= 2 * carrying + MANIFEST_SLACK
            ):
                try:
                    self._preserve_manifest(self._manifest_tokens, self._manifest_record(record).encode(gone))
                except (KernelError, OSError):
                    self._drop_manifest()  # never a manifest wrong about a unit: none until written whole
                    raise
                self._manifest_tokens += 1
                self._carrying.update(now)
                self._carrying.difference_update(gone)
                return
        manifest = self.manifest()
        self._drop_manifest()
        if manifest.units:
            with self.backend.device() as dev:
                self.manifest_session = self._outgoing(dev.create_session(names.MANIFEST_SESSION.encode()))
                crash_point("created the manifest session")
            try:
                self._preserve_manifest(MANIFEST_TOKEN, manifest.encode())
            except (KernelError, OSError):
                self._drop_manifest()
                raise
            self._manifest_tokens, self._carrying = 1, {u.unit for u in manifest.units}
            journal.event(journal.MANIFEST, f"Manifest written: {len(manifest.units)} unit(s) to carry")
        self._manifest_synced = True

    def _drop_manifest(self) -> None:
        if self.manifest_session is self._unfinished:
            self._unfinished = None  # the incoming manifest's session, whose close is its FINISH
        self._release(self.manifest_session)
        self.manifest_session, self._manifest_tokens, self._carrying = None, 0, set()
        self._manifest_synced = False

    def _preserve_manifest(self, token: int, record: bytes) -> None:
        assert self.manifest_session is not None
        fd = sealed_memfd("luod-manifest", record)
        try:
            self.backend.preserve_fd(self.manifest_session.fd, fd, token)
            crash_point(f"preserved the manifest's token {token}")
        finally:
            os.close(fd)

    def preflight(self, caller: Caller = AGENT, open_device: bool = True) -> list[Problem]:
        """Everything that would make a live update lose data, found before anything is stopped.  A caller
        other than root sees the system's problems and its own unit's.  ``open_device=False`` leaves out
        whether /dev/liveupdate opens (see ``summary``)."""
        return [p for p in self._preflight(open_device) if not p.unit or authz.sees_unit(caller, p.unit)]

    def _preflight(self, open_device: bool = True) -> list[Problem]:
        problems: list[Problem] = []
        try:
            if open_device:
                with self.backend.device():
                    pass
        except KernelError as e:
            if isinstance(e, DeviceBusy) and not self.last_try:
                raise  # when_free tries again later, without blocking the event loop
            problems.append(Problem("", f"LUO is not usable: {e}"))
        inodes: dict[tuple[int, int], str] = {}
        for state in self.units.values():
            policy = self.policy_of(state.unit)
            if policy is None and state.stored:
                problems.append(
                    Problem(
                        state.unit,
                        "has stored fds but no [X-LiveUpdate] section any more "
                        f"(liveupdatectl discard {state.unit} frees them)",
                    )
                )
            for entry in state.stored.values():
                where = f"'{entry.name}' of {state.unit}"
                if entry.kind is FdKind.MEMFD:
                    st = os.fstat(entry.held.fd)
                    other = inodes.setdefault((st.st_dev, st.st_ino), where)
                    if other != where:
                        problems.append(
                            Problem(
                                state.unit,
                                f"{where} is the same file as {other}: the kernel preserves a file only once",
                            )
                        )
        for check in self.extra_checks:
            problems += check()
        return judged(problems, self.policy_of)

    def carried_memfds(self) -> list[tuple[str, int]]:
        """(unit, fd) of every stored memfd the next live update would carry (for the memory check)."""
        out = []
        for state in self.units.values():
            policy = self.policy_of(state.unit)
            if policy is not None:
                out += [
                    (state.unit, e.held.fd)
                    for n, e in state.stored.items()
                    if e.kind is FdKind.MEMFD and policy.carries(n)
                ]
        return out

    def arm(self, caller: Caller, force: bool = False) -> list[Problem]:
        """A live update is decided: from now on units are preserved as they stop."""
        authz.require_root(caller, "Starting a live update")
        problems = self._preflight()
        blocking = refusing(problems)
        if blocking and not force:
            raise PreflightFailed("Pre-flight check failed: " + "; ".join(p.line() for p in blocking))
        for p in blocking:
            log.warning("Live update forced despite: %s", p.line())
        # The kernel refuses to preserve a retrieved file before its session is finished.
        for state in self.units.values():
            if not state.finished:
                self._finish_unit(state)
        self.armed = True
        self.problems = refusing(self.problems) + [p for p in problems if p.left_out]
        for unit in sorted(self.left_out):
            journal.event(
                journal.LEFT_OUT,
                f"Leaving {unit} out of the live update: "
                + "; ".join(p.message for p in problems if p.unit == unit)
                + " (OnPreflightFailure=leave-out): it stops and starts as at a reboot, its fds are not carried",
                unit=unit,
                level=journal.WARNING,
            )
            if unit in self.units:
                self._drop_out_session(self.units[unit])  # PreserveAt=store preserved it already
        self._write_manifest()
        left_out = self.left_out
        self._awaiting = {s.unit for s in self.units.values() if s.stored and s.unit not in left_out}
        self._changed()
        log.info("Live update armed: units are preserved as they stop")
        return problems

    def cancel(self, caller: Caller) -> None:
        """Calls the live update off: stop-mode units are unpreserved (their fds stay stored)."""
        authz.require_root(caller, "Cancelling a live update")
        if not self.armed:
            raise WrongPhase("No live update is under way")
        self.armed = False
        self._awaiting.clear()
        left_out, self.problems = self.left_out, refusing(self.problems)
        for state in self.units.values():
            policy = self.policy_of(state.unit)
            if policy is None or policy.preserve_at is not PreserveAt.STORE:
                self._drop_out_session(state)
            elif state.unit in left_out and state.stored:
                try:
                    self._preserve_unit(state, policy)  # PreserveAt=store: preserved again, as before the arm
                except LuoError as e:
                    log.warning("%s could not be preserved again: %s", state.unit, e, extra=journal.about(state.unit))
        self._write_manifest()
        self._changed()
        log.info("Live update cancelled")

    def discard(self, caller: Caller, unit: str) -> None:
        """Frees everything the agent holds for a unit (root only)."""
        authz.require_root(caller, "Discarding a unit's fds")
        names.check_unit_name(unit)
        state = self.units.pop(unit, None)
        if state is None:
            raise NotFound(f"The agent holds nothing for {unit}")
        if state.in_session is not None:
            try:
                self.backend.finish(state.in_session.fd)
            except KernelError:
                pass
        for held in state.held():
            self._release(held)
        remove_file(self.env_file(unit))
        self._write_manifest(unit)
        self._changed(unit)
        log.info("Discarded everything held for %s", unit, extra=journal.about(unit))

    def status(self, caller: Caller) -> AgentStatus:
        """The agent's state; a caller other than root sees only its own unit."""
        supported = True
        try:
            with self.backend.device():  # no retries: a busy device is a supported one
                pass
        except KernelError as e:
            supported = e.name != "NotSupported"
        self.supported = supported
        return self.summary(caller)

    def summary(self, caller: Caller = AGENT) -> AgentStatus:
        """``status`` without opening /dev/liveupdate (``supported`` as last seen): for a look on luod's own
        initiative (the metrics), which must never hold the single-open device when systemd-shutdown (>= 261)
        opens it at the kexec."""
        return AgentStatus(
            phase=self.phase.value,
            supported=self.supported,
            backend=self.backend.kind,
            live_update_count=self.update_count,
            units=tuple(
                UnitStatus(s.unit, len(s.stored), len(s.preserved), len(s.restored), len(s.client_sessions), s.finished)
                for s in sorted(self.units.values(), key=lambda s: s.unit)
                if authz.sees_unit(caller, s.unit)
            ),
            problems=tuple(p for p in self.problems if not p.unit or authz.sees_unit(caller, p.unit)),
        )

    # -- after the kexec

    def env_file(self, unit: str) -> str:
        return os.path.join(self.config.env_dir, unit)  # no suffix: a 255-character unit name fits NAME_MAX

    def begin_restore(self) -> Optional[Manifest]:
        """At start-up: takes over what the previous kernel's agent carried, up to the memfds: the manifest,
        every unit's LUO sessions and its environment file, with the device open once.  None on a cold boot.

        The memfds follow after READY=1, a unit at a time (``restore_step``), first for a unit whose fds are
        asked for (``_restored_first``): a live-updated unit waits only for its own fds.  Until the restore
        ends nothing is logged and only calls that read run, so a crash in between restores again; the
        manifest's session is finished last, after the log holds everything restored (invariant 3).
        Sessions a predecessor retrieved before it crashed come from the fd store (``recover``): the kernel
        gives a session only once."""
        with self.backend.device(self.config.busy_retries) as dev:
            try:
                luod = self._retrieve_session(dev, names.MANIFEST_SESSION)
            except NoSuchSession:
                self._changed()  # the retired keys of a crashed predecessor leave the fd store
                return None  # a cold boot, or nothing was carried
            try:
                manifest = read_manifest(self.backend, luod)
            except (BadManifest, KernelError) as e:
                # Never guess: the sessions stay pinned until the next kexec and nothing is restored.
                self.problems.append(Problem("", f"Refusing the manifest of the previous kernel: {e}"))
                journal.event(
                    journal.REFUSED, f"Refusing the manifest of the previous kernel: {e}", level=journal.CRITICAL
                )
                self.manifest_session = self._hold(OwnedFd(luod))
                self._changed()
                return None
            self._incoming = self._hold(OwnedFd(luod))
            self.update_count = manifest.update_count
            for carried in manifest.units:
                try:
                    self._take_sessions(dev, carried)
                except (KernelError, OSError) as e:
                    self._lost(carried.unit, e)
                else:
                    self._pending[carried.unit] = carried
        for leftover in self._retrieved.values():
            os.close(leftover)
        self._retrieved.clear()
        return manifest

    @property
    def restoring(self) -> bool:
        """Between ``begin_restore`` and the end of the restore."""
        return self._incoming is not None

    def restore_step(self) -> None:
        """The memfds of the next unit; once every unit has them, the end of the restore: everything restored
        is logged, and the calls that wait for it may run.  The manifest's session is finished after their
        answers (``finish_manifest``)."""
        if self._pending:
            self._restore_memfds(self._pending.pop(next(iter(self._pending))))
            return
        self.at_end()
        incoming, self._incoming = self._incoming, None
        assert incoming is not None
        self.manifest_session = self._unfinished = incoming
        self._changed()
        log.info("Live update %d: every carried fd is back", self.update_count)

    def finish_manifest(self) -> None:
        """FINISHes the incoming manifest's session, once the restore has ended and the calls that waited for
        it are answered: no unit waits for this.  Until then a crash leaves it to be closed, which is an
        implicit FINISH, as is writing the next manifest whole (``_drop_manifest``)."""
        incoming, self._unfinished = self._unfinished, None
        if incoming is None:
            return
        self.backend.finish(incoming.fd)
        crash_point("finished the incoming manifest")
        self.manifest_session = None
        self._release(incoming)
        self._changed()

    def _restored_first(self, unit: str) -> None:
        """A unit asks for its fds while the restore is under way: its memfds come before the others'."""
        carried = self._pending.pop(unit, None)
        if carried is not None:
            self._restore_memfds(carried)

    def _retrieve_session(self, dev: Device, name: str) -> int:
        got = self._retrieved.pop(name, None)
        if got is None:
            got = dev.retrieve_session(name.encode())
            crash_point("retrieved " + name)
        return got

    def _take_sessions(self, dev: Device, carried: CarriedUnit) -> None:
        state = self._unit(carried.unit)
        self._dirty.add(state.unit)
        state.finished, state.restored_at = False, self.clock()
        if carried.session:
            state.in_session = self._hold(OwnedFd(self._retrieve_session(dev, carried.session)))
        for fd in carried.fds:
            if fd.kind is not FdKind.MEMFD:
                got = self._retrieve_session(dev, fd.session)
                state.restored[fd.name] = Entry(fd.name, fd.kind, fd.order, self._hold(OwnedFd(got)), fd.session)
        for name, session in carried.client_sessions:
            state.restored_client_sessions[name] = self._hold(OwnedFd(self._retrieve_session(dev, session)))
        write_env_file(self.env_file(carried.unit), self.update_count)  # before READY=1: the unit may start

    def _restore_memfds(self, carried: CarriedUnit) -> None:
        state = self.units[carried.unit]
        memfds = [fd for fd in carried.fds if fd.kind is FdKind.MEMFD]
        got: list[OwnedFd] = []
        failed: Optional[Exception] = None
        try:
            for fd in memfds:
                assert state.in_session is not None
                got.append(OwnedFd(self.backend.retrieve_fd(state.in_session.fd, fd.token)))
        except (KernelError, OSError) as e:
            failed = e  # what came back is held all the same
        for fd, held in zip(memfds, self._hold_all(carried.unit, got) if got else ()):
            state.restored[fd.name] = Entry(fd.name, fd.kind, fd.order, held)
        if failed is not None:
            self._lost(carried.unit, failed)
            return
        journal.event(
            journal.RESTORED,
            f"Restored {len(carried.fds)} fd(s) and {len(carried.client_sessions)} session(s) of {carried.unit}",
            unit=carried.unit,
        )

    def _lost(self, unit: str, e: Exception) -> None:
        self.problems.append(Problem(unit, f"could not be restored: {e}"))
        journal.event(journal.LOST, f"Failed to restore {unit}: {e}", unit=unit, level=journal.ERROR)

    def expire_orphans(self) -> list[str]:
        """Units that did not come back within ReturnTimeoutSec= are handled by their OnNoReturn=."""
        expired = []
        for state in list(self.units.values()):
            policy = self.policy_of(state.unit)
            timeout = policy.return_timeout_sec if policy else 0
            if state.finished or self.clock() - state.restored_at < timeout:
                continue
            expired.append(state.unit)
            if policy is None or policy.on_no_return is NoReturn.DISCARD:
                journal.event(
                    journal.LOST,
                    f"{state.unit} did not come back within {timeout}s after the live update: discarding its fds",
                    unit=state.unit,
                    level=journal.WARNING,
                )
                self.discard(AGENT, state.unit)
            else:
                log.warning(
                    "%s did not come back within %ss after the live update: keeping its fds",
                    state.unit,
                    timeout,
                    extra=journal.about(state.unit),
                )
                self._finish_unit(state)
                self._changed()
        return expired

    def next_expiry(self) -> Optional[float]:
        """Seconds until the next OnNoReturn= decision, or None."""
        waits = [
            max(0.0, s.restored_at + p.return_timeout_sec - self.clock())
            for s in self.units.values()
            if not s.finished and (p := self.policy_of(s.unit)) is not None
        ]
        return min(waits, default=None)

    # -- surviving an agent crash: a log of the state in the fd store, next to the fds (state.py)

    def _save_state(self) -> None:
        self._split()
        self._next_key += 1  # the key of a new log, if this change starts one
        globals_ = Globals(self._next_key, self.armed, self.update_count, self.manifest_session)
        key = f"{STATE_KEY_PREFIX}{self._next_key}"
        self._log.save(globals_, self.problems, self.units, self._dirty, key)
        self._count_stored(self._dirty)
        self._dirty.clear()

    def _count_stored(self, units: Iterable[str]) -> None:
        """Brings the count of stored fds up to date for ``units``.  Counted where the state log records
        what changed (every change marks its units, which the log depends on too): a Store checks
        max_fds_total without a pass over every unit."""
        for unit in units:
            state = self.units.get(unit)
            now = len(state.stored) if state else 0
            self._stored_total += now - self._counted.pop(unit, 0)
            if now:
                self._counted[unit] = now

    def recover(self, fds: dict[str, list[int]]) -> bool:
        """Rebuilds the state from the fds systemd handed back (LISTEN_FDNAMES, by name).  False if there
        was no log: then the incoming sessions among the fds (a predecessor crashed while restoring) are
        kept for ``restore``, by name."""
        states = sorted(
            (k for k in fds if k.startswith(STATE_KEY_PREFIX)), key=lambda k: int(k[len(STATE_KEY_PREFIX) :])
        )
        if not states:
            for key, kept in fds.items():
                sessions = 0
                for fd in kept:
                    try:
                        self._retrieved[self.backend.session_name(fd).decode()] = fd
                        sessions += 1
                    except (KernelError, UnicodeDecodeError):
                        os.close(fd)
                if sessions:
                    self._log.retired.append(key)  # held again under a new key by restore
                else:
                    self.fdstore.drop(key)
            return False
        log_fd = fds[states[-1]][0]
        got = held_state.decode(read_all(log_fd, LOG_MAX), fds)
        self._next_key, self.armed, self.update_count = got.next_key, got.armed, got.update_count
        self.manifest_session, self.problems, self.units = got.manifest_session, got.problems, got.units
        for unit, keys in got.lost.items():  # the rest is recovered: refusing to start would lose it all
            message = f"the fd store lost {len(keys)} fd(s) luod held ({', '.join(keys)}); the rest was recovered"
            self.problems.append(Problem(unit, message))
            journal.event(journal.LOST, f"{unit or 'The manifest'}: {message}", unit=unit or None, level=journal.ERROR)
        self._count_stored(self.units)
        self._log.adopt(Held(log_fd, states[-1]))
        held = [(s.unit, h) for s in self.units.values() for h in s.held()]
        self._groups = {h.store_key: unit for unit, h in held if h.key != h.store_key}
        named = {log_fd, *(h.fd for _, h in held), *([self.manifest_session.fd] if self.manifest_session else [])}
        for key, kept in fds.items():
            if key not in got.used and key != states[-1]:  # older logs, or fds pushed just before a crash
                self.fdstore.drop(key)
            for fd in kept:
                if fd not in named:
                    os.close(fd)
        log.info("Recovered the agent's state from its fd store: %d unit(s), %d fd(s)", len(self.units), len(held))
        self._recreate_outgoing(got.preserved_units)
        return True

    def _recreate_outgoing(self, preserved: list[str]) -> None:
        """After a crash: the outgoing sessions closed with the crashed luod.  Those the state calls for are
        created again (units preserved before, or PreserveAt=store), then the manifest."""
        for state in self.units.values():
            policy = self.policy_of(state.unit)
            if policy is None or not state.finished:
                continue
            if state.unit in preserved or (policy.preserve_at is PreserveAt.STORE and state.stored):
                try:
                    self._preserve_unit(state, policy)
                except LuoError as e:
                    self.problems.append(Problem(state.unit, f"could not be preserved again after a restart: {e}"))
        try:
            self._write_manifest()
        except LuoError as e:
            self.problems.append(Problem("", f"the manifest could not be written after a restart: {e}"))
        self._changed()


def judged(problems: list[Problem], policy_of: Callable[[str], Optional[Policy]]) -> list[Problem]:
    """The pre-flight's problems, a unit's marked left out where its OnPreflightFailure= says so: one unit
    does not veto the others' live update.  Problems of the whole system refuse, and so do those of units
    with no [X-LiveUpdate] section (luod.service; a unit whose section was removed while luod holds its fds:
    nobody said they may go, ``liveupdatectl discard`` does)."""

    def leaves_out(unit: str) -> bool:
        policy = policy_of(unit) if unit else None
        return policy is not None and policy.on_preflight_failure is OnPreflightFailure.LEAVE_OUT

    return [p._replace(left_out=leaves_out(p.unit)) for p in problems]


def memfd_bytes(fd: int) -> int:
    """What preserving a memfd pins: its whole size, holes included (0 for a session)."""
    st = os.fstat(fd)
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def dup_all(fds: list[int]) -> list[int]:
    """Dups of every fd, or none: running out of fds half-way closes what was made."""
    out: list[int] = []
    try:
        for fd in fds:
            out.append(os.dup(fd))
    except OSError as e:
        for fd in out:
            os.close(fd)
        raise LimitExceeded(f"luod cannot hold more fds: {e.strerror}") from None
    return out


def describe_fd(fd: int) -> str:
    target = syscalls.fd_target(fd)
    for prefix, words in (("pipe:", "a pipe"), ("socket:", "a socket"), ("anon_inode:", "an anonymous inode")):
        if target.startswith(prefix):
            return f"{words} ({target})"
    if target.startswith("/memfd:"):
        return f"a hugetlb memfd ({target})"
    if target.startswith("/"):
        return f"the file {target}"
    return f"fd {fd} ({target})"


def read_manifest(backend: Backend, luod: int) -> Manifest:
    """The records of the incoming manifest session, token 0 on until a token is not there (manifest.py)."""
    records: list[bytes] = []
    size = 0
    for token in itertools.count(MANIFEST_TOKEN):
        try:
            fd = backend.retrieve_fd(luod, token)
        except NoSuchToken:
            if token == MANIFEST_TOKEN:
                raise
            break
        try:
            records.append(read_all(fd))
        finally:
            os.close(fd)
        size += len(records[-1])
        if size > MAX_RECORDS_SIZE:
            raise BadManifest(f"the manifest's records exceed {MAX_RECORDS_SIZE} bytes")
    return Manifest.replay(records)


def write_env_file(path: str, update_count: int) -> None:
    """One per unit restored, before READY=1: os.open and one write, not open()'s text layers, and the
    directory made only when it is missing."""
    tmp = os.path.join(os.path.dirname(path), ".writing")  # not PATH.tmp: a 253-character unit name fills NAME_MAX
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        write_all(fd, f"LIVEUPDATE_RESTORED=1\nLIVEUPDATE_COUNT={update_count}\n".encode(), 0)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
