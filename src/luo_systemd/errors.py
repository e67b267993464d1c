"""The one error hierarchy of luo-systemd.

Every error has a D-Bus name under ``io.liveupdate.Agent1.Error.*``, a Varlink error under
``io.liveupdate.Agent.*`` and a CLI exit code.  Each interface translates errors in exactly one place;
nothing else invents error names.
"""

from __future__ import annotations

import errno as errno_mod
import os
from typing import ClassVar, Optional

from luo_systemd.uapi import Ioctl

DBUS_ERROR_PREFIX = "io.liveupdate.Agent1.Error."
VARLINK_ERROR_PREFIX = "io.liveupdate.Agent."


class ExitCode:
    """Exit codes of liveupdatectl and luo-hook, documented in liveupdatectl(1)."""

    FAILURE = 1
    USAGE = 2
    PREFLIGHT = 3
    ACCESS_DENIED = 4
    NOT_SUPPORTED = 5
    BUSY = 6
    NOT_FOUND = 7
    INVALID = 8


class LuoError(Exception):
    """Base of every error the project reports to a user or a caller."""

    name: ClassVar[str] = "Failed"
    exit_code: ClassVar[int] = ExitCode.FAILURE
    errno: Optional[int] = None

    @property
    def dbus_name(self) -> str:
        return DBUS_ERROR_PREFIX + self.name

    @property
    def varlink_error(self) -> str:
        return VARLINK_ERROR_PREFIX + self.name

    @property
    def message(self) -> str:
        return str(self)


# Errors of the kernel interface (or the emulator, which must raise exactly the same ones).


class KernelError(LuoError):
    """A LUO ioctl (or the open of the device) failed; ``errno`` is the kernel's answer."""

    name = "Kernel"

    def __init__(self, what: str, errno: int, reason: str) -> None:
        self.errno = errno
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason} ({errno_mod.errorcode.get(errno, errno)})")


class NotSupported(KernelError):
    name = "NotSupported"
    exit_code = ExitCode.NOT_SUPPORTED


class DeviceBusy(KernelError):
    name = "DeviceBusy"
    exit_code = ExitCode.BUSY


class SessionExists(KernelError):
    name = "SessionExists"
    exit_code = ExitCode.BUSY


class NoSuchSession(KernelError):
    name = "NoSuchSession"
    exit_code = ExitCode.NOT_FOUND


class NoSuchToken(KernelError):
    name = "NoSuchToken"
    exit_code = ExitCode.NOT_FOUND


class TokenInUse(KernelError):
    name = "TokenInUse"
    exit_code = ExitCode.BUSY


class NotPreservable(KernelError):
    name = "NotPreservable"
    exit_code = ExitCode.INVALID


class AlreadyPreserved(KernelError):
    name = "AlreadyPreserved"
    exit_code = ExitCode.BUSY


class InvalidArgument(KernelError):
    name = "InvalidArgument"
    exit_code = ExitCode.INVALID


# (operation, errno) -> (error class, reason in words a user understands)
_KERNEL_REASONS: dict[tuple[Optional[Ioctl], int], tuple[type[KernelError], str]] = {
    (None, errno_mod.ENOENT): (
        NotSupported,
        "this kernel has no Live Update Orchestrator "
        "(needs CONFIG_LIVEUPDATE and 'kho=on liveupdate=on' on the command line)",
    ),
    (None, errno_mod.EBUSY): (DeviceBusy, "another process has /dev/liveupdate open"),
    (None, errno_mod.EACCES): (KernelError, "permission denied (only root may open /dev/liveupdate)"),
    (None, errno_mod.EIO): (KernelError, "the incoming live-update state could not be loaded this boot"),
    (Ioctl.CREATE_SESSION, errno_mod.EEXIST): (SessionExists, "an outgoing session of that name exists"),
    (Ioctl.CREATE_SESSION, errno_mod.EINVAL): (InvalidArgument, "the session name must be 1 to 63 bytes"),
    (Ioctl.CREATE_SESSION, errno_mod.ENOSPC): (KernelError, "too many sessions"),
    (Ioctl.RETRIEVE_SESSION, errno_mod.ENOENT): (NoSuchSession, "no incoming session of that name"),
    (Ioctl.RETRIEVE_SESSION, errno_mod.EINVAL): (
        InvalidArgument,
        "the session was already retrieved, or the name is invalid",
    ),
    (Ioctl.SESSION_PRESERVE_FD, errno_mod.EEXIST): (TokenInUse, "the token is already used in this session"),
    (Ioctl.SESSION_PRESERVE_FD, errno_mod.ENOENT): (
        NotPreservable,
        "the kernel cannot preserve this kind of file (only non-hugetlb memfds can be preserved)",
    ),
    (Ioctl.SESSION_PRESERVE_FD, errno_mod.EBUSY): (
        AlreadyPreserved,
        "the file is already preserved in a session, or was retrieved this boot and its session is not finished",
    ),
    (Ioctl.SESSION_PRESERVE_FD, errno_mod.EBADF): (InvalidArgument, "not an open file descriptor"),
    (Ioctl.SESSION_PRESERVE_FD, errno_mod.EFBIG): (KernelError, "the file is too large to preserve"),
    (Ioctl.SESSION_RETRIEVE_FD, errno_mod.ENOENT): (
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
        cls = InvalidArgument if err == errno_mod.EINVAL else KernelError
        reason = os.strerror(err)
    what = "Failed to open /dev/liveupdate" if op is None else f"Failed to {_OPERATION_WORDS[op]}"
    if subject:
        what += f" {subject}"
    return cls(what, err, reason)


# Errors of the agent's own rules.


class InvalidName(LuoError):
    name = "InvalidName"
    exit_code = ExitCode.INVALID


class InvalidFd(LuoError):
    """An fd of a kind that cannot be carried (only memfds and LUO sessions can)."""

    name = "InvalidFd"
    exit_code = ExitCode.INVALID


class InvalidRequest(LuoError):
    name = "InvalidRequest"
    exit_code = ExitCode.INVALID


class AccessDenied(LuoError):
    name = "AccessDenied"
    exit_code = ExitCode.ACCESS_DENIED


class LimitExceeded(LuoError):
    name = "LimitExceeded"
    exit_code = ExitCode.INVALID


class NotFound(LuoError):
    name = "NotFound"
    exit_code = ExitCode.NOT_FOUND


class WrongPhase(LuoError):
    name = "WrongPhase"
    exit_code = ExitCode.BUSY


class BadManifest(LuoError):
    name = "BadManifest"


class PreflightFailed(LuoError):
    name = "PreflightFailed"
    exit_code = ExitCode.PREFLIGHT


class AgentUnavailable(LuoError):
    name = "AgentUnavailable"
    exit_code = ExitCode.NOT_SUPPORTED


class VmmFailed(LuoError):
    """luo-qemu: the virtual machine monitor refused or failed a step (its own words are in the message)."""

    name = "VmmFailed"


def all_error_classes() -> list[type[LuoError]]:
    """Every concrete error class, for interface descriptions and tests."""
    seen: list[type[LuoError]] = []
    stack: list[type[LuoError]] = [LuoError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


def from_name(name: str, message: str, errno: Optional[int] = None) -> LuoError:
    """Rebuilds a LuoError a client received by name (D-Bus or Varlink); unknown names give LuoError."""
    cls = next((c for c in all_error_classes() if c.name == name), LuoError)
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.errno = errno
    return err
