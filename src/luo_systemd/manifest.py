"""The manifest: what the agent carried across the kexec, stored inside LUO itself.

The kernel lists nothing, so the agent records every unit, fd name, kind, token, session name and order in
a sealed memfd at token 0 of its own session ``luod``.  The format is versioned; a manifest the agent does
not understand is refused, never guessed at.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

from luo_systemd.errors import BadManifest, InvalidName
from luo_systemd.names import SESSION_NAME_MAX, check_client_session_name, check_fd_name, check_unit_name

FORMAT = "io.liveupdate.manifest"
VERSION = 1
MAX_SIZE = 16 << 20


class FdKind(str, enum.Enum):
    MEMFD = "memfd"  # preserved in the unit's session under ``token``
    SESSION = "session"  # a LUO session the unit stored; carried as a session of its own, by name


@dataclasses.dataclass(frozen=True)
class CarriedFd:
    name: str
    kind: FdKind
    order: int
    token: int = 0  # memfd: its token in the unit's session
    session: str = ""  # session: the LUO session's name


@dataclasses.dataclass(frozen=True)
class CarriedUnit:
    unit: str
    session: str  # the unit's own session (memfds); "" if it carried none
    fds: tuple[CarriedFd, ...] = ()
    client_sessions: tuple[tuple[str, str], ...] = ()  # (name the unit gave it, LUO session name)


@dataclasses.dataclass(frozen=True)
class Manifest:
    update_count: int  # live updates so far, this one included
    written_usec: int  # CLOCK_REALTIME when written
    kernel: str  # release of the kernel that wrote it
    units: tuple[CarriedUnit, ...] = ()

    def encode(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "update_count": self.update_count,
            "written_usec": self.written_usec,
            "kernel": self.kernel,
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
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise BadManifest(f"manifest is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BadManifest("manifest has no 'format: io.liveupdate.manifest'")
        if doc.get("version") != VERSION:
            raise BadManifest(
                f"manifest version {doc.get('version')!r} is not understood (this agent reads version {VERSION}); "
                "it was written by a different luo-systemd"
            )
        try:
            return cls(
                update_count=_int(doc["update_count"]),
                written_usec=_int(doc["written_usec"]),
                kernel=_str(doc["kernel"]),
                units=tuple(_unit(u) for u in doc["units"]),
            )
        except (KeyError, TypeError, ValueError, InvalidName) as e:
            raise BadManifest(f"manifest is malformed: {e!r}") from None


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
