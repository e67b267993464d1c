"""The values the agent's API speaks in, shared by both adapters (D-Bus, Varlink) and both clients.

Frozen: a value that left the broker cannot change behind its reader's back.  Each adapter translates
these to its wire format in one place; nothing indexes untyped dicts.  NamedTuples, not dataclasses: luod
imports this module before READY=1 (see luo_systemd.records).
"""

from __future__ import annotations

from luo_systemd.records import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, Optional


class Caller(NamedTuple):
    """Who called: the uid, and the unit of the process, read through a pidfd that pinned it."""

    uid: int
    pid: int
    # None: the process is in no unit, its unit could not be checked (see unverified), or it was not read
    # (root naming the unit it acts on: authz.identify)
    unit: Optional[str]
    unverified: str = ""  # why the unit could not be checked (no pidfd for this peer); "" if it was

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def describe(self) -> str:
        return f"PID {self.pid} (uid {self.uid}, {self.unit or 'no unit'})"


AGENT = Caller(uid=0, pid=0, unit=None)  # luod itself, acting on its own decisions (expiry, kexec watch)


class Problem(NamedTuple):
    unit: str  # "" for the whole system
    message: str
    left_out: bool = False  # the unit is left out of the live update (OnPreflightFailure=leave-out): no veto

    def line(self) -> str:
        text = f"{self.unit}: {self.message}" if self.unit else self.message
        return text + (" (left out of the live update)" if self.left_out else "")


def refusing(problems: Iterable[Problem]) -> list[Problem]:
    """The problems that refuse a live update: all but those of units left out of it."""
    return [p for p in problems if not p.left_out]


class FdInfo(NamedTuple):
    name: str
    kind: str  # "memfd" or "session"
    state: str  # "stored", "preserved" or "restored"
    order: int
    session: str  # kind "session": the LUO session's name


class UnitStatus(NamedTuple):
    unit: str
    stored: int
    preserved: int
    restored: int
    sessions: int
    finished: bool


class AgentStatus(NamedTuple):
    phase: str
    supported: bool
    backend: str
    live_update_count: int
    units: tuple[UnitStatus, ...]  # only the caller's own unit unless the caller is root
    problems: tuple[Problem, ...]


def wire(value: object) -> Any:
    """A value of this module as plain data (Varlink's JSON, the metrics' status): a dict of its fields,
    each field in its wire form, tuples as lists."""
    fields = getattr(value, "_fields", None)
    if fields is not None:
        return {name: wire(getattr(value, name)) for name in fields}
    if isinstance(value, (tuple, list)):
        return [wire(v) for v in value]
    return value
