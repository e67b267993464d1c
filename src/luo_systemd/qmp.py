"""A small synchronous QMP (QEMU Machine Protocol) client over a Unix socket, stdlib only.

Why not QEMU's own ``qemu.qmp`` (PyPI): the launcher ships in luo-systemd's .deb and .rpm, and
``python3-qemu-qmp`` is packaged only in Debian sid (not in bookworm or trixie, which the package supports);
a .deb cannot depend on PyPI, and vendoring is not an option.  ``qemu.qmp`` is also asyncio-based, and the
launcher's restore runs in the blackout of a live update, where a synchronous exchange of a handful of
commands is all that is needed.  QMP itself is simple: one JSON object per line; a greeting, then
``qmp_capabilities``; replies carry ``return`` or ``error``; asynchronous ``event`` messages may come between
(they are skipped).  See docs/interop/qmp-spec.rst in QEMU's source.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Optional

from luo_systemd.errors import VmmFailed

MAX_LINE = 16 << 20  # query-qmp-schema is the largest reply (~0.3 MB); anything near this is not QEMU


class Qmp:
    """One QMP connection.  ``connect`` waits for the socket: QEMU creates it while it starts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.greeting = self._read()
        self.command("qmp_capabilities")

    @classmethod
    def connect(cls, path: str, timeout: float = 30.0, alive: Optional[Any] = None) -> Qmp:
        """Connects to ``path``, retrying until ``timeout`` while ``alive()`` (e.g. QEMU has not exited)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                if time.monotonic() > deadline or (alive is not None and not alive()):
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
            doc = json.loads(line)
        except ValueError:
            raise VmmFailed(f"QMP sent something that is not JSON: {line[:80]!r}") from None
        if not isinstance(doc, dict):
            raise VmmFailed("QMP sent something that is not a JSON object")
        return doc

    def command(self, name: str, **arguments: Any) -> Any:
        """Runs one command; returns its ``return`` value, or raises VmmFailed with QEMU's own words."""
        doc: dict[str, Any] = {"execute": name}
        if arguments:
            doc["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(doc).encode() + b"\n")
        except OSError as e:
            raise VmmFailed(f"QMP connection failed: {e.strerror or e}") from None
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                err = reply["error"]
                raise VmmFailed(f"QEMU refused {name}: {err.get('desc', err)} ({err.get('class', '?')})")
            # an asynchronous event (STOP, RESUME, MIGRATION, ...): not the reply

    def wait_migration(self, timeout: float = 60.0) -> dict[str, Any]:
        """Polls query-migrate until the migration completed; raises if it failed or took too long."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.command("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise VmmFailed(f"QEMU's migration {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() > deadline:
                raise VmmFailed(f"QEMU's migration did not complete in {timeout:.0f}s (status {status})")
            time.sleep(0.001)
