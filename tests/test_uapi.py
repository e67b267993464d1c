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


@pytest.mark.parametrize(
    ("struct", "size", "offsets"),
    [
        (uapi.liveupdate_ioctl_create_session, 72, {"size": 0, "fd": 4, "name": 8}),
        (uapi.liveupdate_ioctl_retrieve_session, 72, {"size": 0, "fd": 4, "name": 8}),
        (uapi.liveupdate_session_preserve_fd, 16, {"size": 0, "fd": 4, "token": 8}),
        (uapi.liveupdate_session_retrieve_fd, 16, {"size": 0, "fd": 4, "token": 8}),
        (uapi.liveupdate_session_finish, 8, {"size": 0, "reserved": 4}),
        (uapi.liveupdate_session_get_name, 72, {"size": 0, "reserved": 4, "name": 8}),
    ],
)
def test_struct_layout(struct: type[ctypes.Structure], size: int, offsets: dict[str, int]) -> None:
    assert ctypes.sizeof(struct) == size
    assert {name: getattr(struct, name).offset for name in offsets} == offsets


def test_new_arg_fills_size() -> None:
    for request in Ioctl:
        assert uapi.new_arg(request).size == ctypes.sizeof(uapi.ARG_STRUCT[request])


def test_name_field() -> None:
    assert uapi.decode_name(uapi.encode_name(b"abc")) == b"abc"
    assert bytes(uapi.encode_name(b"x" * 64)) == b"x" * 64  # no room for the NUL: the kernel says EINVAL
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
