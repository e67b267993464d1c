"""The service manager's fd protocol from the service's side, stdlib only: the fds it passed
(``LISTEN_FDS``/``LISTEN_FDNAMES``, as sd_listen_fds_with_names()) and notifications with fds, for luod,
and ended by a barrier (as sd_pid_notify_barrier()) for the short-lived luo-hook and luo-qemu.  It uses
``_socket``, the C half of socket: socket imports enum and selectors, which cost luo-hook (and luod's
start-up) more than their own work.
"""

from __future__ import annotations

import _socket as socket
import os

from luo_systemd.varlink import fd_bytes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


def listen_fds() -> dict[str, list[int]]:
    """fds passed by the service manager (socket activation, the fd store), by name; made non-inheritable,
    and the variables removed so that children do not take them for their own."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0"))
    fdnames = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out: dict[str, list[int]] = {}
    for i in range(count):
        fd = 3 + i
        os.set_inheritable(fd, False)
        out.setdefault(fdnames[i] if i < len(fdnames) else "unknown", []).append(fd)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return out


def notify_socket() -> socket.socket:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        raise OSError("$NOTIFY_SOCKET is not set: the unit needs NotifyAccess=exec (the generator sets it)")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    return sock


def send_fds(sock: socket.socket, message: bytes, fds: Sequence[int]) -> None:
    """socket.send_fds() for a _socket."""
    sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_bytes(fds))] if fds else [])


def send(message: str) -> bool:
    """One notification, as sd_notify(): False if there is no service manager to tell.  No barrier: for
    luod's READY=1, STATUS= and STOPPING=1, which it outlives (its fd store keeps a socket of its own,
    agent.SystemdFdStore)."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return False
    sock = notify_socket()
    try:
        send_fds(sock, message.encode(), ())
    finally:
        sock.close()
    return True


def notify(messages: Sequence[tuple[str, Sequence[int]]]) -> None:
    """Sends each (message, fds), then a barrier: our messages are processed before we exit (an exited
    sender's messages may not be attributable to the unit any more, and MAINPID= must arrive before the
    old main process's exit)."""
    sock = notify_socket()
    try:
        for message, fds in messages:
            send_fds(sock, message.encode(), fds)
        r, w = os.pipe()
        try:
            send_fds(sock, b"BARRIER=1", [w])
            os.close(w)
            w = -1
            os.read(r, 1)  # EOF once the manager has processed everything before the barrier
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)
    finally:
        sock.close()
