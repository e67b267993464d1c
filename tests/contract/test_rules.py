"""The LUO contract within one boot: every rule of docs/luo-kernel.md that user space can observe.

Runs against every backend present: the emulator always, the kernel where /dev/liveupdate exists.
A difference between the two is a bug in the emulator.  Rules that cross a kexec are in
``scenarios.py``.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import resource
import socket
import subprocess
import sys
import tempfile

import pytest

from luo_systemd import errors, uapi
from luo_systemd.liveupdate import Backend
from luo_systemd.uapi import Ioctl
from tests.contract.scenarios import PAGE, expect, memfd, pattern


def new_session(luo: Backend, name: bytes) -> int:
    with luo.device() as dev:
        return dev.create_session(name)


def test_single_open(backend: Backend) -> None:
    """Rule: only one open file description of the device at a time; a second open gets EBUSY."""
    with backend.device():
        with pytest.raises(errors.DeviceBusy) as e, backend.device():
            pass
        assert e.value.errno == errno.EBUSY
        assert "another process has /dev/liveupdate open" in str(e.value)
    with backend.device():  # free again once closed
        pass


def test_single_open_across_processes(backend: Backend) -> None:
    """Rule: the single-open rule holds between processes, and ends when the holder dies."""
    code = "import sys,time; from luo_systemd.liveupdate import *; "
    code += f"b={backend_expr(backend)}; c=b.device(); c.__enter__(); print('open', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"open\n"
        expect(errno.EBUSY, errors.DeviceBusy, lambda: backend.device().__enter__())
    finally:
        child.kill()
        child.wait()
    with backend.device():
        pass


def backend_expr(backend: Backend) -> str:
    path = backend.transport.path  # type: ignore[attr-defined]
    return f"{backend.kind}_backend({path!r})"


def test_sessions_outlive_the_device_fd(backend: Backend) -> None:
    """Rule: closing the device fd does nothing to sessions."""
    session = new_session(backend, b"rules-outlive")
    with backend.device() as dev:
        expect(errno.EEXIST, errors.SessionExists, lambda: dev.create_session(b"rules-outlive"))
    os.close(session)


def test_session_lives_as_long_as_its_fd(backend: Backend) -> None:
    """Rule: a session lives exactly as long as its fd (any copy of it); closing an outgoing session
    unpreserves its files."""
    session = new_session(backend, b"rules-lifetime")
    fd = memfd("lifetime", b"x" * 100)
    backend.preserve_fd(session, fd, 1)
    copy = os.dup(session)
    os.close(session)
    with backend.device() as dev:  # the dup keeps it alive
        expect(errno.EEXIST, errors.SessionExists, lambda: dev.create_session(b"rules-lifetime"))
    expect(errno.EEXIST, errors.TokenInUse, lambda: backend.preserve_fd(copy, fd, 1))
    os.close(copy)
    # The name is free again and the file is no longer preserved anywhere.
    session = new_session(backend, b"rules-lifetime")
    backend.preserve_fd(session, fd, 1)
    os.close(session)
    os.close(fd)


def test_session_fd_works_in_another_process(backend: Backend) -> None:
    """Rule: session fds keep working after fork and SCM_RIGHTS; the session lives while a child holds it."""
    session = new_session(backend, b"rules-fork")
    parent, child_end = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            parent.close()
            child_end.recv(1)  # the parent has closed its copy
            fd = memfd("fork", b"y")
            backend.preserve_fd(session, fd, 5)
            child_end.send(b"k")
            child_end.recv(1)
        finally:
            os._exit(0)
    child_end.close()
    os.close(session)
    parent.send(b"c")
    assert parent.recv(1) == b"k"
    with backend.device() as dev:
        expect(errno.EEXIST, errors.SessionExists, lambda: dev.create_session(b"rules-fork"))
    parent.send(b"q")
    os.waitpid(pid, 0)
    parent.close()
    new_session_fd = new_session(backend, b"rules-fork")  # gone with the child's copy
    os.close(new_session_fd)


@pytest.mark.parametrize(
    "name",
    [b"a", b"x" * 63, b"with spaces and / slashes", b"\xff\xfe binary", b"systemd"],
    ids=["1-byte", "63-bytes", "punctuation", "non-utf8", "systemd"],
)
def test_valid_session_names(backend: Backend, name: bytes) -> None:
    """Rule: session names are 1-63 arbitrary bytes, matched exactly; GET_NAME returns them."""
    session = new_session(backend, name)
    assert backend.session_name(session) == name
    os.close(session)


@pytest.mark.parametrize("name", [b"", b"x" * 64], ids=["empty", "64-bytes-no-nul"])
def test_invalid_session_names(backend: Backend, name: bytes) -> None:
    """Rule: an empty name or one without a NUL within 64 bytes is EINVAL."""
    with backend.device() as dev:
        expect(errno.EINVAL, errors.InvalidArgument, lambda: dev.create_session(name))


def test_duplicate_outgoing_name(backend: Backend) -> None:
    """Rule: names are unique among outgoing sessions: EEXIST."""
    with backend.device() as dev:
        first = dev.create_session(b"rules-dup")
        expect(errno.EEXIST, errors.SessionExists, lambda: dev.create_session(b"rules-dup"))
    os.close(first)


def test_retrieve_unknown_session(backend: Backend) -> None:
    """Rule: no incoming session of that name (also every cold boot): ENOENT."""
    with backend.device() as dev:
        expect(errno.ENOENT, errors.NoSuchSession, lambda: dev.retrieve_session(b"rules-never-preserved"))


def test_tokens(backend: Backend) -> None:
    """Rule: tokens are any u64, unique per session (EEXIST), reusable in another session."""
    a = new_session(backend, b"rules-tokens-a")
    b = new_session(backend, b"rules-tokens-b")
    fds = [memfd(f"t{i}", b"t") for i in range(4)]
    backend.preserve_fd(a, fds[0], 0)
    backend.preserve_fd(a, fds[1], (1 << 64) - 1)
    expect(errno.EEXIST, errors.TokenInUse, lambda: backend.preserve_fd(a, fds[2], 0))
    backend.preserve_fd(b, fds[2], 0)  # the same token in another session
    for fd in [a, b, *fds]:
        os.close(fd)


def non_memfds(tmp: str) -> dict[str, int]:
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    linked = os.open(os.path.join(tmp, "regular"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fds = {
        "pipe": r,
        "socket": s1.detach(),
        "regular-file": linked,
        "dev-null": os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC),
        "directory": os.open(tmp, os.O_RDONLY | os.O_CLOEXEC),
    }
    os.close(w)
    s2.close()
    shm = "/dev/shm"
    if os.path.isdir(shm):  # a linked file on tmpfs is shmem, but has a name: not preservable
        fds["linked-tmpfs-file"] = os.open(
            os.path.join(shm, f"luo-rules-{os.getpid()}"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
    try:
        fds["hugetlb-memfd"] = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError:
        pass  # no hugetlbfs on this kernel: the case cannot arise here
    return fds


def test_only_memfds_can_be_preserved(backend: Backend) -> None:
    """Rule: files without a LUO handler (pipes, sockets, linked files, /dev/null, hugetlb memfds,
    directories, session fds) give ENOENT."""
    session = new_session(backend, b"rules-kinds")
    other = new_session(backend, b"rules-kinds-other")
    with tempfile.TemporaryDirectory() as tmp:
        fds = non_memfds(tmp)
        fds["luo-session"] = other
        try:
            for token, (kind, fd) in enumerate(sorted(fds.items())):
                try:
                    backend.preserve_fd(session, fd, token)
                except errors.NotPreservable as e:
                    assert e.errno == errno.ENOENT, kind
                    assert "only non-hugetlb memfds" in str(e)
                else:
                    raise AssertionError(f"a {kind} fd was preserved")
        finally:
            for fd in fds.values():
                os.close(fd)
            if os.path.exists(f"/dev/shm/luo-rules-{os.getpid()}"):
                os.unlink(f"/dev/shm/luo-rules-{os.getpid()}")
    # Anonymous shmem files that are not memfds are preserved: an O_TMPFILE on tmpfs.
    if os.path.isdir("/dev/shm"):
        tmpfile = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        backend.preserve_fd(session, tmpfile, 100)
        os.close(tmpfile)
    os.close(session)


def test_bad_fd_number(backend: Backend) -> None:
    """Rule: preserving an fd number that is not open gives EBADF."""
    session = new_session(backend, b"rules-ebadf")
    closed = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 1  # never reused by the calls below
    expect(errno.EBADF, errors.InvalidArgument, lambda: backend.preserve_fd(session, closed, 1))
    os.close(session)


def test_an_object_is_preserved_once(backend: Backend) -> None:
    """Rule: a file already preserved in any session gives EBUSY, whichever fd names it (dups and
    reopens count: it is the inode)."""
    a = new_session(backend, b"rules-busy-a")
    b = new_session(backend, b"rules-busy-b")
    fd = memfd("busy", b"z" * 10)
    backend.preserve_fd(a, fd, 1)
    dup = os.dup(fd)
    reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    for other in (fd, dup, reopened):
        expect(errno.EBUSY, errors.AlreadyPreserved, lambda o=other: backend.preserve_fd(b, o, 2))
        expect(errno.EBUSY, errors.AlreadyPreserved, lambda o=other: backend.preserve_fd(a, o, 3))
    for f in (a, b, fd, dup, reopened):
        os.close(f)


def test_returned_fds_are_cloexec(backend: Backend) -> None:
    """Rule: every fd LUO returns has O_CLOEXEC."""
    session = new_session(backend, b"rules-cloexec")
    assert fcntl.fcntl(session, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    os.close(session)


def test_finish_and_get_name_reserved_field(backend: Backend) -> None:
    """Rule: FINISH and GET_NAME with reserved != 0 are EINVAL."""
    session = new_session(backend, b"rules-reserved")
    for request in (Ioctl.SESSION_GET_NAME, Ioctl.SESSION_FINISH):
        arg = uapi.ARG[request].pack(reserved=1)
        expect(errno.EINVAL, errors.InvalidArgument, lambda r=request, a=arg: backend.call(session, r, a, None, ""))
    os.close(session)


def test_argument_size_rules(backend: Backend) -> None:
    """Rule: ``size`` smaller than the struct is EINVAL; larger is accepted if the extra bytes are zero,
    else E2BIG."""
    session = new_session(backend, b"rules-size")
    base = bytes(uapi.ARG[Ioctl.SESSION_GET_NAME].pack())
    full = uapi.ARG[Ioctl.SESSION_GET_NAME].size

    def with_size(size: int, tail: bytes) -> bytearray:
        buf = bytearray(size.to_bytes(4, "little") + base[4:] + tail)
        return buf

    expect(
        errno.EINVAL,
        errors.InvalidArgument,
        lambda: backend.call(session, Ioctl.SESSION_GET_NAME, with_size(full - 1, b""), None, ""),
    )
    buf = with_size(full + 8, bytes(8))
    backend.call(session, Ioctl.SESSION_GET_NAME, buf, None, "")
    assert buf[8 : 8 + len(b"rules-size")] == b"rules-size"
    expect(
        errno.E2BIG,
        errors.KernelError,
        lambda: backend.call(session, Ioctl.SESSION_GET_NAME, with_size(full + 8, b"\1" + bytes(7)), None, ""),
    )
    os.close(session)


def test_unknown_ioctl_is_einval(backend: Backend) -> None:
    """Rule: an unknown ioctl number gives EINVAL (not ENOTTY); there is no enumeration ioctl."""
    session = new_session(backend, b"rules-unknown")
    for nr in (0x02, 0x44, 0x7F):  # 0x02 would be where a "list sessions" ioctl went
        request = (uapi.LIVEUPDATE_IOCTL_TYPE << 8) | nr
        try:
            backend.transport.ioctl(session, request, bytearray(8), None)  # type: ignore[arg-type]
        except OSError as e:
            assert e.errno == errno.EINVAL, hex(request)
        else:
            raise AssertionError(f"ioctl {request:#x} succeeded")
    os.close(session)


def test_preserve_fills_holes(backend: Backend) -> None:
    """Rule: PRESERVE_FD pins every page at once: a sparse memfd becomes fully allocated."""
    session = new_session(backend, b"rules-holes")
    fd = memfd("sparse", size=64 * PAGE)
    assert os.fstat(fd).st_blocks == 0
    backend.preserve_fd(session, fd, 1)
    assert os.fstat(fd).st_blocks * 512 >= 64 * PAGE
    assert os.pread(fd, 64 * PAGE, 0) == bytes(64 * PAGE), "filling holes keeps them zero"
    os.close(session)
    os.close(fd)


def test_writes_inside_the_size_still_work(backend: Backend) -> None:
    """Rule: after PRESERVE_FD, writes and shared mappings inside the size keep working (the kexec takes
    the live pages)."""
    session = new_session(backend, b"rules-writes")
    fd = memfd("writes", pattern("w", 2 * PAGE))
    backend.preserve_fd(session, fd, 1)
    os.pwrite(fd, b"after", 100)
    with mmap.mmap(fd, 2 * PAGE) as m:
        m[PAGE : PAGE + 5] = b"mmap!"
    assert os.pread(fd, 5, 100) == b"after" and os.pread(fd, 5, PAGE) == b"mmap!"
    os.close(session)
    os.close(fd)


def test_size_is_frozen_after_preserve(backend: Backend) -> None:
    """Rule: from PRESERVE_FD on, ftruncate and growing writes fail with EPERM.

    The emulator cannot stop a client's ftruncate; it reports the change at the emulated kexec instead
    (see test_emulator.py::test_size_change_is_reported), so on the emulator this test is an xfail.
    """
    if backend.kind == "emulator":
        pytest.xfail("the emulator cannot enforce the size freeze (reported at kexec instead)")
    session = new_session(backend, b"rules-frozen")
    fd = memfd("frozen", b"q" * PAGE)
    backend.preserve_fd(session, fd, 1)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 2 * PAGE)
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"grow", PAGE)
    os.close(session)
    os.ftruncate(fd, 2 * PAGE)  # unpreserved again: no longer frozen
    os.close(fd)


def test_session_fd_link(backend: Backend) -> None:
    """Rule: /proc/PID/fd/N of a session reads "anon_inode:[luo_session] NAME" (how systemd >= 261
    recognises session fds).  The emulator's session fds are sockets: agents must use GET_NAME."""
    if backend.kind == "emulator":
        pytest.skip("skipped because emulated session fds are sockets; GET_NAME works on both")
    session = new_session(backend, b"rules-link")
    assert os.readlink(f"/proc/self/fd/{session}") == f"{uapi.SESSION_LINK_PREFIX} rules-link"
    os.close(session)


def test_get_name_of_a_non_session(backend: Backend) -> None:
    """A memfd is no session: GET_NAME on it fails, which is how agents tell session fds apart."""
    fd = memfd("not-a-session")
    assert not backend.is_session(fd)
    os.close(fd)


def test_an_o_path_fd_is_not_preserved_a_read_only_reopen_is(backend: Backend) -> None:
    """Rule: an O_PATH fd of a memfd is not a file the kernel's fget() sees (EBADF), so luod's Store
    refuses it up front; a memfd reopened read-only through /proc is preserved like the memfd (seen on
    7.2.13 in the qemu tier; issue 11 had assumed otherwise from the emulator)."""
    session = new_session(backend, b"rules-reopened")
    fd = memfd("reopened", pattern("reopened", PAGE))
    o_path = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
    read_only = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        expect(errno.EBADF, errors.InvalidArgument, lambda: backend.preserve_fd(session, o_path, 1))
        backend.preserve_fd(session, read_only, 2)
        expect(errno.EBUSY, errors.AlreadyPreserved, lambda: backend.preserve_fd(session, fd, 3))  # one inode
    finally:
        for f in (o_path, read_only, fd, session):
            os.close(f)
