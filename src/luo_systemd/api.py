"""The values the agent's API speaks in, shared by both adapters (D-Bus, Varlink) and both clients.

Frozen: a value that left the broker cannot change behind its reader's back.  Each adapter translates
these to its wire format in one place; nothing indexes untyped dicts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who called: the uid, and the unit of the process, read through a pidfd that pinned it."""

    uid: int
    pid: int
    unit: Optional[str]  # None: the process is in no unit, or its unit could not be checked (see unverified)
    unverified: str = ""  # why the unit could not be checked (no pidfd for this peer); "" if it was

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def describe(self) -> str:
        return f"PID {self.pid} (uid {self.uid}, {self.unit or 'no unit'})"


AGENT = Caller(uid=0, pid=0, unit=None)  # luod itself, acting on its own decisions (expiry, kexec watch)


@dataclasses.dataclass(frozen=True)
class Problem:
    unit: str  # "" for the whole system
    message: str
    left_out: bool = False  # the unit is left out of the live update (OnPreflightFailure=leave-out): no veto

    def line(self) -> str:
        text = f"{self.unit}: {self.message}" if self.unit else self.message
        return text + (" (left out of the live update)" if self.left_out else "")


def refusing(problems: Iterable[Problem]) -> list[Problem]:
    """The problems that refuse a live update: all but those of units left out of it."""
    return [p for p in problems if not p.left_out]


@dataclasses.dataclass(frozen=True)
class FdInfo:
    name: str
    kind: str  # "memfd" or "session"
    state: str  # "stored", "preserved" or "restored"
    order: int
    session: str  # kind "session": the LUO session's name


@dataclasses.dataclass(frozen=True)
class UnitStatus:
    unit: str
    stored: int
    preserved: int
    restored: int
    sessions: int
    finished: bool


@dataclasses.dataclass(frozen=True)
class AgentStatus:
    phase: str
    supported: bool
    backend: str
    live_update_count: int
    units: tuple[UnitStatus, ...]  # only the caller's own unit unless the caller is root
    problems: tuple[Problem, ...]
