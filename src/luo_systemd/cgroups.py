"""Who is calling: a process's unit, from its cgroup (as systemd's cg_pid_get_unit() finds it).

A caller is known by a pidfd: the peer's (SO_PEERPIDFD, Varlink) or the bus's (ProcessFD, D-Bus).  The
cgroup is read through the PID the pidfd names, and the process must still be alive after the read, so a
PID that is reused in between cannot lend its unit to another process.  There is no lookup by PID alone.
"""

from __future__ import annotations

import _socket as socket  # the C half: socket imports enum and selectors (luod's start-up, before READY=1)
import os
import select
import struct

from luo_systemd.errors import AccessDenied
from luo_systemd.names import is_unit_name
from luo_systemd.ownedfd import OwnedFd

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

SO_PEERPIDFD = 77  # Linux 6.5; not in Python's socket module yet


_tracking: list[str] = []  # tracking_hierarchy(), once found: luod asks at every call it serves


def tracking_hierarchy() -> str:
    """The cgroup hierarchy systemd tracks units in here: the unified one ("") where /sys/fs/cgroup is
    cgroup2, else name=systemd (legacy and hybrid).  A container may see its host's other hierarchies.
    Found once per process: what is mounted there does not change under a running system.  Every cgroup2
    directory has cgroup.controllers and the tmpfs of legacy and hybrid mounts has none, so this tells what
    systemd's statfs() does, without ctypes for fstatfs() (its import, ~2 ms, came before luod's first answer)."""
    if not _tracking:
        unified = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        _tracking.append("" if unified else "name=systemd")
    return _tracking[0]


def cgroup_path(pid: int | str, hierarchy: Optional[str] = None) -> str:
    """The path of the process's cgroup in systemd's tracking hierarchy."""
    wanted = tracking_hierarchy() if hierarchy is None else hierarchy
    for line in read_proc(f"/proc/{pid}/cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == wanted:
            return path
    raise OSError(f"process {pid} is in no {wanted or 'unified'} cgroup")


def read_proc(path: str) -> str:
    """A small /proc file whole, without open()'s buffered text layers: luod reads two per call it serves."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def unit_of_cgroup(path: str, root: str = "/") -> Optional[str]:
    """'/system.slice/foo.service/sub' -> 'foo.service' (slices skipped); None outside any unit."""
    root = root.rstrip("/")
    if root and not (path == root or path.startswith(root + "/")):
        return None
    for part in path[len(root) :].split("/"):
        if not part or part.endswith(".slice"):
            continue
        return part if is_unit_name(part) else None
    return None


def manager_root(own_cgroup: str) -> str:
    """The cgroup of the service manager that runs us: the path above our unit and the slices over it.

    '/system.slice/luod.service' -> '/' ; '/test-123/app.slice/luod.service' -> '/test-123'.
    """
    parts = own_cgroup.strip("/").split("/")
    for index, part in enumerate(parts):
        if is_unit_name(part) and not part.endswith(".slice"):
            top = index
            while top > 0 and parts[top - 1].endswith(".slice"):
                top -= 1
            return "/" + "/".join(parts[:top])
    return "/"


def pidfd_alive(pidfd: int) -> bool:
    """A pidfd becomes readable when its process exits.  poll(), not select(): fds reach past 1023."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def pid_of_pidfd(pidfd: int) -> int:
    """The PID a pidfd names now (its fdinfo), or -1 once the process is gone."""
    for line in read_proc(f"/proc/self/fdinfo/{pidfd}").splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    raise AccessDenied("not a pidfd")


def unit_of_pidfd(pidfd: int, root: str) -> Optional[str]:
    """The unit of the process a pidfd pins.  Its cgroup is read through the PID and trusted only if the
    pidfd's process is still alive after the read: a recycled PID can never lend its unit."""
    pid = pid_of_pidfd(pidfd)
    try:
        if pid <= 0:
            raise FileNotFoundError
        path = cgroup_path(pid)
    except (ProcessLookupError, FileNotFoundError):
        raise AccessDenied("the calling process has exited; its identity cannot be checked") from None
    if not pidfd_alive(pidfd):
        raise AccessDenied(f"process {pid} exited while its credentials were checked")
    return unit_of_cgroup(path, root)


def peer_credentials(sock: socket.socket) -> tuple[int, int, Optional[OwnedFd]]:
    """(pid, uid, pidfd or None) of a connected Unix socket's peer: the pidfd pins the process that
    connected (Linux >= 6.5); without it the peer can only be trusted for its uid."""
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        pidfd = OwnedFd(struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0])
    except OSError:
        return pid, uid, None
    return pid, uid, pidfd
