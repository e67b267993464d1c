"""The broker: the agent's state and the rules of every operation, behind the D-Bus and Varlink adapters.

It owns every fd it holds (stored fds, outgoing and incoming sessions, the manifest session) and keeps a
copy of each in the agent's own systemd fd store together with a snapshot of its state, so a restarted
agent (even after SIGKILL) recovers everything.  Methods are synchronous: LUO operations are single
ioctls, and running them one at a time keeps the state consistent.  Every refusal is a ``LuoError`` raised
before anything changed.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import json
import logging
import os
import platform
import time
from typing import Callable, Optional, Protocol

from luo_systemd import journal, names, syscalls
from luo_systemd.errors import (
    AccessDenied,
    BadManifest,
    InvalidFd,
    KernelError,
    LimitExceeded,
    LuoError,
    NoSuchSession,
    NotFound,
    PreflightFailed,
    WrongPhase,
)
from luo_systemd.liveupdate import Backend
from luo_systemd.manifest import MAX_SIZE, CarriedFd, CarriedUnit, FdKind, Manifest
from luo_systemd.policy import NoReturn, Policy, PreserveAt

log = logging.getLogger("luod")

MANIFEST_TOKEN = 0
STATE_VERSION = 1
STATE_KEY_PREFIX = "luod-state-"
HELD_KEY_PREFIX = "luod-fd-"


class Phase(str, enum.Enum):
    IDLE = "idle"
    ARMED = "armed"  # a live update was requested: units are preserved as they stop
    RESTORED = "restored"  # this boot followed a live update; some units have not finished yet


@dataclasses.dataclass(frozen=True)
class Caller:
    uid: int
    pid: int
    unit: Optional[str]  # the unit the caller's process belongs to, from its cgroup

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def describe(self) -> str:
        return f"PID {self.pid} (uid {self.uid}, {self.unit or 'no unit'})"


class FdStore(Protocol):
    """The agent's own systemd fd store (FDSTORE=1 / FDSTOREREMOVE=1)."""

    def keep(self, key: str, fd: int) -> None: ...

    def drop(self, key: str) -> None: ...


class NoFdStore:
    """When the agent runs without a service manager: nothing survives an agent crash."""

    def keep(self, key: str, fd: int) -> None:
        pass

    def drop(self, key: str) -> None:
        pass


@dataclasses.dataclass
class Held:
    """An fd the broker owns, mirrored in the fd store under ``key``."""

    fd: int
    key: str


@dataclasses.dataclass
class Entry:
    """A named fd of a unit: stored for the next update, or restored from the last one."""

    name: str
    kind: FdKind
    order: int
    held: Held
    session: str = ""  # kind SESSION: the LUO session's name


@dataclasses.dataclass
class UnitState:
    unit: str
    stored: dict[str, Entry] = dataclasses.field(default_factory=dict)  # in store order
    next_order: int = 0
    out_session: Optional[Held] = None  # luod/UNIT holding the carried memfds (tokens 1..n)
    preserved: tuple[str, ...] = ()  # the fd names out_session holds, in token order
    client_sessions: dict[str, Held] = dataclasses.field(default_factory=dict)
    # after a live update, until the unit finishes:
    restored: dict[str, Entry] = dataclasses.field(default_factory=dict)
    in_session: Optional[Held] = None
    restored_client_sessions: dict[str, Held] = dataclasses.field(default_factory=dict)
    restored_at: float = 0.0  # CLOCK_BOOTTIME seconds of the restore, for OnNoReturn=
    finished: bool = True

    def held(self) -> list[Held]:
        out = [e.held for e in (*self.stored.values(), *self.restored.values())]
        out += [*self.client_sessions.values(), *self.restored_client_sessions.values()]
        return out + [h for h in (self.out_session, self.in_session) if h is not None]


@dataclasses.dataclass(frozen=True)
class Problem:
    unit: str  # "" for the whole system
    message: str


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    max_fds_total: int = 4096
    busy_retries: int = 5  # EBUSY on /dev/liveupdate (systemd >= 261 opens it briefly): 1.55 s in all
    env_dir: str = "/run/luod/env"  # restore variables, read by the units through EnvironmentFile=-


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Broker:
    def __init__(
        self,
        backend: Backend,
        policy_of: Callable[[str], Optional[Policy]],
        store: FdStore,
        config: BrokerConfig = BrokerConfig(),
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
        self.manifest_session: Optional[Held] = None
        self.problems: list[Problem] = []  # found at restore time, shown in status
        self.listeners: list[Callable[[], None]] = []  # called after every change
        self._next_key = 0
        self._state: Optional[Held] = None

    # -- bookkeeping

    @property
    def phase(self) -> Phase:
        if self.armed:
            return Phase.ARMED
        if any(not u.finished for u in self.units.values()):
            return Phase.RESTORED
        return Phase.IDLE

    def _hold(self, fd: int) -> Held:
        self._next_key += 1
        held = Held(fd=fd, key=f"{HELD_KEY_PREFIX}{self._next_key}")
        self.fdstore.keep(held.key, fd)
        return held

    def _release(self, held: Optional[Held]) -> None:
        if held is not None:
            self.fdstore.drop(held.key)
            os.close(held.fd)

    def _unit(self, unit: str) -> UnitState:
        return self.units.setdefault(unit, UnitState(unit=unit))

    def _policy(self, unit: str) -> Policy:
        policy = self.policy_of(unit)
        if policy is None:
            raise AccessDenied(f"{unit} has not opted in to live updates (it has no [X-LiveUpdate] section)")
        return policy

    def _changed(self) -> None:
        self._save_state()
        for listener in self.listeners:
            listener()

    def authorize(self, caller: Caller, unit: str) -> str:
        """The unit a caller acts on: its own (``unit`` empty or equal), or any unit if it is root."""
        if not unit:
            if caller.unit is None:
                raise AccessDenied(f"{caller.describe()} is not part of a unit; name the unit explicitly")
            return caller.unit
        names.check_unit_name(unit)
        if unit != caller.unit and not caller.is_root:
            raise AccessDenied(f"{caller.describe()} may act only on its own unit, not on {unit}")
        return unit

    @staticmethod
    def require_root(caller: Caller, what: str) -> None:
        if not caller.is_root:
            raise AccessDenied(f"{what} is for root only; {caller.describe()} is not root")

    def probe_kind(self, fd: int) -> tuple[FdKind, str]:
        """What an fd is: a memfd, or a LUO session (with its name).  Anything else is refused."""
        try:
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

    def store(self, caller: Caller, unit: str, items: list[tuple[str, int]]) -> None:
        """Stores named fds for a unit (as dups; the caller keeps its fds).  A stored name is replaced."""
        unit = self.authorize(caller, unit)
        policy = self._policy(unit)
        state = self.units.get(unit)
        if self.armed and state is not None and state.out_session is not None:
            raise WrongPhase(f"{unit} was already preserved for the live update under way")
        probed: list[tuple[str, int, FdKind, str]] = []
        for name, fd in items:
            names.check_fd_name(name)
            if any(p[0] == name for p in probed):
                raise LimitExceeded(f"fd name {name!r} appears twice in one call")
            try:
                kind, session = self.probe_kind(fd)
            except InvalidFd as e:
                journal.event(
                    journal.REFUSED, f"Refused '{name}' of {unit}: {e}", unit=unit, fdname=name, level=logging.WARNING
                )
                raise InvalidFd(f"Refusing to store {name!r} of {unit}: {e}") from None
            probed.append((name, fd, kind, session))
        added = sum(1 for p in probed if state is None or p[0] not in state.stored)
        if (len(state.stored) if state else 0) + added > policy.fd_max:
            raise LimitExceeded(f"{unit} may store at most {policy.fd_max} fds (FileDescriptorMax=)")
        if sum(len(u.stored) for u in self.units.values()) + added > self.config.max_fds_total:
            raise LimitExceeded(f"the agent holds at most {self.config.max_fds_total} fds in all")
        state = self._unit(unit)
        before = dict(state.stored)
        for name, fd, kind, session in probed:
            state.stored.pop(name, None)
            state.stored[name] = Entry(name, kind, state.next_order, self._hold(os.dup(fd)), session)
            state.next_order += 1
        if policy.preserve_at is PreserveAt.STORE:
            try:
                self._preserve_unit(state, policy)
            except LuoError:
                for name, *_ in probed:  # roll back: nothing half-applied
                    self._release(state.stored.pop(name).held)
                state.stored.update(before)
                state.stored = dict(sorted(state.stored.items(), key=lambda kv: kv[1].order))
                self._preserve_unit(state, policy)
                raise
            self._write_manifest()
        for name, _, kind, _ in probed:
            old = before.get(name)
            if old is not None:
                self._release(old.held)
            journal.event(journal.STORED, f"Stored {kind.value} '{name}' of {unit}", unit=unit, fdname=name)
        self._changed()

    def remove(self, caller: Caller, unit: str, fd_names: list[str]) -> None:
        unit = self.authorize(caller, unit)
        state = self.units.get(unit)
        missing = [n for n in fd_names if state is None or n not in state.stored]
        if missing:
            raise NotFound(f"{unit} has no stored fd named {', '.join(repr(n) for n in missing)}")
        assert state is not None
        for name in fd_names:
            self._release(state.stored.pop(name).held)
        if state.out_session is not None:
            # LUO cannot unpreserve one file: closing the session unpreserves all; preserve the rest again.
            self._drop_out_session(state)
            self._preserve_unit(state, self._policy(unit))
            self._write_manifest()
        self._changed()

    def list_fds(self, caller: Caller, unit: str) -> list[dict[str, object]]:
        unit = self.authorize(caller, unit)
        state = self.units.get(unit)
        if state is None:
            return []
        rows = [(e, "preserved" if e.name in state.preserved else "stored") for e in state.stored.values()]
        rows += [(e, "restored") for e in state.restored.values()]
        return [
            {"name": e.name, "kind": e.kind.value, "state": s, "order": e.order, "session": e.session} for e, s in rows
        ]

    def retrieve(self, caller: Caller, unit: str, fd_names: list[str]) -> list[tuple[str, int]]:
        """The fds restored for a unit after a live update (all if ``fd_names`` is empty), as new dups."""
        unit = self.authorize(caller, unit)
        state = self.units.get(unit)
        restored = state.restored if state else {}
        missing = [n for n in fd_names if n not in restored]
        if missing:
            raise NotFound(f"{unit} has no restored fd named {', '.join(repr(n) for n in missing)}")
        chosen = [restored[n] for n in fd_names] if fd_names else sorted(restored.values(), key=lambda e: e.order)
        return [(e.name, os.dup(e.held.fd)) for e in chosen]

    def finish(self, caller: Caller, unit: str) -> bool:
        """Ends the unit's restore: FINISH its incoming session; its restored memfds become stored fds again
        (carried into the next update).  False if there was nothing to finish."""
        unit = self.authorize(caller, unit)
        state = self.units.get(unit)
        if state is None or state.finished:
            return False
        self._finish_unit(state)
        self._changed()
        return True

    def _finish_unit(self, state: UnitState) -> None:
        if state.in_session is not None:
            try:
                self.backend.finish(state.in_session.fd)
            except KernelError as e:
                log.warning("Failed to finish the session of %s: %s", state.unit, e)
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
            self._write_manifest()
        journal.event(journal.FINISHED, f"Finished the live update of {state.unit}", unit=state.unit)

    # -- client sessions (the LUOD model)

    def create_session(self, caller: Caller, unit: str, name: str) -> int:
        """A named outgoing LUO session of the unit's own; the agent keeps it alive until the kexec."""
        unit = self.authorize(caller, unit)
        policy = self._policy(unit)
        names.check_client_session_name(name)
        if policy.sessions and name not in policy.sessions:
            raise AccessDenied(f"{unit} may create only the sessions in Sessions= ({' '.join(policy.sessions)})")
        state = self._unit(unit)
        held = state.client_sessions.get(name)
        if held is None:
            if len(state.client_sessions) >= policy.fd_max:
                raise LimitExceeded(f"{unit} may hold at most {policy.fd_max} sessions")
            with self.backend.device(self.config.busy_retries) as dev:
                fd = dev.create_session(names.client_session_name(unit, name).encode())
            held = state.client_sessions[name] = self._hold(fd)
            self._write_manifest()
            self._changed()
        return os.dup(held.fd)

    def retrieve_session(self, caller: Caller, unit: str, name: str) -> int:
        unit = self.authorize(caller, unit)
        state = self.units.get(unit)
        held = state.restored_client_sessions.get(name) if state else None
        if held is None:
            raise NotFound(f"{unit} has no restored session named {name!r}")
        return os.dup(held.fd)

    # -- live update

    def preserve(self, caller: Caller, unit: str) -> int:
        """The stop hook: preserve the unit's fds if a live update is under way.  Returns how many files
        its session holds (0: nothing to do)."""
        unit = self.authorize(caller, unit)
        state = self.units.get(unit)
        if not self.armed or state is None or not state.stored:
            return len(state.preserved) if state else 0
        self._preserve_unit(state, self._policy(unit))
        self._write_manifest()
        self._changed()
        return len(state.preserved)

    def _preserve_unit(self, state: UnitState, policy: Policy) -> None:
        """Preserves the unit's carried memfds, in store order (tokens 1..n), into its session luod/UNIT."""
        wanted = tuple(e.name for e in state.stored.values() if e.kind is FdKind.MEMFD and policy.carries(e.name))
        if state.out_session is not None and state.preserved == wanted:
            return
        self._drop_out_session(state)
        if not wanted:
            return
        with self.backend.device(self.config.busy_retries) as dev:
            session = self._hold(dev.create_session(names.unit_session_name(state.unit).encode()))
        try:
            for token, name in enumerate(wanted, start=1):
                self.backend.preserve_fd(session.fd, state.stored[name].held.fd, token)
        except KernelError as e:
            self._release(session)  # unpreserves what was preserved
            journal.event(
                journal.REFUSED,
                f"Failed to preserve '{name}' of {state.unit}: {e.reason}",
                unit=state.unit,
                fdname=name,
                level=logging.ERROR,
            )
            raise
        state.out_session, state.preserved = session, wanted
        journal.event(journal.PRESERVED, f"Preserved {len(wanted)} fd(s) of {state.unit}", unit=state.unit)

    def _drop_out_session(self, state: UnitState) -> None:
        self._release(state.out_session)
        state.out_session = None
        state.preserved = ()

    def manifest(self) -> Manifest:
        units = []
        for state in self.units.values():
            policy = self.policy_of(state.unit)
            fds = [
                CarriedFd(n, FdKind.MEMFD, state.stored[n].order, token=t)
                for t, n in enumerate(state.preserved, start=1)
            ]
            fds += [
                CarriedFd(e.name, FdKind.SESSION, e.order, session=e.session)
                for e in state.stored.values()
                if e.kind is FdKind.SESSION and (policy is None or policy.carries(e.name))
            ]
            clients = tuple((n, names.client_session_name(state.unit, n)) for n in state.client_sessions)
            if fds or clients:
                session = names.unit_session_name(state.unit) if state.out_session else ""
                units.append(CarriedUnit(state.unit, session, tuple(sorted(fds, key=lambda f: f.order)), clients))
        return Manifest(self.update_count + 1, time.time_ns() // 1000, platform.release(), tuple(units))

    def _write_manifest(self) -> None:
        """Replaces the session 'luod' by one whose token 0 is the current manifest (a sealed memfd)."""
        manifest = self.manifest()
        self._release(self.manifest_session)
        self.manifest_session = None
        if not manifest.units:
            return
        fd = sealed_memfd("luod-manifest", manifest.encode())
        try:
            with self.backend.device(self.config.busy_retries) as dev:
                session = self._hold(dev.create_session(names.MANIFEST_SESSION.encode()))
            try:
                self.backend.preserve_fd(session.fd, fd, MANIFEST_TOKEN)
            except KernelError:
                self._release(session)
                raise
        finally:
            os.close(fd)
        self.manifest_session = session
        journal.event(journal.MANIFEST, f"Manifest written: {len(manifest.units)} unit(s) to carry")

    def preflight(self) -> list[Problem]:
        """Everything that would make a live update lose data, found before anything is stopped."""
        problems: list[Problem] = []
        try:
            with self.backend.device(self.config.busy_retries):
                pass
        except KernelError as e:
            problems.append(Problem("", f"LUO is not usable: {e}"))
        inodes: dict[tuple[int, int], str] = {}
        for state in self.units.values():
            policy = self.policy_of(state.unit)
            if policy is None and state.stored:
                problems.append(Problem(state.unit, "has stored fds but no [X-LiveUpdate] section any more"))
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
        return problems

    def arm(self, caller: Caller, force: bool = False) -> list[Problem]:
        """A live update is decided: from now on units are preserved as they stop."""
        self.require_root(caller, "Starting a live update")
        problems = self.preflight()
        if problems and not force:
            raise PreflightFailed(
                "Pre-flight check failed: "
                + "; ".join(f"{p.unit}: {p.message}" if p.unit else p.message for p in problems)
            )
        for p in problems:
            log.warning("Live update forced despite: %s%s", f"{p.unit}: " if p.unit else "", p.message)
        # The kernel refuses to preserve a retrieved file before its session is finished.
        for state in self.units.values():
            if not state.finished:
                self._finish_unit(state)
        self.armed = True
        self._write_manifest()
        self._changed()
        log.info("Live update armed: units are preserved as they stop")
        return problems

    def cancel(self, caller: Caller) -> None:
        """Calls the live update off: stop-mode units are unpreserved (their fds stay stored)."""
        self.require_root(caller, "Cancelling a live update")
        if not self.armed:
            raise WrongPhase("No live update is under way")
        self.armed = False
        for state in self.units.values():
            policy = self.policy_of(state.unit)
            if policy is None or policy.preserve_at is not PreserveAt.STORE:
                self._drop_out_session(state)
        self._write_manifest()
        self._changed()
        log.info("Live update cancelled")

    def discard(self, caller: Caller, unit: str) -> None:
        """Frees everything the agent holds for a unit (root only)."""
        self.require_root(caller, "Discarding a unit's fds")
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
        self._write_manifest()
        self._changed()
        log.info("Discarded everything held for %s", unit)

    def status(self) -> dict[str, object]:
        supported = True
        try:
            with self.backend.device(self.config.busy_retries):
                pass
        except KernelError as e:
            supported = e.name not in ("NotSupported",)
        return {
            "phase": self.phase.value,
            "supported": supported,
            "backend": self.backend.kind,
            "live_update_count": self.update_count,
            "units": [
                {
                    "unit": s.unit,
                    "stored": len(s.stored),
                    "preserved": len(s.preserved),
                    "restored": len(s.restored),
                    "sessions": len(s.client_sessions),
                    "finished": s.finished,
                }
                for s in sorted(self.units.values(), key=lambda s: s.unit)
            ],
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }

    # -- after the kexec

    def env_file(self, unit: str) -> str:
        return os.path.join(self.config.env_dir, unit + ".env")

    def restore(self) -> Optional[Manifest]:
        """At start-up: takes over what the previous kernel's agent carried.  None on a cold boot."""
        with self.backend.device(self.config.busy_retries) as dev:
            try:
                luod = dev.retrieve_session(names.MANIFEST_SESSION.encode())
            except NoSuchSession:
                return None  # a cold boot, or nothing was carried
            try:
                manifest = read_manifest(self.backend, luod)
            except (BadManifest, KernelError) as e:
                # Never guess: the sessions stay pinned until the next kexec and nothing is restored.
                self.problems.append(Problem("", f"Refusing the manifest of the previous kernel: {e}"))
                journal.event(
                    journal.REFUSED, f"Refusing the manifest of the previous kernel: {e}", level=logging.CRITICAL
                )
                self.manifest_session = self._hold(luod)
                self._changed()
                return None
            self.backend.finish(luod)
            os.close(luod)
            self.update_count = manifest.update_count
            for carried in manifest.units:
                try:
                    self._restore_unit(dev, carried)
                except (KernelError, OSError) as e:
                    self.problems.append(Problem(carried.unit, f"could not be restored: {e}"))
                    journal.event(
                        journal.REFUSED,
                        f"Failed to restore {carried.unit}: {e}",
                        unit=carried.unit,
                        level=logging.ERROR,
                    )
        self._changed()
        return manifest

    def _restore_unit(self, dev: object, carried: CarriedUnit) -> None:
        from luo_systemd.liveupdate import Device  # noqa: PLC0415 - for the type only

        assert isinstance(dev, Device)
        state = self._unit(carried.unit)
        state.finished, state.restored_at = False, self.clock()
        if carried.session:
            state.in_session = self._hold(dev.retrieve_session(carried.session.encode()))
        for fd in carried.fds:
            if fd.kind is FdKind.MEMFD:
                assert state.in_session is not None
                got = self.backend.retrieve_fd(state.in_session.fd, fd.token)
            else:
                got = dev.retrieve_session(fd.session.encode())
            state.restored[fd.name] = Entry(fd.name, fd.kind, fd.order, self._hold(got), fd.session)
        for name, session in carried.client_sessions:
            state.restored_client_sessions[name] = self._hold(dev.retrieve_session(session.encode()))
        write_env_file(self.env_file(carried.unit), self.update_count)
        journal.event(
            journal.RESTORED,
            f"Restored {len(carried.fds)} fd(s) and {len(carried.client_sessions)} session(s) of {carried.unit}",
            unit=carried.unit,
        )

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
                log.warning(
                    "%s did not come back within %ss after the live update: discarding its fds", state.unit, timeout
                )
                self.discard(Caller(0, os.getpid(), None), state.unit)
            else:
                log.warning(
                    "%s did not come back within %ss after the live update: keeping its fds", state.unit, timeout
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

    # -- surviving an agent crash: a snapshot of the state in the fd store, next to the fds

    def snapshot(self) -> dict[str, object]:
        def entry(e: Entry) -> dict[str, object]:
            return {"name": e.name, "kind": e.kind.value, "order": e.order, "key": e.held.key, "session": e.session}

        def key(h: Optional[Held]) -> Optional[str]:
            return h.key if h else None

        return {
            "version": STATE_VERSION,
            "next_key": self._next_key,
            "armed": self.armed,
            "update_count": self.update_count,
            "manifest_session": key(self.manifest_session),
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "units": [
                {
                    "unit": s.unit,
                    "stored": [entry(e) for e in s.stored.values()],
                    "next_order": s.next_order,
                    "out_session": key(s.out_session),
                    "preserved": list(s.preserved),
                    "client_sessions": {n: h.key for n, h in s.client_sessions.items()},
                    "restored": [entry(e) for e in s.restored.values()],
                    "in_session": key(s.in_session),
                    "restored_client_sessions": {n: h.key for n, h in s.restored_client_sessions.items()},
                    "restored_at": s.restored_at,
                    "finished": s.finished,
                }
                for s in self.units.values()
            ],
        }

    def _save_state(self) -> None:
        self._next_key += 1
        key = f"{STATE_KEY_PREFIX}{self._next_key}"
        fd = sealed_memfd("luod-state", json.dumps(self.snapshot()).encode())
        # The new snapshot is in the store before the old one leaves it: a crash between keeps one.
        self.fdstore.keep(key, fd)
        old, self._state = self._state, Held(fd, key)
        self._release(old)

    def recover(self, fds: dict[str, int]) -> bool:
        """Rebuilds the state from the fds systemd handed back (LISTEN_FDNAMES).  False if there was none."""
        states = sorted(
            (k for k in fds if k.startswith(STATE_KEY_PREFIX)), key=lambda k: int(k[len(STATE_KEY_PREFIX) :])
        )
        if not states:
            for key, fd in fds.items():
                self.fdstore.drop(key)
                os.close(fd)
            return False
        doc = json.loads(read_all(fds[states[-1]]))
        if doc.get("version") != STATE_VERSION:
            raise BadManifest(f"agent state version {doc.get('version')!r} is not understood")
        used: set[str] = set(states[-1:])

        def held(key: Optional[str]) -> Optional[Held]:
            if key is None:
                return None
            if key not in fds:
                raise BadManifest(f"the fd store lost {key}")
            used.add(key)
            return Held(fds[key], key)

        def entry(d: dict[str, object]) -> Entry:
            h = held(str(d["key"]))
            assert h is not None
            return Entry(str(d["name"]), FdKind(d["kind"]), int(d["order"]), h, str(d["session"]))  # type: ignore[call-overload]

        self._next_key = int(doc["next_key"])
        self.armed = bool(doc["armed"])
        self.update_count = int(doc["update_count"])
        self.manifest_session = held(doc["manifest_session"])
        self.problems = [Problem(**p) for p in doc["problems"]]
        for u in doc["units"]:
            state = UnitState(
                unit=u["unit"],
                stored={e["name"]: entry(e) for e in u["stored"]},
                next_order=u["next_order"],
                out_session=held(u["out_session"]),
                preserved=tuple(u["preserved"]),
                client_sessions={n: h for n, k in u["client_sessions"].items() if (h := held(k))},
                restored={e["name"]: entry(e) for e in u["restored"]},
                in_session=held(u["in_session"]),
                restored_client_sessions={n: h for n, k in u["restored_client_sessions"].items() if (h := held(k))},
                restored_at=u["restored_at"],
                finished=u["finished"],
            )
            self.units[state.unit] = state
        self._state = Held(fds[states[-1]], states[-1])
        for key, fd in fds.items():
            if key not in used:  # older snapshots, or fds pushed just before a crash
                self.fdstore.drop(key)
                os.close(fd)
        log.info("Recovered the agent's state from its fd store: %d unit(s), %d fd(s)", len(self.units), len(used) - 1)
        return True


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


def sealed_memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_all(fd: int, limit: int = MAX_SIZE) -> bytes:
    size = os.fstat(fd).st_size
    if size > limit:
        raise BadManifest(f"{size} bytes is too large (at most {limit})")
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_manifest(backend: Backend, luod: int) -> Manifest:
    fd = backend.retrieve_fd(luod, MANIFEST_TOKEN)
    try:
        return Manifest.decode(read_all(fd))
    finally:
        os.close(fd)


def write_env_file(path: str, update_count: int) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"LIVEUPDATE_RESTORED=1\nLIVEUPDATE_COUNT={update_count}\n")
    os.replace(tmp, path)


def remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
