"""The manifest: what the agent carried across the kexec, stored inside LUO itself.

The kernel lists nothing, so the agent records every unit, fd name, kind, token, session name and order in
its own session ``luod``: sealed memfds at tokens 0, 1, 2, ..., each a record.  A session cannot drop a
file, so a change appends a record of the units it touched (``Manifest.encode(gone)``): later records
replace a unit of the same name, and ``gone`` takes units back.  Token 0 holds the whole manifest of the
moment the session was created; the agent starts a new session once the records outnumber the units
(``Broker._write_manifest``), so writing the manifest costs what changed, not what is carried.  Version 1
(one document at token 0, by luo-systemd before the records) is still read.  A manifest the agent does not
understand is refused, never guessed at.
"""

from __future__ import annotations

from luo_systemd.errors import BadManifest, InvalidName
from luo_systemd.names import SESSION_NAME_MAX, check_client_session_name, check_fd_name, check_unit_name
from luo_systemd.records import Choice, NamedTuple
from luo_systemd.varlink import dumps, loads  # json's C half: json imports re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

FORMAT = "io.liveupdate.manifest"
VERSION = 2
READS = (1, VERSION)  # the versions this agent restores from
MAX_SIZE = 16 << 20  # one record
MAX_RECORDS_SIZE = 4 * MAX_SIZE  # all the records of a session


class FdKind(Choice):  # not enum.Enum: luod restores before READY=1 (see luo_systemd.records)
    MEMFD = "memfd"  # preserved in the unit's session under ``token``
    SESSION = "session"  # a LUO session the unit stored; carried as a session of its own, by name


class CarriedFd(NamedTuple):  # not a dataclass: luod restores before READY=1 (see luo_systemd.records)
    name: str
    kind: FdKind
    order: int
    token: int = 0  # memfd: its token in the unit's session
    session: str = ""  # session: the LUO session's name


class CarriedUnit(NamedTuple):
    unit: str
    session: str  # the unit's own session (memfds); "" if it carried none
    fds: tuple[CarriedFd, ...] = ()
    client_sessions: tuple[tuple[str, str], ...] = ()  # (name the unit gave it, LUO session name)


class Manifest(NamedTuple):
    update_count: int  # live updates so far, this one included
    written_usec: int  # CLOCK_REALTIME when written
    kernel: str  # release of the kernel that wrote it
    units: tuple[CarriedUnit, ...] = ()

    def encode(self, gone: tuple[str, ...] = ()) -> bytes:
        """A record: these units (replacing any of the same name in earlier records), and the units ``gone``."""
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "update_count": self.update_count,
            "written_usec": self.written_usec,
            "kernel": self.kernel,
            "gone": list(gone),
            "units": [
                {
                    "unit": u.unit,
                    "session": u.session,
                    "fds": [
                        {"name": f.name, "kind": f.kind.value, "order": f.order, "token": f.token, "session": f.session}
                        for f in u.fds
                    ],
                    "client_sessions": [{"name": n, "session": s} for n, s in u.client_sessions],
                }
                for u in self.units
            ],
        }
        return dumps(doc).encode()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        return cls.replay([data])

    @classmethod
    def replay(cls, records: list[bytes]) -> Manifest:
        """The manifest a session's records make, token 0 first: the header of the last record, each unit as
        the last record that names it left it."""
        units: dict[str, CarriedUnit] = {}
        header: dict[str, Any] = {}
        first = 0
        for token, data in enumerate(records):
            doc = _document(data)
            version = doc["version"]
            first = first or version
            if token > 0 and (first, version) != (VERSION, VERSION):
                raise BadManifest(f"manifest record {token} (version {version}) follows a version {first} record")
            try:
                for unit in doc["gone"] if version == VERSION else ():
                    units.pop(check_unit_name(_str(unit)), None)
                for carried in map(_unit, doc["units"]):
                    units[carried.unit] = carried
                header = {
                    "update_count": _int(doc["update_count"]),
                    "written_usec": _int(doc["written_usec"]),
                    "kernel": _str(doc["kernel"]),
                }
            except (KeyError, TypeError, ValueError, InvalidName) as e:
                raise BadManifest(f"manifest is malformed: {e!r}") from None
        if not header:
            raise BadManifest("manifest has no record")
        return cls(units=tuple(units.values()), **header)


def _document(data: bytes) -> dict[str, Any]:
    """A record's JSON, of a format and version this agent reads."""
    try:
        doc = loads(data)
    except (ValueError, RecursionError) as e:
        raise BadManifest(f"manifest is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BadManifest("manifest has no 'format: io.liveupdate.manifest'")
    if doc.get("version") not in READS:
        raise BadManifest(
            f"manifest version {doc.get('version')!r} is not understood (this agent reads versions "
            f"{' and '.join(map(str, READS))}); it was written by a different luo-systemd"
        )
    return doc


def _int(v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"expected a non-negative integer, got {v!r}")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _session(v: Any) -> str:
    """A LUO session name as the kernel takes it: at most 63 bytes, no NUL ("" for none)."""
    name = _str(v)
    if len(name.encode()) > SESSION_NAME_MAX or "\0" in name:
        raise ValueError(f"{name!r} is not a LUO session name")
    return name


def _unit(u: Any) -> CarriedUnit:
    """A unit of the manifest: untrusted input (it names files luod writes), so every name is checked."""
    return CarriedUnit(
        unit=check_unit_name(_str(u["unit"])),
        session=_session(u["session"]),
        fds=tuple(
            CarriedFd(
                name=check_fd_name(_str(f["name"])),
                kind=FdKind(f["kind"]),
                order=_int(f["order"]),
                token=_int(f["token"]),
                session=_session(f["session"]),
            )
            for f in u["fds"]
        ),
        client_sessions=tuple(
            (check_client_session_name(_str(c["name"])), _session(c["session"])) for c in u["client_sessions"]
        ),
    )
