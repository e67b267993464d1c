"""A small synchronous QMP (QEMU Machine Protocol) client over a Unix socket, stdlib only.

Why not QEMU's own ``qemu.qmp`` (PyPI): the launcher ships in luo-systemd's .deb and .rpm, and
``python3-qemu-qmp`` is packaged only in Debian sid (not in bookworm or trixie, which the package supports);
a .deb cannot depend on PyPI, and vendoring is not an option.  ``qemu.qmp`` is also asyncio-based, and the
launcher's restore runs in the blackout of a live update, where a synchronous exchange of a handful of
commands is all that is needed.  QMP itself is simple: one JSON object per line; a greeting, then
``qmp_capabilities``; replies carry ``return`` or ``error``, in the order of the commands; asynchronous
``event`` messages may come between.  See docs/interop/qmp-spec.rst in QEMU's source.

Like luo_systemd.varlink, it keeps to the C halves of json and socket: the launcher's restore imports it in
the blackout.  Commands may be sent before QEMU has even started (``pipeline``): on a socket that the
launcher connected to QEMU's listening socket in advance, they wait in the kernel until QEMU's monitor reads
them, right after its greeting.
"""

from __future__ import annotations

import _socket as socket
import time

from luo_systemd.errors import VmmFailed
from luo_systemd.varlink import dumps, loads

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MAX_LINE = 16 << 20  # query-qmp-schema is the largest reply (~0.3 MB); anything near this is not QEMU


class Qmp:
    """One QMP connection on a connected socket.  ``pipeline``: commands (name, arguments) sent ahead of the
    greeting, whose replies the caller reads with ``reply`` in order; ``qmp_capabilities`` goes first."""

    def __init__(self, sock: socket.socket, pipeline: tuple[tuple[str, dict[str, Any]], ...] = ()) -> None:
        self.sock = sock
        self.buffer = b""
        self.events: list[dict[str, Any]] = []  # arrived while a reply was awaited
        for name, arguments in (("qmp_capabilities", {}), *pipeline):
            self.send(name, **arguments)
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise VmmFailed(f"QEMU did not greet with QMP: {str(self.greeting)[:80]}")
        self.reply("qmp_capabilities")

    @classmethod
    def connect(cls, path: str, timeout: float = 30.0) -> Qmp:
        """Connects to ``path``, retrying until ``timeout`` (QEMU creates it while it starts)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() > deadline:
                    raise VmmFailed(f"QEMU's QMP socket {path} does not answer: {e.strerror}") from None
                time.sleep(0.002)
            except BaseException:
                sock.close()
                raise

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            try:
                data = self.sock.recv(65536)
            except OSError as e:
                raise VmmFailed(f"QMP connection failed: {e.strerror or e}") from None
            if not data:
                raise VmmFailed("QEMU closed the QMP connection")
            self.buffer += data
            if len(self.buffer) > MAX_LINE:
                raise VmmFailed("QMP message too large")
        line, _, self.buffer = self.buffer.partition(b"\n")
        try:
            doc = loads(line)
        except (ValueError, RecursionError):
            raise VmmFailed(f"QMP sent something that is not JSON: {line[:80]!r}") from None
        if not isinstance(doc, dict):
            raise VmmFailed("QMP sent something that is not a JSON object")
        return doc

    def send(self, name: str, **arguments: Any) -> None:
        doc: dict[str, Any] = {"execute": name}
        if arguments:
            doc["arguments"] = arguments
        try:
            self.sock.sendall(dumps(doc).encode() + b"\n")
        except OSError as e:
            raise VmmFailed(f"QMP connection failed: {e.strerror or e}") from None

    def reply(self, name: str) -> Any:
        """The reply to the oldest command sent (``name``, for the message): its ``return`` value; an
        ``error`` is raised as VmmFailed with QEMU's own words."""
        while True:
            doc = self._read()
            if "return" in doc:
                return doc["return"]
            if "error" in doc:
                err = doc["error"]
                raise VmmFailed(f"QEMU refused {name}: {err.get('desc', err)} ({err.get('class', '?')})")
            if "event" in doc:
                self.events.append(doc)

    def command(self, name: str, **arguments: Any) -> Any:
        """Runs one command; returns its ``return`` value, or raises VmmFailed with QEMU's own words."""
        self.send(name, **arguments)
        return self.reply(name)

    def event(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The first event named one of ``names`` (also one that came while a reply was awaited); others
        are dropped.  The socket's timeout bounds each wait."""
        while True:
            doc = self.events.pop(0) if self.events else self._read()
            if doc.get("event") in names:
                return doc

    def wait_migration(self) -> dict[str, Any]:
        """Waits for the migration to end (the ``events`` capability must be on: MIGRATION events); the
        final query-migrate if it completed, VmmFailed with QEMU's reason if it failed."""
        while self.event(("MIGRATION",)).get("data", {}).get("status") not in ("completed", "failed", "cancelled"):
            pass
        info: dict[str, Any] = self.command("query-migrate")
        if info.get("status") != "completed":
            raise VmmFailed(f"QEMU's migration {info.get('status')}: {info.get('error-desc', 'no reason given')}")
        return info
