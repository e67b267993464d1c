"""dbus_service.py works around dbus-next defects through its private names; pyproject.toml pins the one
version they were read from.  This fails loudly when another version is installed or a name moved."""

from __future__ import annotations

import inspect
from importlib.metadata import version

from dbus_next.aio import message_bus
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface

PINNED = "0.2.3"


def test_the_pinned_version_is_installed() -> None:
    assert version("dbus-next") == PINNED, "dbus_service.py was checked against dbus-next " + PINNED


def test_the_private_names_dbus_service_uses_are_there() -> None:
    assert callable(message_bus._future_set_exception) and callable(message_bus._future_set_result)
    assert list(inspect.signature(message_bus.MessageBus._make_method_handler).parameters) == [
        "self",
        "interface",
        "method",
    ]
    for name in ("_fn_result_to_body", "_msg_body_to_args", "_get_methods"):
        assert callable(getattr(ServiceInterface, name)), name
    assert callable(DBusError._as_message)
    assert callable(message_bus.MessageBus._finalize)
    # the writer whose write_callback AgentBus replaces, and the attributes the replacement uses
    source = inspect.getsource(message_bus._MessageWriter)
    for attribute in (
        "self.buf",
        "self.messages",
        "self.unix_fds",
        "self.offset",
        "self.fut",
        "self.negotiate_unix_fd",
    ):
        assert attribute in source, attribute
    assert "def write_callback(self)" in source
