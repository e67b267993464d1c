"""Varlink framing over a Unix stream socket, with fds attached as SCM_RIGHTS (stdlib only).

A message is a JSON object terminated by NUL.  fds travel with the message they belong to: one sendmsg()
per message, and a peer has at most one call in flight on a connection, so the fds received while a
message is read are that message's.  The client here is synchronous and light: hooks import it at every
unit start and stop, so this module uses the C halves of json and socket (``_json``, ``_socket``): json
imports re, and socket imports enum and selectors, which together cost a luo-hook call more than the
interpreter itself.
"""

from __future__ import annotations

import _json
import _socket as socket
import errno
import os
import sys

from luo_systemd import errors
from luo_systemd.ownedfd import OwnedFds

TYPE_CHECKING = False  # typing costs ~8 ms: too much for luo-hook at every unit start
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Optional

MAX_MESSAGE = 64 << 10  # a call: the largest legitimate one (64 names of 255 bytes) is ~17 KiB
MAX_REPLY = 16 << 20  # a reply, as a client accepts it (List of 4096 fds is ~0.5 MiB)
MAX_FDS = 253  # SCM_MAX_FD; also the most fds that may wait on a connection for their message's end
MAX_DEPTH = 32  # nesting of JSON arrays and objects; our messages need 4
INTERFACE = "io.liveupdate.Agent"


def _unencodable(value: object) -> None:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python's json extension, not JSON


class _Decoding:
    """What ``_json``'s scanner reads off its context (the attributes of a json.JSONDecoder)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_refuse_constant)


# As json.dumps(doc, separators=(",", ":"), allow_nan=False): ASCII, compact, no circular references.
_encoder = _json.make_encoder({}, _unencodable, _json.encode_basestring_ascii, None, ":", ",", False, False, False)
_scanner = _json.make_scanner(_Decoding())  # type: ignore[arg-type] # typeshed wants a scanner; C reads attributes
WHITESPACE = " \t\n\r"


def dumps(doc: dict[str, Any]) -> str:
    return "".join(_encoder(doc, 0))


def loads(raw: bytes) -> Any:
    """A JSON document (json.loads); ValueError if it is not one, RecursionError if nested too deep."""
    text = raw.decode()
    start = len(text) - len(text.lstrip(WHITESPACE))
    try:
        value, end = _scanner(text, start)
    except StopIteration:
        raise ValueError("no JSON value") from None
    if text[end:].strip(WHITESPACE):
        raise ValueError("extra data after the JSON value")
    return value


def fd_bytes(fds: Sequence[int]) -> bytes:
    """SCM_RIGHTS data: the fds as C ints."""
    return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)


def fds_of(data: bytes) -> list[int]:
    """The fds of SCM_RIGHTS data (a truncated int at the end is no fd)."""
    return [int.from_bytes(data[i : i + 4], sys.byteorder, signed=True) for i in range(0, len(data) - 3, 4)]


def encode(doc: dict[str, Any], fds: Sequence[int]) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    data = dumps(doc).encode() + b"\0"
    return data, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd_bytes(fds))] if fds else []


def send_message(sock: socket.socket, doc: dict[str, Any], fds: Sequence[int] = ()) -> None:
    data, anc = encode(doc, fds)
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


def _depth(doc: Any, limit: int) -> int:
    """How deep arrays and objects nest, counting no further than ``limit + 1``."""
    stack = [(doc, 1)]
    deepest = 0
    while stack:
        value, level = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, level)
            if deepest > limit:
                break
            stack += [(v, level + 1) for v in (value.values() if isinstance(value, dict) else value)]
    return deepest


class Reader:
    """Splits a stream into NUL-terminated messages and collects the fds that came with them, owned from
    the moment they arrive (``OwnedFds``)."""

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self.buffer = bytearray()
        self.fds = OwnedFds()
        self.max_message = max_message

    def feed(self, sock: socket.socket) -> bool:
        """Reads what is there; False on EOF.  Raises OSError(EMSGSIZE) on oversized input: a message
        longer than ``max_message``, or more than MAX_FDS fds waiting for their message's end."""
        data, anc, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                self.fds += OwnedFds.wrap(fds_of(cdata))
        if flags & socket.MSG_CTRUNC or len(self.fds) > MAX_FDS:
            raise OSError(errno.EMSGSIZE, f"more than {MAX_FDS} fds in one message")
        if not data:
            return False
        self.buffer += data
        if len(self.buffer) > self.max_message and b"\0" not in self.buffer:
            raise OSError(errno.EMSGSIZE, f"message larger than {self.max_message} bytes")
        return True

    def next_message(self) -> Optional[tuple[dict[str, Any], OwnedFds]]:
        """The next whole message and its fds (the caller owns them), or None."""
        end = self.buffer.find(b"\0")
        if end < 0:
            return None
        raw = bytes(self.buffer[:end])
        del self.buffer[: end + 1]
        with self.fds.take_all() as fds:  # closed if the message is refused
            try:
                doc = loads(raw)
            except (ValueError, RecursionError):
                raise OSError(errno.EBADMSG, "message is not JSON") from None
            if not isinstance(doc, dict) or _depth(doc, MAX_DEPTH) > MAX_DEPTH:
                raise OSError(errno.EBADMSG, f"message is not a JSON object nested at most {MAX_DEPTH} deep")
            return doc, fds.take_all()

    def close(self) -> None:
        self.fds.close()


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def error_reply(e: errors.LuoError) -> dict[str, Any]:
    """The one place where errors become Varlink errors."""
    params: dict[str, Any] = {"message": e.message}
    if e.errno is not None:
        params["errno"] = e.errno
    return {"error": e.varlink_error, "parameters": params}


def raise_error(reply: dict[str, Any]) -> None:
    """The client side: a Varlink error becomes the LuoError it was."""
    name = str(reply["error"])
    params = reply.get("parameters") or {}
    if not name.startswith(errors.VARLINK_ERROR_PREFIX):  # org.varlink.service.* and the like
        raise errors.LuoError(f"{name}: {dumps(params)}")
    errno_value = params.get("errno")
    raise errors.from_name(
        name[len(errors.VARLINK_ERROR_PREFIX) :],
        str(params.get("message", name)),
        int(errno_value) if errno_value is not None else None,
    )


class Client:
    """A blocking Varlink client for one connection."""

    def __init__(self, path: str, timeout: Optional[float] = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise errors.AgentUnavailable(f"luod is not reachable at {path}: {e.strerror}") from None
        self.reader = Reader(MAX_REPLY)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def call(
        self,
        method: str,
        parameters: Optional[dict[str, Any]] = None,
        fds: Sequence[int] = (),
    ) -> tuple[dict[str, Any], list[int]]:
        """Calls ``method`` (without the interface prefix); returns the reply's parameters and its fds
        (the caller owns them and closes them).  Errors are raised as LuoError subclasses."""
        doc: dict[str, Any] = {"method": f"{INTERFACE}.{method}"}
        if parameters:
            doc["parameters"] = parameters
        try:
            send_message(self.sock, doc, list(fds))
            while (msg := self.reader.next_message()) is None:
                if not self.reader.feed(self.sock):
                    raise errors.AgentUnavailable("luod closed the connection")
        except socket.timeout:
            raise errors.AgentUnavailable(f"luod did not answer {method} in time") from None
        except OSError as e:
            raise errors.AgentUnavailable(f"talking to luod failed: {e.strerror or e}") from None
        reply, reply_fds = msg
        with reply_fds:
            if "error" in reply:
                raise_error(reply)
            return dict(reply.get("parameters") or {}), [fd.detach() for fd in reply_fds]
