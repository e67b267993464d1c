"""The kernel ABI of the Live Update Orchestrator, as in linux/liveupdate.h (Linux 7.3).

Names mirror the C header.  This module holds layout and numbers only: no policy, no logging.  Every
ioctl is ``_IO(0xBA, nr)`` (no size or direction bits) and every argument starts with ``u32 size``,
which the kernel checks against the struct size below (smaller: EINVAL; larger: accepted only if the
extra bytes are zero, else E2BIG).
"""

from __future__ import annotations

import struct

from luo_systemd.records import IntChoice

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LIVEUPDATE_DEV = "/dev/liveupdate"
LIVEUPDATE_IOCTL_TYPE = 0xBA
LIVEUPDATE_SESSION_NAME_LENGTH = 64  # including the terminating NUL, so names are 1..63 bytes


def _IO(nr: int) -> int:
    return (LIVEUPDATE_IOCTL_TYPE << 8) | nr


class Ioctl(IntChoice):  # not enum.IntEnum: luod uses it before READY=1 (see luo_systemd.records)
    CREATE_SESSION = _IO(0x00)
    RETRIEVE_SESSION = _IO(0x01)
    SESSION_PRESERVE_FD = _IO(0x40)
    SESSION_RETRIEVE_FD = _IO(0x41)
    SESSION_FINISH = _IO(0x42)
    SESSION_GET_NAME = _IO(0x43)


class ArgLayout:
    """One ioctl's argument struct: its fields in order, as ``struct`` codes at the C header's offsets
    (native byte order; every field is naturally aligned, so there is no padding).  struct, not ctypes:
    luod restores before READY=1, and ctypes was an eighth of what its start-up ran (callgrind, exec to
    READY=1: 51.5 M instructions with it, 45.3 M without; the bare interpreter 20.9 M)."""

    def __init__(self, *fields: tuple[str, str]) -> None:
        self.names = tuple(name for name, _ in fields)
        self.struct = struct.Struct("=" + "".join(code for _, code in fields))
        self.size = self.struct.size
        self._zero = tuple(b"" if code.endswith("s") else 0 for _, code in fields)

    def pack(self, **values: int | bytes) -> bytearray:
        """The argument with ``size`` filled in and every field not given zero."""
        values.setdefault("size", self.size)
        return bytearray(self.struct.pack(*(values.get(n, z) for n, z in zip(self.names, self._zero))))

    def unpack(self, buf: bytes | bytearray) -> dict[str, Any]:
        return dict(zip(self.names, self.struct.unpack_from(buf)))


_NAME = ("name", f"{LIVEUPDATE_SESSION_NAME_LENGTH}s")

ARG: dict[Ioctl, ArgLayout] = {  # struct liveupdate_ioctl_create_session and so on
    Ioctl.CREATE_SESSION: ArgLayout(("size", "I"), ("fd", "i"), _NAME),
    Ioctl.RETRIEVE_SESSION: ArgLayout(("size", "I"), ("fd", "i"), _NAME),
    Ioctl.SESSION_PRESERVE_FD: ArgLayout(("size", "I"), ("fd", "i"), ("token", "Q")),
    Ioctl.SESSION_RETRIEVE_FD: ArgLayout(("size", "I"), ("fd", "i"), ("token", "Q")),
    Ioctl.SESSION_FINISH: ArgLayout(("size", "I"), ("reserved", "I")),
    Ioctl.SESSION_GET_NAME: ArgLayout(("size", "I"), ("reserved", "I"), _NAME),
}

DEVICE_IOCTLS = frozenset({Ioctl.CREATE_SESSION, Ioctl.RETRIEVE_SESSION})

# The target of ``readlink /proc/PID/fd/N`` for a session fd is "anon_inode:[luo_session] NAME".
SESSION_LINK_PREFIX = "anon_inode:[luo_session]"


def encode_name(name: bytes) -> bytes:
    """A session name for the fixed 64-byte field (``struct`` pads it with NULs); the kernel wants a NUL
    within it."""
    if len(name) > LIVEUPDATE_SESSION_NAME_LENGTH:
        raise ValueError(f"session name longer than {LIVEUPDATE_SESSION_NAME_LENGTH} bytes")
    return name


def decode_name(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]
