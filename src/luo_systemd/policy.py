"""A unit's live-update policy: the ``[X-LiveUpdate]`` section of its unit file and drop-ins.

stdlib only: the generator parses unit files with it at every boot.  The generator writes the validated,
normalized section into the unit's drop-in (systemd ignores ``X-`` sections), where the agent reads it.
See luo-systemd.directives(5).
"""

from __future__ import annotations

from luo_systemd.errors import InvalidRequest
from luo_systemd.names import check_client_session_name, check_fd_name
from luo_systemd.records import Choice, NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

SECTION = "X-LiveUpdate"
DROPIN = "50-liveupdate.conf"  # the generator's drop-in in each opted-in unit's .d directory
DEFAULT_FD_MAX = 64
FD_MAX_LIMIT = 4096
DEFAULT_RETURN_TIMEOUT_SEC = 300
DEFAULT_BYTES_MAX = 1 << 30  # what one unit may pin across a live update unless it says otherwise
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class PreserveAt(Choice):  # not enum.Enum: see luo_systemd.records
    STOP = "stop"  # when the unit stops for the kexec (after its own ExecStop=)
    STORE = "store"  # as soon as an fd is stored: less work in the blackout, but the size freezes early


class FinishMode(Choice):
    AUTO = "auto"  # luo-finish@UNIT.service finishes the unit's session once the service is up
    EXPLICIT = "explicit"  # the service calls Finish itself after its own restore steps


class RestoreMode(Choice):
    AUTO = "auto"  # luo-hook start (ExecStartPre=) puts the restored fds into the unit's fd store
    EXPLICIT = "explicit"  # the service calls Retrieve itself: no process runs before it
    # As explicit, and the unit does not wait for luod's READY=1 after a live update: it starts with luod's
    # socket (its exec and interpreter overlap luod's start) and asks Retrieve what was restored, since
    # LIVEUPDATE_RESTORED may not be in its environment yet (luo-qemu).
    EARLY = "early"


class NoReturn(Choice):
    KEEP = "keep"  # keep the restored fds, and carry them into the next update
    DISCARD = "discard"  # free them


class OnPreflightFailure(Choice):
    # The default: one unit's problem does not hold back the others' live update (a kernel fix for the whole
    # machine); the unit stops and starts as for an ordinary reboot, which every service must survive.
    LEAVE_OUT = "leave-out"  # the unit is reported and not carried; the others go ahead
    REFUSE = "refuse"  # the whole live update is refused (a VM: a cold restart would crash its guest)


class Policy(NamedTuple):  # not a dataclass: see luo_systemd.records
    fd_names: tuple[str, ...] = ()  # the fd names to carry; empty: all
    preserve_at: PreserveAt = PreserveAt.STOP
    finish: FinishMode = FinishMode.AUTO
    restore: RestoreMode = RestoreMode.AUTO
    sessions: tuple[str, ...] = ()  # client session names the unit may create
    fd_max: int = DEFAULT_FD_MAX
    on_no_return: NoReturn = NoReturn.KEEP
    return_timeout_sec: int = DEFAULT_RETURN_TIMEOUT_SEC
    bytes_max: int = DEFAULT_BYTES_MAX  # memfd bytes (holes count) the unit may have preserved
    on_preflight_failure: OnPreflightFailure = OnPreflightFailure.LEAVE_OUT

    def carries(self, fd_name: str) -> bool:
        return not self.fd_names or fd_name in self.fd_names

    def to_section(self) -> str:
        """The normalized section, as the generator writes it into the unit's drop-in."""
        lines = [f"[{SECTION}]"]
        if self.fd_names:
            lines.append("FileDescriptorNames=" + " ".join(self.fd_names))
        lines += [
            f"PreserveAt={self.preserve_at.value}",
            f"Finish={self.finish.value}",
        ]
        if self.restore is not RestoreMode.AUTO:
            lines.append(f"Restore={self.restore.value}")
        if self.sessions:
            lines.append("Sessions=" + " ".join(self.sessions))
        lines += [
            f"FileDescriptorMax={self.fd_max}",
            f"OnNoReturn={self.on_no_return.value}",
            f"ReturnTimeoutSec={self.return_timeout_sec}",
        ]
        if self.bytes_max != DEFAULT_BYTES_MAX:
            lines.append(f"BytesMax={self.bytes_max}")
        if self.on_preflight_failure is not OnPreflightFailure.LEAVE_OUT:
            lines.append(f"OnPreflightFailure={self.on_preflight_failure.value}")
        return "\n".join(lines) + "\n"


def read_unit_lines(text: str) -> Iterable[tuple[str, str, str]]:
    """Yields (section, key, value) of a unit file, with systemd's comment and continuation rules; a
    section header yields (section, "", "")."""
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip() if not pending else raw.rstrip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = (pending + line).strip(), ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            yield section, "", ""
            continue
        key, eq, value = line.partition("=")
        if eq:
            yield section, key.strip(), value.strip()


_TIME_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def _seconds(value: str) -> int:
    """A number of seconds with an optional unit (``300``, ``5min``, ``1h``).  Not a regular expression: re
    costs the generator more than its parsing."""
    unit = value.lstrip("0123456789")
    number = value[: len(value) - len(unit)]
    unit = unit.lstrip()
    if not number or unit not in _TIME_UNITS:
        raise InvalidRequest(f"ReturnTimeoutSec={value!r} is not a time (e.g. 300, 5min, 1h)")
    return int(number) * _TIME_UNITS[unit]


def _bytes(value: str) -> int:
    """systemd's sizes: 1024-based suffixes K, M, G, T."""
    number, suffix = (value[:-1], value[-1].upper()) if value[-1:].isalpha() else (value, "")
    if not number.isdigit() or suffix not in _SIZE_UNITS:
        raise InvalidRequest(f"BytesMax={value!r} is not a size (e.g. 512M, 4G)")
    return int(number) * _SIZE_UNITS[suffix]


def _enum(cls: type[Choice], key: str, value: str) -> Choice:
    try:
        return cls(value)
    except ValueError:
        allowed = "|".join(str(e.value) for e in cls)
        raise InvalidRequest(f"{key}={value!r}: expected {allowed}") from None


def parse_policy(texts: Iterable[str]) -> Policy | None:
    """The policy from a unit file and its drop-ins, in the order systemd applies them.

    None if no file has an ``[X-LiveUpdate]`` section (the unit did not opt in).  A malformed section
    raises InvalidRequest naming the key.
    """
    return policy_of(read_unit_lines(text) for text in texts)


def policy_of(files: Iterable[Iterable[tuple[str, str, str]]]) -> Policy | None:
    """parse_policy over files already read as ``read_unit_lines`` (the generator reads other sections too)."""
    found = False
    fields: dict[str, object] = {}
    for lines in files:
        for section, key, value in lines:
            if section != SECTION:
                continue
            found = True
            if not key:
                continue
            if key == "FileDescriptorNames":
                # As for systemd's list settings: an empty assignment resets, others add.
                names = tuple(check_fd_name(n) for n in value.split())
                fields["fd_names"] = (*fields.get("fd_names", ()), *names) if value else ()  # type: ignore[misc]
            elif key == "Sessions":
                names = tuple(check_client_session_name(n) for n in value.split())
                fields["sessions"] = (*fields.get("sessions", ()), *names) if value else ()  # type: ignore[misc]
            elif key == "PreserveAt":
                fields["preserve_at"] = _enum(PreserveAt, key, value)
            elif key == "Finish":
                fields["finish"] = _enum(FinishMode, key, value)
            elif key == "Restore":
                fields["restore"] = _enum(RestoreMode, key, value)
            elif key == "OnNoReturn":
                fields["on_no_return"] = _enum(NoReturn, key, value)
            elif key == "OnPreflightFailure":
                fields["on_preflight_failure"] = _enum(OnPreflightFailure, key, value)
            elif key == "FileDescriptorMax":
                if not value.isdigit() or not 1 <= int(value) <= FD_MAX_LIMIT:
                    raise InvalidRequest(f"FileDescriptorMax={value!r}: expected 1..{FD_MAX_LIMIT}")
                fields["fd_max"] = int(value)
            elif key == "BytesMax":
                fields["bytes_max"] = _bytes(value)
            elif key == "ReturnTimeoutSec":
                fields["return_timeout_sec"] = _seconds(value)
            else:
                raise InvalidRequest(f"unknown key {key}= in [{SECTION}]")
    return Policy(**fields) if found else None  # type: ignore[arg-type]
