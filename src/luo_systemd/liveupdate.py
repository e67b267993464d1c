"""The LUO device interface, with the kernel and the emulator (``luo-emu``) behind one API.

Both backends share everything but the last step: the argument structs are built from ``uapi`` and the
errno is translated by ``kernel_error`` here, so a backend is only an *ioctl transport*.  The kernel
transport calls ``ioctl(2)``; the emulator transport sends the same request number and struct bytes to
``luo-emu`` over a Unix socket with the fds attached (SCM_RIGHTS) and gets the kernel's answer back.

The device is opened only for the moment of an operation (``with backend.device() as dev:``): the kernel
allows one open file description at a time and systemd >= 261 needs it too.
"""

from __future__ import annotations

import _socket as socket  # the C half: socket imports enum and selectors (luod's start-up, before READY=1)
import errno
import fcntl
import os
import struct
import time

from luo_systemd import uapi
from luo_systemd.errors import (
    AlreadyPreserved,
    DeviceBusy,
    InvalidArgument,
    KernelError,
    NoSuchSession,
    NoSuchToken,
    NotPreservable,
    NotSupported,
    SessionExists,
    TokenInUse,
)
from luo_systemd.uapi import Ioctl
from luo_systemd.varlink import fd_bytes, fds_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Protocol

DEFAULT_EMULATOR_SOCKET = "/run/luo-emu/liveupdate.sock"


# (operation, errno) -> (error class, reason in words a user understands)
_KERNEL_REASONS: dict[tuple[Optional[Ioctl], int], tuple[type[KernelError], str]] = {
    (None, errno.ENOENT): (
        NotSupported,
        "this kernel has no Live Update Orchestrator "
        "(needs CONFIG_LIVEUPDATE and 'kho=on liveupdate=on' on the command line)",
    ),
    (None, errno.EBUSY): (DeviceBusy, "another process has /dev/liveupdate open"),
    (None, errno.EACCES): (KernelError, "permission denied (only root may open /dev/liveupdate)"),
    (None, errno.EIO): (KernelError, "the incoming live-update state could not be loaded this boot"),
    (Ioctl.CREATE_SESSION, errno.EEXIST): (SessionExists, "an outgoing session of that name exists"),
    (Ioctl.CREATE_SESSION, errno.EINVAL): (InvalidArgument, "the session name must be 1 to 63 bytes"),
    (Ioctl.CREATE_SESSION, errno.ENOSPC): (KernelError, "too many sessions"),
    (Ioctl.RETRIEVE_SESSION, errno.ENOENT): (NoSuchSession, "no incoming session of that name"),
    (Ioctl.RETRIEVE_SESSION, errno.EINVAL): (
        InvalidArgument,
        "the session was already retrieved, or the name is invalid",
    ),
    (Ioctl.SESSION_PRESERVE_FD, errno.EEXIST): (TokenInUse, "the token is already used in this session"),
    (Ioctl.SESSION_PRESERVE_FD, errno.ENOENT): (
        NotPreservable,
        "the kernel cannot preserve this kind of file (only non-hugetlb memfds can be preserved)",
    ),
    (Ioctl.SESSION_PRESERVE_FD, errno.EBUSY): (
        AlreadyPreserved,
        "the file is already preserved in a session, or was retrieved this boot and its session is not finished",
    ),
    (Ioctl.SESSION_PRESERVE_FD, errno.EBADF): (InvalidArgument, "not an open file descriptor"),
    (Ioctl.SESSION_PRESERVE_FD, errno.EFBIG): (KernelError, "the file is too large to preserve"),
    (Ioctl.SESSION_RETRIEVE_FD, errno.ENOENT): (
        NoSuchToken,
        "no file with that token (or the session is finished)",
    ),
}

_OPERATION_WORDS = {
    Ioctl.CREATE_SESSION: "create session",
    Ioctl.RETRIEVE_SESSION: "retrieve session",
    Ioctl.SESSION_PRESERVE_FD: "preserve fd in session",
    Ioctl.SESSION_RETRIEVE_FD: "retrieve fd from session",
    Ioctl.SESSION_FINISH: "finish session",
    Ioctl.SESSION_GET_NAME: "get name of session",
}


def kernel_error(op: Optional[Ioctl], err: int, subject: str = "") -> KernelError:
    """Turns the errno of an ioctl (``op``) or of opening the device (``op=None``) into a typed error."""
    cls, reason = _KERNEL_REASONS.get((op, err), (None, None))
    if cls is None or reason is None:
        cls = InvalidArgument if err == errno.EINVAL else KernelError
        reason = os.strerror(err)
    what = "Failed to open /dev/liveupdate" if op is None else f"Failed to {_OPERATION_WORDS[op]}"
    if subject:
        what += f" {subject}"
    return cls(what, err, reason)


if TYPE_CHECKING:  # a Protocol is for the type checker: typing costs luod's start-up

    class Transport(Protocol):
        """How ioctls reach a LUO implementation.  Errors are raised as OSError with the kernel's errno."""

        kind: str

        def open_device(self) -> int: ...

        def ioctl(self, fd: int, request: Ioctl, arg: bytearray, fd_arg: Optional[int]) -> None: ...


class KernelTransport:
    kind = "kernel"

    def __init__(self, path: str = uapi.LIVEUPDATE_DEV) -> None:
        self.path = path

    def open_device(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: Ioctl, arg: bytearray, fd_arg: Optional[int]) -> None:
        fcntl.ioctl(fd, request, arg, True)


# The emulator's wire format.  Request: header (u32 request, u32 payload length) + payload, with the
# target fd (a session fd) and, for PRESERVE_FD, the file as SCM_RIGHTS.  Reply: i32 errno + payload,
# with a returned fd as SCM_RIGHTS.  Requests outside the ioctl range are emulator controls.
EMU_HEADER = struct.Struct("<II")
EMU_REPLY = struct.Struct("<i")
EMU_MAX_MESSAGE = 65536


class EmuControl:
    OPEN_DEVICE = 0x4C550001  # this connection becomes the device's open file description
    LOAD_KERNEL = 0x4C550010  # emulated kexec_file_load: payload JSON {"cmdline": ...}, fds kernel[, initrd]
    UNLOAD_KERNEL = 0x4C550011
    KEXEC = 0x4C550020  # "the kexec happens now": held outgoing sessions become incoming
    STATUS = 0x4C550030  # counts only, for humans and tests; clients must not rely on it


def emu_send(sock: socket.socket, request: int, payload: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_bytes(fds))] if fds else []
    sock.sendmsg([EMU_HEADER.pack(request, len(payload)) + payload], anc)


def recv_with_fds(sock: socket.socket, max_fds: int = 4) -> tuple[bytes, list[int]]:
    """Receives one message; every received fd gets O_CLOEXEC, as every fd LUO returns has."""
    data, anc, _flags, _addr = sock.recvmsg(EMU_MAX_MESSAGE, socket.CMSG_SPACE(max_fds * 4), socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += fds_of(cdata)
    return data, fds


def emu_call(sock: socket.socket, request: int, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
    """One request and its reply.  Raises OSError(errno) when the emulator answers with an error."""
    emu_send(sock, request, payload, fds)
    data, rfds = recv_with_fds(sock)
    if len(data) < EMU_REPLY.size:
        for fd in rfds:
            os.close(fd)
        raise OSError(errno.EPIPE, "The LUO emulator closed the connection")
    (err,) = EMU_REPLY.unpack_from(data)
    if err:
        for fd in rfds:
            os.close(fd)
        raise OSError(err, os.strerror(err))
    return data[EMU_REPLY.size :], rfds


class EmulatorTransport:
    kind = "emulator"

    def __init__(self, path: str = DEFAULT_EMULATOR_SOCKET) -> None:
        self.path = path

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            # No emulator is the emulated form of "this kernel has no /dev/liveupdate".
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise OSError(errno.ENOENT, f"no LUO emulator listens on {self.path}") from e
            raise
        return sock

    def control(self, request: int, payload: bytes = b"", fds: Optional[list[int]] = None) -> bytes:
        sock = self.connect()
        try:
            data, rfds = emu_call(sock, request, payload, fds or [])
        finally:
            sock.close()
        for fd in rfds:
            os.close(fd)
        return data

    def open_device(self) -> int:
        sock = self.connect()
        try:
            emu_call(sock, EmuControl.OPEN_DEVICE, b"", [])
        except BaseException:
            sock.close()
            raise
        return sock.detach()

    def ioctl(self, fd: int, request: Ioctl, arg: bytearray, fd_arg: Optional[int]) -> None:
        if request in uapi.DEVICE_IOCTLS:  # over the device's connection, ``fd`` itself
            sock, fds = socket.socket(fileno=os.dup(fd)), []
        else:  # over a connection of its own, with the session (and the file) as SCM_RIGHTS
            sock, fds = self.connect(), [fd] if fd_arg is None else [fd, fd_arg]
        try:
            reply, rfds = emu_call(sock, request, bytes(arg), fds)
        finally:
            sock.close()
        arg[: len(reply)] = reply
        if rfds:
            # The emulator's fd number means nothing here; put ours where the kernel would have.
            struct.pack_into("<i", arg, 4, rfds[0])
            for extra in rfds[1:]:
                os.close(extra)


class Device:
    """An open /dev/liveupdate, closed at the end of a ``with`` block (``Backend.device``).  Only session
    creation and retrieval happen on the device."""

    def __init__(self, backend: Backend, fd: int) -> None:
        self.backend = backend
        self.fd = fd

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.fd)

    def create_session(self, name: bytes) -> int:
        """Creates an outgoing session; returns its fd (owned by the caller)."""
        return self._session_call(Ioctl.CREATE_SESSION, name)

    def retrieve_session(self, name: bytes) -> int:
        """Retrieves an incoming session by name; returns its fd (owned by the caller)."""
        return self._session_call(Ioctl.RETRIEVE_SESSION, name)

    def _session_call(self, request: Ioctl, name: bytes) -> int:
        try:
            buf = uapi.ARG[request].pack(name=uapi.encode_name(name))
        except ValueError:
            raise kernel_error(request, errno.EINVAL, _quote(name)) from None
        self.backend.call(self.fd, request, buf, None, _quote(name))
        return int(ARG_FD.unpack_from(buf, 4)[0])


ARG_FD = struct.Struct("<i")


def _quote(name: bytes) -> str:
    return "'" + name.decode(errors="backslashreplace") + "'"


class Backend:
    """The LUO operations over one transport (kernel or emulator)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @property
    def kind(self) -> str:
        return self.transport.kind

    def device(self, busy_retries: int = 0, backoff_sec: float = 0.05) -> Device:
        """Opens the device for the duration of a ``with`` block (not contextlib.contextmanager: contextlib
        imports collections and functools, which luod's start would load for this alone).

        Another opener (systemd >= 261 opens it briefly at boot, service start and shutdown) gives EBUSY;
        that is retried ``busy_retries`` times with a doubling delay, then raised as DeviceBusy.
        """
        for attempt in range(busy_retries + 1):
            try:
                fd = self.transport.open_device()
                break
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == busy_retries:
                    raise kernel_error(None, e.errno or errno.EIO) from None
            time.sleep(backoff_sec * (1 << attempt))
        return Device(self, fd)

    def call(self, fd: int, request: Ioctl, buf: bytearray, fd_arg: Optional[int], subject: str) -> None:
        """Issues one ioctl with a raw argument buffer; errors become typed ``KernelError``s."""
        try:
            self.transport.ioctl(fd, request, buf, fd_arg)
        except OSError as e:
            raise kernel_error(request, e.errno or errno.EIO, subject) from None

    def preserve_fd(self, session: int, fd: int, token: int) -> None:
        buf = uapi.ARG[Ioctl.SESSION_PRESERVE_FD].pack(fd=fd, token=_check_token(token, Ioctl.SESSION_PRESERVE_FD))
        self.call(session, Ioctl.SESSION_PRESERVE_FD, buf, fd, f"(token {token})")

    def retrieve_fd(self, session: int, token: int) -> int:
        buf = uapi.ARG[Ioctl.SESSION_RETRIEVE_FD].pack(token=_check_token(token, Ioctl.SESSION_RETRIEVE_FD))
        self.call(session, Ioctl.SESSION_RETRIEVE_FD, buf, None, f"(token {token})")
        return int(ARG_FD.unpack_from(buf, 4)[0])

    def finish(self, session: int) -> None:
        self.call(session, Ioctl.SESSION_FINISH, uapi.ARG[Ioctl.SESSION_FINISH].pack(), None, "")

    def session_name(self, session: int) -> bytes:
        """The name of a session fd; raises KernelError if ``session`` is no LUO session."""
        layout = uapi.ARG[Ioctl.SESSION_GET_NAME]
        buf = layout.pack()
        self.call(session, Ioctl.SESSION_GET_NAME, buf, None, "")
        return uapi.decode_name(layout.unpack(buf)["name"])

    def is_session(self, fd: int) -> bool:
        try:
            self.session_name(fd)
        except KernelError:
            return False
        return True


def _check_token(token: int, request: Ioctl) -> int:
    if not 0 <= token < 1 << 64:
        raise kernel_error(request, errno.EINVAL, f"(token {token} is not a u64)")
    return token


def kernel_backend(path: str = uapi.LIVEUPDATE_DEV) -> Backend:
    return Backend(KernelTransport(path))


def emulator_backend(path: str = DEFAULT_EMULATOR_SOCKET) -> Backend:
    return Backend(EmulatorTransport(path))
