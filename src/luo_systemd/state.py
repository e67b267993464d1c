"""What luod holds for the units, and how that survives a crash of luod (docs/crash-consistency.md).

Every fd luod holds for a unit is an ``Entry`` or a session ``Held`` in a ``UnitState``; each is mirrored
in luod's own systemd fd store under its key, next to a sealed memfd holding a JSON snapshot of the state.
The invariants, which the crash test (tests/test_crash.py) checks at every step boundary:

1. Snapshot before release: a new snapshot enters the fd store before the old one leaves, and an fd
   leaves the fd store only after a snapshot that no longer names it is saved.  So the newest snapshot
   in the fd store finds every fd it names.
2. Outgoing sessions are derived state: the sessions luod creates itself (``luod/UNIT``, the manifest's
   ``luod``) are not mirrored (key "").  Their names must be free to create them again, and the kernel
   preserves a file in one session only.  A crash closes them; recovery creates them again from the state.
3. Restore finishes last: after a kexec the incoming manifest session is finished only after a snapshot
   holds everything restored; incoming sessions a crashed luod retrieved are found in the fd store by name.

The snapshot is read back as untrusted input: every type, name and key is checked (``decode``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
from typing import Any, Optional, Protocol

from luo_systemd.api import Problem
from luo_systemd.errors import BadManifest, InvalidName
from luo_systemd.manifest import MAX_SIZE, FdKind
from luo_systemd.names import check_client_session_name, check_fd_name, check_unit_name
from luo_systemd.ownedfd import OwnedFd

STATE_VERSION = 1
STATE_KEY_PREFIX = "luod-state-"
HELD_KEY_PREFIX = "luod-fd-"


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
    """An fd the broker owns, mirrored in the fd store under ``key`` ("": an outgoing session, not mirrored)."""

    fd: int
    key: str

    @classmethod
    def take(cls, fd: OwnedFd, key: str) -> Held:
        """Takes ``fd`` over from whoever received it: from here on the broker closes it."""
        return cls(fd.detach(), key)


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


@dataclasses.dataclass
class Recovered:
    """A snapshot read back, its fds attached."""

    next_key: int
    armed: bool
    update_count: int
    manifest_session: Optional[Held]
    problems: list[Problem]
    units: dict[str, UnitState]
    preserved_units: list[str]  # units whose outgoing session held files when the snapshot was taken
    used: set[str]  # the fd store keys the snapshot names


def encode(
    next_key: int,
    armed: bool,
    update_count: int,
    manifest_session: Optional[Held],
    problems: list[Problem],
    units: dict[str, UnitState],
) -> bytes:
    def entry(e: Entry) -> dict[str, object]:
        return {"name": e.name, "kind": e.kind.value, "order": e.order, "key": e.held.key, "session": e.session}

    def key(h: Optional[Held]) -> Optional[str]:
        return h.key if h and h.key else None  # outgoing sessions are not in the fd store (invariant 2)

    doc = {
        "version": STATE_VERSION,
        "next_key": next_key,
        "armed": armed,
        "update_count": update_count,
        "manifest_session": key(manifest_session),
        "problems": [dataclasses.asdict(p) for p in problems],
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
            for s in units.values()
        ],
    }
    return json.dumps(doc).encode()


def _typed(value: Any, kind: type) -> Any:
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise BadManifest(f"agent state: expected {kind.__name__}, got {value!r}")
    return value


def decode(data: bytes, fds: dict[str, int]) -> Recovered:
    """The snapshot ``data`` with the fds it names from ``fds`` (the fd store, by key)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise BadManifest(f"agent state is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise BadManifest(
            f"agent state version {doc.get('version') if isinstance(doc, dict) else None!r} is not understood"
        )
    used: set[str] = set()

    def held(key: Any) -> Optional[Held]:
        if key is None:
            return None
        if _typed(key, str) not in fds:
            raise BadManifest(f"the fd store lost {key}")
        used.add(key)
        return Held(fds[key], key)

    def entry(d: Any) -> Entry:
        h = held(_typed(d, dict)["key"])
        if h is None:
            raise BadManifest("agent state: an entry without an fd")
        kind = FdKind(d["kind"])
        return Entry(check_fd_name(_typed(d["name"], str)), kind, _typed(d["order"], int), h, _typed(d["session"], str))

    def sessions(d: Any) -> dict[str, Held]:
        out = {}
        for name, key in _typed(d, dict).items():
            h = held(key)
            if h is not None:
                out[check_client_session_name(name)] = h
        return out

    try:
        units = {}
        preserved = []
        for u in _typed(doc["units"], list):
            state = UnitState(
                unit=check_unit_name(_typed(u["unit"], str)),
                stored={e.name: e for e in map(entry, _typed(u["stored"], list))},
                next_order=_typed(u["next_order"], int),
                out_session=held(u["out_session"]),
                client_sessions=sessions(u["client_sessions"]),
                restored={e.name: e for e in map(entry, _typed(u["restored"], list))},
                in_session=held(u["in_session"]),
                restored_client_sessions=sessions(u["restored_client_sessions"]),
                restored_at=float(_typed(u["restored_at"], float)),
                finished=_typed(u["finished"], bool),
            )
            if _typed(u["preserved"], list):
                preserved.append(state.unit)
            units[state.unit] = state
        return Recovered(
            next_key=_typed(doc["next_key"], int),
            armed=_typed(doc["armed"], bool),
            update_count=_typed(doc["update_count"], int),
            manifest_session=held(doc["manifest_session"]),
            problems=[
                Problem(_typed(p["unit"], str), _typed(p["message"], str), _typed(p.get("left_out", False), bool))
                for p in _typed(doc["problems"], list)
            ],
            units=units,
            preserved_units=preserved,
            used=used,
        )
    except (KeyError, TypeError, ValueError, InvalidName) as e:
        raise BadManifest(f"agent state is malformed: {e!r}") from None


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


_crash_count = 0  # step boundaries this process has passed


def crash_point(step: str) -> None:
    """A step boundary of a state change.  For the crash test only: with LUOD_CRASH_AT=N in the
    environment, luod SIGKILLs itself at the Nth boundary; LUOD_CRASH_LOG=PATH lists the steps."""
    global _crash_count
    at = os.environ.get("LUOD_CRASH_AT")
    if at is None:
        return
    _crash_count += 1
    log_path = os.environ.get("LUOD_CRASH_LOG")
    if log_path:
        with open(log_path, "a") as f:
            f.write(f"{_crash_count} {step}\n")
    if _crash_count == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
