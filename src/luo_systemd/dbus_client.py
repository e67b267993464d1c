"""A small asyncio client of io.liveupdate.Agent1 (dbus-next), for Python services that use D-Bus.

It builds messages itself instead of using dbus-next's proxies, which overwrite the caller's fd lists with
indices; it negotiates fd passing (without it, 'h' arrives as None); it batches at 16 fds per message (more
are silently dropped on the bus); and it turns D-Bus errors back into the project's ``LuoError`` classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message

from luo_systemd import errors
from luo_systemd.dbus_service import BUS_NAME, INTERFACE, MAX_FDS_PER_MESSAGE, OBJECT_PATH, AgentBus


def _batches(items: Sequence[Any]) -> list[Sequence[Any]]:
    return [items[i : i + MAX_FDS_PER_MESSAGE] for i in range(0, len(items), MAX_FDS_PER_MESSAGE)] or [[]]


class AgentClient:
    def __init__(self, bus: AgentBus) -> None:
        self.bus = bus

    @classmethod
    async def connect(cls, bus_type: BusType = BusType.SYSTEM) -> AgentClient:
        bus = AgentBus(bus_type)
        await bus.connect()
        return cls(bus)

    def disconnect(self) -> None:
        self.bus.disconnect()  # type: ignore[no-untyped-call]

    async def call(
        self, member: str, signature: str = "", body: Optional[list[Any]] = None, unix_fds: Optional[list[int]] = None
    ) -> Message:
        reply = await self.bus.call(
            Message(
                destination=BUS_NAME,
                path=OBJECT_PATH,
                interface=INTERFACE,
                member=member,
                signature=signature,
                body=body or [],
                unix_fds=unix_fds or [],
            )
        )
        if reply is None:
            raise errors.AgentUnavailable("no reply from luod")
        if reply.message_type is MessageType.ERROR:
            name = str(reply.error_name)
            message = reply.body[0] if reply.body else name
            if not name.startswith(errors.DBUS_ERROR_PREFIX):
                raise errors.LuoError(f"{name}: {message}")
            raise errors.from_name(name[len(errors.DBUS_ERROR_PREFIX) :], message)
        return reply

    async def store_fds(self, items: Sequence[tuple[str, int]], unit: str = "") -> None:
        """Stores (name, fd) pairs; the caller keeps (and closes) its fds."""
        for batch in _batches(list(items)):
            fds = [fd for _, fd in batch]
            await self.call("StoreFds", "sa(sh)", [unit, [[name, i] for i, (name, _) in enumerate(batch)]], fds)

    async def remove_fds(self, names: Sequence[str], unit: str = "") -> None:
        await self.call("RemoveFds", "sas", [unit, list(names)])

    async def list_fds(self, unit: str = "") -> list[dict[str, Any]]:
        reply = await self.call("ListFds", "s", [unit])
        keys = ("name", "kind", "state", "order", "session")
        return [dict(zip(keys, row)) for row in reply.body[0]]

    async def retrieve_fds(self, names: Sequence[str] = (), unit: str = "") -> list[tuple[str, int]]:
        """Restored fds after a live update, as (name, fd) the caller owns; all of them if no names."""
        if not names:
            names = [f["name"] for f in await self.list_fds(unit) if f["state"] == "restored"]
        out: list[tuple[str, int]] = []
        for batch in _batches(list(names)):
            if not batch:
                continue
            reply = await self.call("RetrieveFds", "sas", [unit, list(batch)])
            out += [(name, reply.unix_fds[index]) for name, index in reply.body[0]]
        return out

    async def finish(self, unit: str = "") -> bool:
        return bool((await self.call("Finish", "s", [unit])).body[0])

    async def create_session(self, name: str, unit: str = "") -> int:
        reply = await self.call("CreateSession", "ss", [unit, name])
        return int(reply.unix_fds[reply.body[0]])

    async def retrieve_session(self, name: str, unit: str = "") -> int:
        reply = await self.call("RetrieveSession", "ss", [unit, name])
        return int(reply.unix_fds[reply.body[0]])


async def inhibit_shutdown(bus: AgentBus, who: str, why: str) -> int:
    """A logind block inhibitor on "shutdown" (``systemd-inhibit --what=shutdown --mode=block``): held as
    long as the returned fd is open."""
    reply = await bus.call(
        Message(
            destination="org.freedesktop.login1",
            path="/org/freedesktop/login1",
            interface="org.freedesktop.login1.Manager",
            member="Inhibit",
            signature="ssss",
            body=["shutdown", who, why, "block"],
        )
    )
    if reply is None or reply.message_type is MessageType.ERROR or not reply.unix_fds:
        message = reply.body[0] if reply is not None and reply.body else "no fd"
        raise errors.LuoError(f"logind refused the inhibitor: {reply.error_name if reply else 'no reply'}: {message}")
    return int(reply.unix_fds[reply.body[0]])
