"""Pins the kernel ABI: every ioctl number, struct size and field offset of linux/liveupdate.h (7.3)."""

from __future__ import annotations

import ctypes
import errno

import pytest

from luo_systemd import errors, uapi
from luo_systemd.liveupdate import kernel_error
from luo_systemd.uapi import Ioctl


def test_ioctl_numbers() -> None:
    assert {i.name: i.value for i in Ioctl} == {
        "CREATE_SESSION": 0xBA00,
        "RETRIEVE_SESSION": 0xBA01,
        "SESSION_PRESERVE_FD": 0xBA40,
        "SESSION_RETRIEVE_FD": 0xBA41,
        "SESSION_FINISH": 0xBA42,
        "SESSION_GET_NAME": 0xBA43,
    }


class create_session(ctypes.Structure):  # linux/liveupdate.h's structs, as C lays them out
    _fields_ = [("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("name", ctypes.c_uint8 * 64)]


class preserve_fd(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("fd", ctypes.c_int32), ("token", ctypes.c_uint64)]


class finish(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class get_name(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("name", ctypes.c_uint8 * 64)]


@pytest.mark.parametrize(
    ("request_", "c_struct", "size"),
    [
        (Ioctl.CREATE_SESSION, create_session, 72),
        (Ioctl.RETRIEVE_SESSION, create_session, 72),
        (Ioctl.SESSION_PRESERVE_FD, preserve_fd, 16),
        (Ioctl.SESSION_RETRIEVE_FD, preserve_fd, 16),
        (Ioctl.SESSION_FINISH, finish, 8),
        (Ioctl.SESSION_GET_NAME, get_name, 72),
    ],
)
def test_argument_layout_is_the_c_structs(request_: Ioctl, c_struct: type[ctypes.Structure], size: int) -> None:
    """uapi packs with ``struct``; every field lands where the C struct has it."""
    layout = uapi.ARG[request_]
    assert layout.size == ctypes.sizeof(c_struct) == size
    assert layout.names == tuple(name for name, _ in c_struct._fields_)
    values = {name: (b"n" * 63 if name == "name" else i + 1) for i, name in enumerate(layout.names)}
    packed = layout.pack(**values)
    c = c_struct.from_buffer_copy(packed)
    for name, value in values.items():
        assert (bytes(getattr(c, name))[:63] if name == "name" else getattr(c, name)) == value, name
    assert layout.unpack(packed) == {**values, **({"name": b"n" * 63 + b"\0"} if "name" in values else {})}


def test_new_argument_fills_size_and_zeroes_the_rest() -> None:
    for request, layout in uapi.ARG.items():
        assert layout.unpack(layout.pack())["size"] == layout.size, request
        assert not any(layout.pack()[4:])


def test_name_field() -> None:
    layout = uapi.ARG[Ioctl.CREATE_SESSION]
    assert uapi.decode_name(layout.unpack(layout.pack(name=uapi.encode_name(b"abc")))["name"]) == b"abc"
    assert layout.unpack(layout.pack(name=uapi.encode_name(b"x" * 64)))["name"] == b"x" * 64  # no NUL: EINVAL
    with pytest.raises(ValueError):
        uapi.encode_name(b"x" * 65)


def test_kernel_errors_say_what_and_why() -> None:
    e = kernel_error(Ioctl.SESSION_PRESERVE_FD, errno.EBUSY, "(token 3)")
    assert isinstance(e, errors.AlreadyPreserved)
    assert str(e).startswith("Failed to preserve fd in session (token 3): the file is already preserved")
    assert str(e).endswith("(EBUSY)")
    assert e.dbus_name == "io.liveupdate.Agent1.Error.AlreadyPreserved"
    assert e.varlink_error == "io.liveupdate.Agent.AlreadyPreserved"
    unknown = kernel_error(Ioctl.SESSION_FINISH, errno.ENOMEM)
    assert type(unknown) is errors.KernelError and "Cannot allocate memory" in str(unknown)


def test_error_names_are_unique() -> None:
    names = [cls.name for cls in errors.all_error_classes()]
    assert len(names) == len(set(names))


def test_names_knows_the_session_name_length_without_importing_uapi() -> None:
    from luo_systemd import names  # noqa: PLC0415

    assert names.SESSION_NAME_MAX == uapi.LIVEUPDATE_SESSION_NAME_LENGTH - 1
