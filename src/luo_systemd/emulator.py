"""luo-emu: a user-space stand-in for /dev/liveupdate, for machines without a LUO kernel.

It implements the kernel's device operations with the kernel's errors and lifetimes (see
``docs/emulator.md`` for the rules and the few the emulator cannot enforce).  Clients reach it over a
Unix socket with the ioctl request numbers and argument structs of ``uapi``; files travel as SCM_RIGHTS.

* A session fd is one end of a socketpair; the emulator keeps the other end and learns from its EOF
  that the last copy of the session fd was closed - exactly the kernel's "a session lives as long as
  its fd".  A session fd is recognised in a request by its inode.
* Preserved files are held as fds.  Their contents are never read or copied.
* "kexec" is the moment a shutdown hook (or ``luo-emu kexec``) says so: sessions still held then become
  the incoming sessions of the next boot; everything else is dropped.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import fcntl
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
from typing import Any, Optional

from luo_systemd import syscalls, uapi
from luo_systemd.errors import UnreadableImage
from luo_systemd.kernel_format import ImageFormats, read_image
from luo_systemd.liveupdate import (
    DEFAULT_EMULATOR_SOCKET,
    EMU_HEADER,
    EMU_REPLY,
    EmuControl,
    EmulatorTransport,
    recv_with_fds,
)
from luo_systemd.uapi import Ioctl

Inode = tuple[int, int]


def control_options(payload: bytes, **types: type) -> dict[str, Any]:
    """The JSON options of a control request, each of its type; anything else is EINVAL (never a crash)."""
    try:
        opts = json.loads(payload or b"{}")
    except (ValueError, RecursionError):
        raise Fail(errno.EINVAL) from None
    if not isinstance(opts, dict) or any(k not in types or type(v) is not types[k] for k, v in opts.items()):
        raise Fail(errno.EINVAL)
    return opts


class Fail(Exception):
    """An operation fails with the kernel's errno."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


def inode_of(fd: int) -> Inode:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


@dataclasses.dataclass
class HeldFile:
    token: int
    fd: int  # the emulator's own reference
    inode: Inode
    size_at_preserve: int
    retrieved: bool = False


@dataclasses.dataclass
class Session:
    name: bytes
    incoming: bool
    files: dict[int, HeldFile] = dataclasses.field(default_factory=dict)  # in preservation order
    end: Optional[socket.socket] = None  # our end of the session fd's socketpair, while a client holds it
    client_inode: Optional[Inode] = None
    finished: bool = False

    def drop_files(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()


# The LUO formats of the kernel the emulator stands in for (7.2): what a target kernel must speak.
EMULATED_FORMATS = ("kho-v4", "luo-v5", "memfd-v2")


@dataclasses.dataclass
class LoadedKernel:
    cmdline: str
    file_load: bool  # loaded with kexec_file_load; the legacy kexec_load loses all LUO state
    formats: Optional[ImageFormats] = None  # read from the image, as the pre-flight will ask
    unreadable: str = ""


def cmdline_enables_luo(cmdline: str) -> bool:
    words = cmdline.split()
    return "liveupdate=on" in words and "kho=on" in words


class EmulatedLuo:
    """The state of one emulated kernel and the rules of every operation on it."""

    def __init__(self, cold_boot_luo: bool = True) -> None:
        self.boot = 0
        self.cold_boot_luo = cold_boot_luo  # whether the machine's default kernel command line enables LUO
        self.enabled = cold_boot_luo
        self.outgoing: dict[bytes, Session] = {}
        self.incoming: dict[bytes, Session] = {}
        self.by_client_inode: dict[Inode, Session] = {}
        # Files preserved in an outgoing or an unfinished incoming session, by inode: PRESERVE_FD of one
        # gives EBUSY.  Counted, not searched: the kernel's check does not grow with what it holds.
        self.busy: collections.Counter[Inode] = collections.Counter()
        self.loaded: Optional[LoadedKernel] = None
        self.warnings: list[str] = []

    # -- sessions

    def _new_session_fd(self, session: Session) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        session.end = ours
        session.client_inode = inode_of(theirs.fileno())
        self.by_client_inode[session.client_inode] = session
        return theirs.detach()

    def create_session(self, name: bytes) -> tuple[Session, int]:
        if name in self.outgoing:
            raise Fail(errno.EEXIST)
        session = Session(name=name, incoming=False)
        self.outgoing[name] = session
        return session, self._new_session_fd(session)

    def retrieve_session(self, name: bytes) -> tuple[Session, int]:
        session = self.incoming.get(name)
        if session is None:
            raise Fail(errno.ENOENT)
        if session.end is not None:
            raise Fail(errno.EINVAL)  # already retrieved
        return session, self._new_session_fd(session)

    def session_for(self, fd: int) -> Session:
        session = self.by_client_inode.get(inode_of(fd))
        if session is None:
            raise Fail(errno.ENOTTY)  # not a session fd (or one from before the emulated kexec)
        return session

    def session_closed(self, session: Session) -> None:
        """The last copy of a session fd was closed."""
        assert session.client_inode is not None and session.end is not None
        del self.by_client_inode[session.client_inode]
        session.end.close()
        session.end = None
        if session.incoming:
            self.finish(session)  # closing a retrieved session is an implicit FINISH
            del self.incoming[session.name]
        else:
            self._drop_files(session)  # closing an outgoing session unpreserves its files
            del self.outgoing[session.name]

    # -- files

    def _drop_files(self, session: Session) -> None:
        for f in session.files.values() if not session.finished else ():
            self.busy[f.inode] -= 1
            if not self.busy[f.inode]:
                del self.busy[f.inode]
        session.drop_files()

    def preserve_fd(self, session: Session, fd: int, token: int) -> None:
        if session.incoming:
            raise Fail(errno.EINVAL)  # not seen on a kernel: the agent never preserves into an incoming session
        if token in session.files:
            raise Fail(errno.EEXIST)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH:
            raise Fail(errno.EBADF)  # the kernel's fget() does not see O_PATH files
        if not syscalls.is_memfd_like(fd):
            raise Fail(errno.ENOENT)  # no file handler for this kind of file
        inode = inode_of(fd)
        if self.busy[inode]:
            raise Fail(errno.EBUSY)
        size = os.fstat(fd).st_size
        if size:
            try:
                # The kernel pins every page at once and fills holes; so do we (no copy: the same pages).
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                # Write-sealed memfds (EPERM) and read-only reopens (EBADF) cannot be filled through this
                # fd from user space; the kernel pins their pages all the same.
                if e.errno not in (errno.EPERM, errno.EBADF):
                    raise Fail(e.errno or errno.EIO) from None
        session.files[token] = HeldFile(token=token, fd=os.dup(fd), inode=inode, size_at_preserve=size)
        self.busy[inode] += 1

    def retrieve_fd(self, session: Session, token: int) -> int:
        held = session.files.get(token)
        if not session.incoming or session.finished or held is None:
            raise Fail(errno.ENOENT)
        held.retrieved = True
        return held.fd  # every retrieve hands out the same file, as the kernel does

    def finish(self, session: Session) -> None:
        if not session.incoming:
            raise Fail(errno.EINVAL)  # not seen on a kernel: only incoming sessions are finished
        if session.finished:
            return
        self._drop_files(session)  # files not retrieved are discarded; retrieved ones live on in their fds
        session.finished = True

    # -- kexec

    def load_kernel(self, cmdline: str, file_load: bool, kernel_fd: int) -> None:
        try:
            formats, unreadable = read_image(f"/proc/self/fd/{kernel_fd}"), ""
        except UnreadableImage as e:
            formats, unreadable = None, str(e)
        self.loaded = LoadedKernel(cmdline, file_load, formats, unreadable)

    def kexec(self, cold: bool = False) -> dict[str, object]:
        """The machine goes down now.  Returns what crossed, for the log."""
        kernel = None if cold else self.loaded
        keep = kernel is not None and kernel.file_load and cmdline_enables_luo(kernel.cmdline)
        carried = [s for s in self.outgoing.values() if s.end is not None] if keep else []
        for s in list(self.outgoing.values()) + list(self.incoming.values()):
            if s.end is not None:
                s.end.close()
                s.end = None
            if s not in carried:
                s.drop_files()
        for s in carried:
            self._check_frozen_sizes(s)
            for held in s.files.values():
                held.fd = reopen_as_new_file(held.fd)
        self.by_client_inode.clear()
        self.outgoing = {}
        self.incoming = {s.name: dataclasses.replace(s, incoming=True, client_inode=None) for s in carried}
        self.busy = collections.Counter(f.inode for s in carried for f in s.files.values())
        self.boot += 1
        self.enabled = cmdline_enables_luo(kernel.cmdline) if kernel else self.cold_boot_luo
        self.loaded = None
        reason = "cold boot" if kernel is None else "kexec" if keep else "kexec without live update"
        return {
            "boot": self.boot,
            "how": reason,
            "carried": [s.name.decode(errors="backslashreplace") for s in carried],
            "files": sum(len(s.files) for s in carried),
            "luo_enabled": self.enabled,
        }

    def _check_frozen_sizes(self, session: Session) -> None:
        # The kernel refuses every size change after PRESERVE_FD with EPERM; the emulator cannot stop a
        # client's ftruncate, so it reports the difference loudly instead.
        for held in session.files.values():
            size = os.fstat(held.fd).st_size
            if size != held.size_at_preserve:
                self.warnings.append(
                    f"session {session.name!r} token {held.token}: size changed after preserve "
                    f"({held.size_at_preserve} -> {size}); the kernel would have refused that with EPERM"
                )
                print(f"luo-emu: fidelity warning: {self.warnings[-1]}", file=sys.stderr, flush=True)

    def status(self) -> dict[str, object]:
        def count(sessions: dict[bytes, Session]) -> dict[str, int]:
            return {"sessions": len(sessions), "files": sum(len(s.files) for s in sessions.values())}

        return {
            "boot": self.boot,
            "luo_enabled": self.enabled,
            "outgoing": count(self.outgoing),
            "incoming": count(self.incoming),
            "formats": list(EMULATED_FORMATS),
            "kernel": None
            if self.loaded is None
            else {
                "cmdline": self.loaded.cmdline,
                "formats": sorted(self.loaded.formats.identifiers) if self.loaded.formats else [],
                "compression": self.loaded.formats.compression if self.loaded.formats else "",
                "unreadable": self.loaded.unreadable,
            },
            "warnings": self.warnings,
        }


def reopen_as_new_file(fd: int) -> int:
    """A new open file description of the same memory, at the same position (the kernel's retrieved file
    is a new struct file whose position was restored; nothing of the old boot's description survives)."""
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    new = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    os.lseek(new, pos, os.SEEK_SET)
    os.close(fd)
    return new


def parse_arg(request: Ioctl, payload: bytes) -> dict[str, Any]:
    """The kernel's copy_struct_from_user(): the size field decides, extra bytes must be zero."""
    layout = uapi.ARG[request]
    if len(payload) < 4:
        raise Fail(errno.EFAULT)
    size = int.from_bytes(payload[:4], "little")
    if size < layout.size:
        raise Fail(errno.EINVAL)
    if len(payload) < size:
        raise Fail(errno.EFAULT)
    if any(payload[layout.size : size]):
        raise Fail(errno.E2BIG)
    return layout.unpack(payload)


def name_of(arg: dict[str, Any]) -> bytes:
    raw = arg["name"]
    if b"\0" not in raw or raw[0] == 0:
        raise Fail(errno.EINVAL)
    return uapi.decode_name(raw)


class EmulatorServer:
    def __init__(self, path: str, luo: EmulatedLuo) -> None:
        self.path = path
        self.luo = luo
        self.selector = selectors.DefaultSelector()
        self.device_holder: Optional[socket.socket] = None
        self.stale: set[socket.socket] = set()  # device connections from before the emulated kexec
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the device node is root:root 0600; so is this socket
        try:
            self.listener.bind(path)
        finally:
            os.umask(old_umask)
        self.listener.listen(64)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)

    def serve_forever(self) -> None:
        while True:
            for key, _ in self.selector.select():
                key.data(key.fileobj)

    def _sessions(self) -> list[Session]:
        return list(self.luo.outgoing.values()) + list(self.luo.incoming.values())

    def _watch(self, session: Session) -> None:
        assert session.end is not None
        self.selector.register(session.end, selectors.EVENT_READ, lambda _end: self._session_event(session))

    def _accept(self, listener: object) -> None:
        conn, _ = self.listener.accept()
        conn.setblocking(True)
        self.selector.register(conn, selectors.EVENT_READ, self._request)

    def _session_event(self, session: Session) -> None:
        end = session.end
        assert end is not None
        try:
            data = end.recv(EMU_HEADER.size + 4096)
        except OSError:
            data = b""
        if data:
            # A device ioctl sent to a session fd: the session's ioctl handler does not know it.
            end.send(EMU_REPLY.pack(errno.EINVAL))
            return
        self.selector.unregister(end)
        self.luo.session_closed(session)

    def _request(self, conn: object) -> None:
        assert isinstance(conn, socket.socket)
        try:
            data, fds = recv_with_fds(conn)
        except OSError:
            data, fds = b"", []
        if not data:
            self.selector.unregister(conn)
            if conn is self.device_holder:
                self.device_holder = None
            self.stale.discard(conn)
            conn.close()
            return
        reply_fd: Optional[int] = None
        try:
            if len(data) < EMU_HEADER.size:
                raise Fail(errno.EINVAL)
            request, length = EMU_HEADER.unpack_from(data)
            payload = data[EMU_HEADER.size : EMU_HEADER.size + length]
            body, reply_fd = self._dispatch(conn, request, payload, fds)
            reply = EMU_REPLY.pack(0) + body
        except Fail as e:
            reply = EMU_REPLY.pack(e.errno)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            conn.sendmsg(
                [reply],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", reply_fd))] if reply_fd is not None else [],
            )
        except OSError:
            pass  # the client went away; its request took effect, as an ioctl would have
        finally:
            if reply_fd is not None:
                os.close(reply_fd)

    def _dispatch(
        self, conn: socket.socket, request: int, payload: bytes, fds: list[int]
    ) -> tuple[bytes | bytearray, Optional[int]]:
        luo = self.luo
        if request == EmuControl.OPEN_DEVICE:
            if not luo.enabled:
                raise Fail(errno.ENOENT)  # a kernel without LUO has no /dev/liveupdate
            if self.device_holder is not None:
                raise Fail(errno.EBUSY)
            self.device_holder = conn
            return b"", None
        if request == EmuControl.KEXEC:
            opts = control_options(payload, cold=bool)
            for s in self._sessions():
                if s.end is not None:
                    self.selector.unregister(s.end)
            result = luo.kexec(cold=bool(opts.get("cold")))
            if self.device_holder is not None:
                self.stale.add(self.device_holder)
                self.device_holder = None
            return json.dumps(result).encode(), None
        if request == EmuControl.LOAD_KERNEL:
            opts = control_options(payload, cmdline=str, legacy=bool)
            if not fds:
                raise Fail(errno.EBADF)
            luo.load_kernel(str(opts.get("cmdline", "")), not opts.get("legacy", False), fds[0])
            return b"", None
        if request == EmuControl.UNLOAD_KERNEL:
            luo.loaded = None
            return b"", None
        if request == EmuControl.STATUS:
            return json.dumps(luo.status()).encode(), None
        try:
            op = Ioctl(request)
        except ValueError:
            raise Fail(errno.EINVAL) from None  # an unknown ioctl number gives EINVAL, not ENOTTY
        arg = parse_arg(op, payload)
        if op in uapi.DEVICE_IOCTLS:
            if conn in self.stale or conn is not self.device_holder:
                raise Fail(errno.EBADF)
            name = name_of(arg)
            session, fd = luo.create_session(name) if op == Ioctl.CREATE_SESSION else luo.retrieve_session(name)
            self._watch(session)
            arg["fd"] = fd
            return uapi.ARG[op].pack(**arg), fd
        if not fds:
            raise Fail(errno.EBADF)
        session = luo.session_for(fds[0])
        if op == Ioctl.SESSION_PRESERVE_FD:
            if len(fds) < 2:
                raise Fail(errno.EBADF)
            luo.preserve_fd(session, fds[1], arg["token"])
            return uapi.ARG[op].pack(**arg), None
        if op == Ioctl.SESSION_RETRIEVE_FD:
            # A dup, closed once sent, like every fd a reply carries: the session keeps its own reference.
            return uapi.ARG[op].pack(**arg), os.dup(luo.retrieve_fd(session, arg["token"]))
        if op == Ioctl.SESSION_FINISH:
            if arg["reserved"]:
                raise Fail(errno.EINVAL)
            luo.finish(session)
            return uapi.ARG[op].pack(**arg), None
        # SESSION_GET_NAME
        if arg["reserved"]:
            raise Fail(errno.EINVAL)
        arg["name"] = uapi.encode_name(session.name)
        return uapi.ARG[op].pack(**arg), None


# -- command line


def _transport(args: argparse.Namespace) -> EmulatorTransport:
    return EmulatorTransport(args.socket)


def cmd_serve(args: argparse.Namespace) -> int:
    server = EmulatorServer(args.socket, EmulatedLuo(cold_boot_luo=not args.without_luo))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"luo-emu: emulating /dev/liveupdate on {args.socket}", file=sys.stderr, flush=True)
    notify_ready()
    try:
        server.serve_forever()
    finally:
        os.unlink(args.socket)
    return 0


def notify_ready() -> None:
    """sd_notify("READY=1") without libsystemd, so the emulator can be a Type=notify service."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.sendto(b"READY=1", addr)


def cmd_kexec(args: argparse.Namespace) -> int:
    reply = _transport(args).control(EmuControl.KEXEC, json.dumps({"cold": args.cold}).encode())
    print(reply.decode())
    return 0


def cmd_shutdown_hook(args: argparse.Namespace) -> int:
    # As /usr/lib/systemd/system-shutdown/ hook: argv[1] is "kexec", "reboot", "poweroff" or "halt".
    # Only a kexec carries sessions; every other way down is a cold boot for LUO.
    args.cold = args.verb != "kexec"
    try:
        return cmd_kexec(args)
    except OSError as e:
        print(f"luo-emu: no emulator to tell about the {args.verb}: {e}", file=sys.stderr)
        return 0


def cmd_load(args: argparse.Namespace) -> int:
    from luo_systemd.kexec import EmulatedLoader, KernelImage  # noqa: PLC0415 - only this verb needs it

    EmulatedLoader(args.socket).load(KernelImage(args.kernel, args.initrd, args.cmdline), legacy=args.legacy)
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    _transport(args).control(EmuControl.UNLOAD_KERNEL)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(_transport(args).control(EmuControl.STATUS).decode())
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="luo-emu", description="An emulated /dev/liveupdate.")
    parser.add_argument("--socket", default=os.environ.get("LUO_EMU_SOCKET", DEFAULT_EMULATOR_SOCKET))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the emulator")
    p.add_argument(
        "--without-luo",
        action="store_true",
        help="emulate a kernel booted without LUO: there is no device until a kexec enables it",
    )
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("kexec", help="the emulated machine kexecs now")
    p.add_argument("--cold", action="store_true", help="a cold boot instead: nothing is carried")
    p.set_defaults(func=cmd_kexec)
    p = sub.add_parser("shutdown-hook", help="as a system-shutdown hook: VERB is systemd-shutdown's argv[1]")
    p.add_argument("verb")
    p.set_defaults(func=cmd_shutdown_hook)
    p = sub.add_parser("load", help="emulated kexec_file_load of the next kernel")
    p.add_argument("kernel")
    p.add_argument("--initrd")
    p.add_argument("--cmdline", default="")
    p.add_argument("--legacy", action="store_true", help="as if loaded with kexec_load: LUO state is lost")
    p.set_defaults(func=cmd_load)
    sub.add_parser("unload", help="unload the kernel").set_defaults(func=cmd_unload)
    sub.add_parser("status", help="counts of sessions and files (the kernel lists nothing)").set_defaults(
        func=cmd_status
    )
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except OSError as e:
        print(f"luo-emu: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
