"""Where permissions are checked: who a caller is, and what it may act on.

A caller acts on its own unit; root acts on any unit and alone controls live updates.  The caller's unit
comes from its cgroup, read through a pidfd that pins the process (``cgroups.unit_of_pidfd``); a peer for
which no pidfd can be had (a bus daemon without ProcessFD, a kernel before 6.5) is trusted for its uid
only: root may still name units, anyone else is refused.  Every method authorizes before any other work.
"""

from __future__ import annotations

from luo_systemd import cgroups, names
from luo_systemd.api import Caller
from luo_systemd.errors import AccessDenied

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

    from luo_systemd.ownedfd import OwnedFd


def identify(
    uid: int, pid: int, pidfd: Optional[OwnedFd], cgroup_root: str, no_pidfd_reason: str, names_unit: bool = False
) -> Caller:
    """The caller behind a connection: its unit is read through ``pidfd``; never looked up by PID.  Not for
    root naming the unit it acts on (``names_unit``): root may act on any unit, so its own decides nothing
    (``authorize``), and reading it costs every hook of a root unit two /proc files per call."""
    if pidfd is None:
        return Caller(uid=uid, pid=pid, unit=None, unverified=no_pidfd_reason)
    if uid == 0 and names_unit:
        return Caller(uid=uid, pid=pid, unit=None)
    return Caller(uid=uid, pid=pid, unit=cgroups.unit_of_pidfd(pidfd.fileno(), cgroup_root))


def authorize(caller: Caller, unit: str) -> str:
    """The unit a caller acts on: its own (``unit`` empty or equal), or any unit if it is root."""
    if caller.unverified and not caller.is_root:
        raise AccessDenied(f"{caller.describe()}: {caller.unverified}")
    if not unit:
        if caller.unit is None:
            raise AccessDenied(f"{caller.describe()} is not part of a unit; name the unit explicitly")
        return caller.unit
    names.check_unit_name(unit)
    if unit != caller.unit and not caller.is_root:
        raise AccessDenied(f"{caller.describe()} may act only on its own unit, not on {unit}")
    return unit


def require_root(caller: Caller, what: str) -> None:
    if not caller.is_root:
        raise AccessDenied(f"{what} is for root only; {caller.describe()} is not root")


def sees_unit(caller: Caller, unit: str) -> bool:
    """Whether a caller may see a unit's name and status: root sees all, others their own unit."""
    return caller.is_root or (not caller.unverified and caller.unit == unit)
