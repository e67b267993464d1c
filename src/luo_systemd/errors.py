"""The one error hierarchy of luo-systemd.

Every error has a D-Bus name under ``io.liveupdate.Agent1.Error.*``, a Varlink error under
``io.liveupdate.Agent.*`` and a CLI exit code.  Each interface translates errors in exactly one place;
nothing else invents error names.  Kernel errnos become these errors in ``liveupdate.kernel_error``.

Imports nothing but ``errno``: luo-hook and the generator import this module at every unit start and
every boot, and must not pay for ctypes or typing.
"""

from __future__ import annotations

import errno as errno_mod

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import ClassVar, Optional

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


class UnreadableImage(LuoError):
    """A kernel image whose LUO format cannot be read (so a live update into it cannot be checked)."""

    name = "UnreadableImage"
    exit_code = ExitCode.INVALID


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
