"""The kernel ABI of the Live Update Orchestrator, as in linux/liveupdate.h (Linux 7.3).

Names mirror the C header.  This module holds layout and numbers only: no policy, no logging.  Every
ioctl is ``_IO(0xBA, nr)`` (no size or direction bits) and every argument starts with ``u32 size``,
which the kernel checks against the struct size below (smaller: EINVAL; larger: accepted only if the
extra bytes are zero, else E2BIG).
"""

from __future__ import annotations

import ctypes

from luo_systemd.records import IntChoice

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


class liveupdate_ioctl_create_session(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("name", ctypes.c_uint8 * LIVEUPDATE_SESSION_NAME_LENGTH),
    ]


class liveupdate_ioctl_retrieve_session(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("name", ctypes.c_uint8 * LIVEUPDATE_SESSION_NAME_LENGTH),
    ]


class liveupdate_session_preserve_fd(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("token", ctypes.c_uint64),
    ]


class liveupdate_session_retrieve_fd(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("token", ctypes.c_uint64),
    ]


class liveupdate_session_finish(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class liveupdate_session_get_name(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("name", ctypes.c_uint8 * LIVEUPDATE_SESSION_NAME_LENGTH),
    ]


ArgStruct = type[ctypes.Structure]

ARG_STRUCT: dict[Ioctl, ArgStruct] = {
    Ioctl.CREATE_SESSION: liveupdate_ioctl_create_session,
    Ioctl.RETRIEVE_SESSION: liveupdate_ioctl_retrieve_session,
    Ioctl.SESSION_PRESERVE_FD: liveupdate_session_preserve_fd,
    Ioctl.SESSION_RETRIEVE_FD: liveupdate_session_retrieve_fd,
    Ioctl.SESSION_FINISH: liveupdate_session_finish,
    Ioctl.SESSION_GET_NAME: liveupdate_session_get_name,
}

DEVICE_IOCTLS = frozenset({Ioctl.CREATE_SESSION, Ioctl.RETRIEVE_SESSION})

# The target of ``readlink /proc/PID/fd/N`` for a session fd is "anon_inode:[luo_session] NAME".
SESSION_LINK_PREFIX = "anon_inode:[luo_session]"


def encode_name(name: bytes) -> ctypes.Array[ctypes.c_uint8]:
    """Packs a session name into the fixed 64-byte field; the kernel wants a NUL within it."""
    if len(name) > LIVEUPDATE_SESSION_NAME_LENGTH:
        raise ValueError(f"session name longer than {LIVEUPDATE_SESSION_NAME_LENGTH} bytes")
    field = (ctypes.c_uint8 * LIVEUPDATE_SESSION_NAME_LENGTH)()
    ctypes.memmove(field, name, len(name))
    return field


def decode_name(field: ctypes.Array[ctypes.c_uint8]) -> bytes:
    return bytes(field).split(b"\0", 1)[0]


def new_arg(request: Ioctl) -> ctypes.Structure:
    """A zeroed argument struct for ``request`` with ``size`` filled in."""
    arg = ARG_STRUCT[request]()
    arg.size = ctypes.sizeof(arg)
    return arg
