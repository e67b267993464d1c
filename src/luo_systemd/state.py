"""What luod holds for the units, and how that survives a crash of luod (docs/crash-consistency.md).

Every fd luod holds for a unit is an ``Entry`` or a session ``Held`` in a ``UnitState``; each is mirrored
in luod's own systemd fd store under its key, next to a memfd holding the state's log (``StateLog``).
The invariants, which the crash test (tests/test_crash.py) checks at every step boundary:

1. Logged before release: a change is in the log in the fd store before an fd it no longer names leaves
   the fd store.  So the newest log in the fd store finds every fd its state names.  A unit's restored
   memfds share one name in the fd store (one push); they are told apart by inode (``Held.store_key``).
2. Outgoing sessions are derived state: the sessions luod creates itself (``luod/UNIT``, the manifest's
   ``luod``) are not mirrored (key "").  Their names must be free to create them again, and the kernel
   preserves a file in one session only.  A crash closes them; recovery creates them again from the state.
3. Restore finishes last: after a kexec the incoming manifest session is finished only after the log
   holds everything restored; incoming sessions a crashed luod retrieved are found in the fd store by name.

Why a log: writing the whole state after every change costs what luod holds, not what changed (at
10,000 fds a Preserve of ten wrote a megabyte).  A log appends one record per change holding only the
units it touched (a unit is the unit of every operation: its fds are bounded by FileDescriptorMax=, and
Preserve, Finish and Discard act on all of them) and the few global fields.  The first record of a log is
a full snapshot; once the records appended exceed the snapshot's size (and a floor), the next change
starts a new log with a new snapshot, so the cost of a change stays proportional to what changed,
amortised.  One memfd per log, not a snapshot and a log side by side: the newest log alone is the state,
so switching logs is one FDSTORE=1 and no pair can be half replaced.  Per-unit files were the other
choice; they would cost an fd-store round trip per unit changed, and the global fields would need their
own file and an order between them.

A record is framed (little-endian u32 payload length, u32 CRC-32 of the payload, then JSON) and written
with one ``pwrite`` at the end of the log.  A SIGKILL inside that write leaves a prefix of the record
(tmpfs grows the file only over copied bytes): a log that ends inside a record ends at the record before,
which was the last acknowledged change.  A complete record with a wrong checksum cannot come from a
crash: it is refused as ``BadManifest``, never replayed.  The log is read back as untrusted input: every
type, name and key is checked (``decode``).
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib

from luo_systemd.api import Problem
from luo_systemd.errors import BadManifest, InvalidName
from luo_systemd.manifest import MAX_SIZE, FdKind
from luo_systemd.names import check_client_session_name, check_fd_name, check_unit_name
from luo_systemd.ownedfd import OwnedFd
from luo_systemd.records import NamedTuple
from luo_systemd.varlink import dumps, loads  # json's C half: json imports re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, Optional, Protocol

STATE_VERSION = 2
STATE_KEY_PREFIX = "luod-state-"
HELD_KEY_PREFIX = "luod-fd-"
MEMBER_SEP = "/"  # the key of an fd pushed with others: 'GROUP/INODE' (Broker._hold_all)
RECORD_HEADER = struct.Struct("<II")  # payload length, CRC-32 of the payload
COMPACT_FLOOR = 64 << 10  # a log this small is never compacted: appends to it are cheap either way
LOG_MAX = 2 * MAX_SIZE + 2 * COMPACT_FLOOR  # a log is compacted before it doubles its snapshot


if TYPE_CHECKING:  # typing costs luod's start-up (see the classes below); a Protocol is for mypy alone

    class FdStore(Protocol):
        """The agent's own systemd fd store (FDSTORE=1 / FDSTOREREMOVE=1)."""

        def keep(self, key: str, *fds: int) -> None: ...

        def drop(self, key: str) -> None: ...


class NoFdStore:
    """When the agent runs without a service manager: nothing survives an agent crash."""

    def keep(self, key: str, *fds: int) -> None:
        pass

    def drop(self, key: str) -> None:
        pass


# The classes below are not dataclasses: luod builds them before READY=1, and dataclasses with its imports
# (inspect, ast, dis) costs that start-up, which every opted-in unit waits for, more than the restore does.


class Held(NamedTuple):
    """An fd the broker owns, mirrored in the fd store under ``key`` ("": an outgoing session, not mirrored;
    'GROUP/INODE': one of several memfds pushed under the fd store name GROUP, told apart by inode)."""

    fd: int
    key: str

    @classmethod
    def take(cls, fd: OwnedFd, key: str) -> Held:
        """Takes ``fd`` over from whoever received it: from here on the broker closes it."""
        return cls(fd.detach(), key)

    @property
    def store_key(self) -> str:
        """The name it has in the fd store."""
        return self.key.partition(MEMBER_SEP)[0]


class Entry:
    """A named fd of a unit: stored for the next update, or restored from the last one."""

    __slots__ = ("held", "kind", "name", "order", "session")

    def __init__(self, name: str, kind: FdKind, order: int, held: Held, session: str = "") -> None:
        self.name = name
        self.kind = kind
        self.order = order  # changes when a restored fd is stored again (Finish)
        self.held = held
        self.session = session  # kind SESSION: the LUO session's name

    def __repr__(self) -> str:
        return f"Entry({self.name!r}, {self.kind}, {self.order}, {self.held}, {self.session!r})"


class UnitState:
    """What luod holds for one unit; the broker changes it in place."""

    __slots__ = (
        "client_sessions",
        "finished",
        "in_session",
        "next_order",
        "out_session",
        "preserved",
        "restored",
        "restored_at",
        "restored_client_sessions",
        "stored",
        "unit",
    )

    def __init__(
        self,
        unit: str,
        stored: Optional[dict[str, Entry]] = None,
        next_order: int = 0,
        out_session: Optional[Held] = None,
        preserved: tuple[str, ...] = (),
        client_sessions: Optional[dict[str, Held]] = None,
        restored: Optional[dict[str, Entry]] = None,
        in_session: Optional[Held] = None,
        restored_client_sessions: Optional[dict[str, Held]] = None,
        restored_at: float = 0.0,
        finished: bool = True,
    ) -> None:
        self.unit = unit
        self.stored: dict[str, Entry] = {} if stored is None else stored  # in store order
        self.next_order = next_order
        self.out_session = out_session  # luod/UNIT holding the carried memfds (tokens 1..n)
        self.preserved = preserved  # the fd names out_session holds, in token order
        self.client_sessions: dict[str, Held] = {} if client_sessions is None else client_sessions
        # after a live update, until the unit finishes:
        self.restored: dict[str, Entry] = {} if restored is None else restored
        self.in_session = in_session
        self.restored_client_sessions: dict[str, Held] = (
            {} if restored_client_sessions is None else restored_client_sessions
        )
        self.restored_at = restored_at  # CLOCK_BOOTTIME seconds of the restore, for OnNoReturn=
        self.finished = finished

    def __repr__(self) -> str:
        return f"UnitState({self.unit!r}, stored={list(self.stored)}, restored={list(self.restored)})"

    def held(self) -> list[Held]:
        out = [e.held for e in (*self.stored.values(), *self.restored.values())]
        out += [*self.client_sessions.values(), *self.restored_client_sessions.values()]
        return out + [h for h in (self.out_session, self.in_session) if h is not None]


class Globals(NamedTuple):
    """The state beside the units: small, written in every record."""

    next_key: int
    armed: bool
    update_count: int
    manifest_session: Optional[Held]


class Recovered(NamedTuple):
    """A log read back, its fds attached."""

    next_key: int
    armed: bool
    update_count: int
    manifest_session: Optional[Held]
    problems: list[Problem]
    units: dict[str, UnitState]
    preserved_units: list[str]  # units whose outgoing session held files when the change was logged
    used: set[str]  # the fd store keys the state names
    lost: dict[str, list[str]]  # unit ("" for the manifest's session) -> keys the state names, not in the fd store


def _key(h: Optional[Held]) -> Optional[str]:
    return h.key if h and h.key else None  # outgoing sessions are not in the fd store (invariant 2)


def _unit_doc(s: UnitState) -> dict[str, object]:
    def entry(e: Entry) -> dict[str, object]:
        return {"name": e.name, "kind": e.kind.value, "order": e.order, "key": e.held.key, "session": e.session}

    return {
        "unit": s.unit,
        "stored": [entry(e) for e in s.stored.values()],
        "next_order": s.next_order,
        "out_session": _key(s.out_session),
        "preserved": list(s.preserved),
        "client_sessions": {n: h.key for n, h in s.client_sessions.items()},
        "restored": [entry(e) for e in s.restored.values()],
        "in_session": _key(s.in_session),
        "restored_client_sessions": {n: h.key for n, h in s.restored_client_sessions.items()},
        "restored_at": s.restored_at,
        "finished": s.finished,
    }


def encode_record(
    globals_: Globals,
    problems: Optional[list[Problem]],
    units: Iterable[UnitState],
    gone: Iterable[str] = (),
    snapshot: bool = False,
) -> bytes:
    """One framed record: the global fields, the problems if they changed (None: they did not), the units
    changed and the units gone.  A ``snapshot`` holds every unit and starts a log."""
    doc: dict[str, object] = {
        "next_key": globals_.next_key,
        "armed": globals_.armed,
        "update_count": globals_.update_count,
        "manifest_session": _key(globals_.manifest_session),
        "units": [_unit_doc(s) for s in units],
        "gone": list(gone),
    }
    if snapshot:
        doc["version"] = STATE_VERSION
    if problems is not None:
        doc["problems"] = [p._asdict() for p in problems]
    payload = dumps(doc).encode()
    return RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def replay(data: bytes) -> dict[str, Any]:
    """The records of a log merged into one document (later records replace units by name).  A log that
    ends inside a record ends at the record before (a write cut short by a crash, never acknowledged); a
    complete record with a wrong checksum is refused."""
    doc: dict[str, Any] = {"problems": []}
    units: dict[str, Any] = {}
    offset = 0
    while len(data) - offset >= RECORD_HEADER.size:
        length, crc = RECORD_HEADER.unpack_from(data, offset)
        start, end = offset + RECORD_HEADER.size, offset + RECORD_HEADER.size + length
        if end > len(data):
            break  # the torn tail
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            raise BadManifest(f"agent state log: the record at byte {offset} fails its checksum")
        try:
            record = loads(payload)
        except (ValueError, RecursionError) as e:
            raise BadManifest(f"agent state log: the record at byte {offset} is not JSON: {e}") from None
        if not isinstance(record, dict) or (offset == 0) != ("version" in record):
            raise BadManifest(f"agent state log: the record at byte {offset} is not a snapshot where it must be")
        if offset == 0 and record["version"] != STATE_VERSION:
            raise BadManifest(f"agent state version {record['version']!r} is not understood")
        try:
            for u in _typed(record.pop("units"), list):
                units[_typed(_typed(u, dict)["unit"], str)] = u
            for name in _typed(record.pop("gone"), list):
                units.pop(_typed(name, str), None)
        except KeyError as e:
            raise BadManifest(f"agent state log is malformed: {e!r}") from None
        doc.update(record)
        offset = end
    if offset == 0:
        raise BadManifest("agent state log holds no complete record")
    doc["units"] = list(units.values())
    return doc


def _typed(value: Any, kind: type) -> Any:
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise BadManifest(f"agent state: expected {kind.__name__}, got {value!r}")
    return value


def decode(data: bytes, fds: dict[str, list[int]]) -> Recovered:
    """The log ``data`` replayed, with the fds its state names from ``fds`` (the fd store, by name: a
    group's members are told apart by inode).  An fd the fd store no longer has (systemd drops what it
    cannot keep) is left out and listed in ``lost``: the rest of the state is still every unit's."""
    doc = replay(data)
    used: set[str] = set()
    members: dict[str, dict[int, int]] = {}  # group -> inode -> fd
    lost: dict[str, list[str]] = {}
    unit = ""  # whose fds are being read

    def held(key: Any) -> Optional[Held]:
        if key is None:
            return None
        group, _, inode = _typed(key, str).partition(MEMBER_SEP)
        fd = None
        if group in fds:
            used.add(group)
            if not inode:
                fd = fds[group][0]
            else:
                if group not in members:
                    members[group] = {os.fstat(f).st_ino: f for f in fds[group]}
                fd = members[group].get(int(inode)) if inode.isdigit() else None
        if fd is None:
            lost.setdefault(unit, []).append(key)
            return None
        return Held(fd, key)

    def entries(d: Any) -> dict[str, Entry]:
        out = {}
        for e in _typed(d, list):
            if _typed(e, dict)["key"] is None:
                raise BadManifest("agent state: an entry without an fd")
            name, kind = check_fd_name(_typed(e["name"], str)), FdKind(e["kind"])
            order, session = _typed(e["order"], int), _typed(e["session"], str)
            h = held(e["key"])
            if h is not None:
                out[name] = Entry(name, kind, order, h, session)
        return out

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
            unit = check_unit_name(_typed(u["unit"], str))
            state = UnitState(
                unit=unit,
                stored=entries(u["stored"]),
                next_order=_typed(u["next_order"], int),
                out_session=held(u["out_session"]),
                client_sessions=sessions(u["client_sessions"]),
                restored=entries(u["restored"]),
                in_session=held(u["in_session"]),
                restored_client_sessions=sessions(u["restored_client_sessions"]),
                restored_at=float(_typed(u["restored_at"], float)),
                finished=_typed(u["finished"], bool),
            )
            if _typed(u["preserved"], list):
                preserved.append(state.unit)
            units[state.unit] = state
        unit = ""
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
            lost=lost,
        )
    except (KeyError, TypeError, ValueError, InvalidName) as e:
        raise BadManifest(f"agent state is malformed: {e!r}") from None


def sealed_memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    write_all(fd, data, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
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


class StateLog:
    """luod's state in its fd store: the newest log, appended to in place (the fd store holds the same
    file), and started anew with a snapshot when compaction is due."""

    def __init__(self, store: FdStore) -> None:
        self.store = store
        self.log: Optional[Held] = None
        self.size = 0  # bytes in the log
        self.snapshot_size = 0  # bytes of its first record
        self.problems: list[Problem] = []  # as the log holds them
        self.fresh = True  # the next save starts a new log: none yet, a predecessor's, or a failed append
        self.retired: list[str] = []  # keys whose fds are closed: they leave the fd store after the next save

    def adopt(self, held: Held) -> None:
        """The log a crashed predecessor left: the next save starts a new one and retires it."""
        self.log, self.fresh = held, True

    def save(
        self, globals_: Globals, problems: list[Problem], units: dict[str, UnitState], changed: set[str], key: str
    ) -> None:
        """Logs the units ``changed`` since the last save (those no longer in ``units`` as gone), or starts a
        new log under ``key``; then the retired fds leave the fd store (invariant 1)."""
        if self.fresh or self.size - self.snapshot_size > max(self.snapshot_size, COMPACT_FLOOR):
            self._start(encode_record(globals_, problems, units.values(), snapshot=True), key)
        else:
            assert self.log is not None
            record = encode_record(
                globals_,
                problems if problems != self.problems else None,
                [units[u] for u in changed if u in units],
                [u for u in changed if u not in units],
            )
            self._append(self.log.fd, record)
            crash_point("logged to " + self.log.key)
        self.problems = list(problems)
        for retired in self.retired:
            self.store.drop(retired)
            crash_point("dropped " + retired)
        self.retired.clear()

    def _start(self, snapshot: bytes, key: str) -> None:
        fd = os.memfd_create("luod-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            write_all(fd, snapshot, 0)
            # Append-only from here: a record is only ever added after the last one.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except OSError:
            os.close(fd)
            raise
        # The new log is in the store before the old one leaves it: a crash between keeps one.
        self.store.keep(key, fd)
        crash_point("kept log " + key)
        if self.log is not None:
            os.close(self.log.fd)
            self.retired.append(self.log.key)
        self.log, self.size, self.snapshot_size, self.fresh = Held(fd, key), len(snapshot), len(snapshot), False

    def _append(self, fd: int, record: bytes) -> None:
        try:
            write_all(fd, record, self.size)
        except OSError:
            # What was written is a torn tail, read back as the end of the log; no record may follow it.
            self.fresh = True
            raise
        self.size += len(record)


def write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


_crash_count = 0  # step boundaries this process has passed
_CRASH_AT = os.environ.get("LUOD_CRASH_AT")  # read once: luod passes a boundary per fd it preserves or restores


def crash_point(step: str) -> None:
    """A step boundary of a state change.  For the crash test only: with LUOD_CRASH_AT=N in luod's
    environment, luod SIGKILLs itself at the Nth boundary; LUOD_CRASH_LOG=PATH lists the steps."""
    global _crash_count
    at = _CRASH_AT
    if at is None:
        return
    _crash_count += 1
    log_path = os.environ.get("LUOD_CRASH_LOG")
    if log_path:
        with open(log_path, "a") as f:
            f.write(f"{_crash_count} {step}\n")
    if _crash_count == int(at):
        import signal  # noqa: PLC0415 - for the crash test only: signal imports enum

        os.kill(os.getpid(), signal.SIGKILL)
