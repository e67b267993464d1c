"""Contract scenarios that cross one or more kexecs.

Each scenario is a list of steps with a kexec between consecutive steps.  A step gets the backend and
the fds the previous step held, and returns the fds to hold across the next kexec (a session lives only
as long as its fd).  Steps are deterministic, so the qemu tier can run step N in boot N of a real kernel
with no state but the boot number; on the emulator, ``test_across_kexec.py`` runs them in one process.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
from typing import Callable

from luo_systemd import errors
from luo_systemd.liveupdate import Backend

PAGE = 4096
Held = list[int]
Step = Callable[[Backend, Held], Held]


def pattern(seed: str, size: int) -> bytes:
    """Content that differs on every page, so lost, swapped or zeroed pages are caught."""
    out = bytearray()
    page = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{page}".encode()).digest() * (PAGE // 32)
        page += 1
    return bytes(out[:size])


def memfd(name: str, content: bytes = b"", *, size: int | None = None, sealing: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
    fd = os.memfd_create(name, flags)
    if content:
        os.write(fd, content)
    if size is not None:
        os.ftruncate(fd, size)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def digest(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def expect(err: int, kind: type[errors.KernelError], call: Callable[[], object]) -> None:
    try:
        result = call()
    except errors.KernelError as e:
        assert e.errno == err, f"expected {errno.errorcode[err]}, got {e}"
        assert isinstance(e, kind), f"expected {kind.__name__}, got {type(e).__name__}: {e}"
        return
    raise AssertionError(f"expected {errno.errorcode[err]}, the call returned {result!r}")


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    rule: str
    steps: tuple[Step, ...]


# -- preserve -> kexec -> retrieve -> verify -> finish, with content, size, seals and position

CYCLE_FILES = {1: ("small", 1000), 2: ("pages", 3 * PAGE), 7: ("big", 8 << 20), 1 << 63: ("empty", 0)}


def cycle_prepare(luo: Backend, held: Held) -> Held:
    with luo.device() as dev:
        session = dev.create_session(b"contract-cycle")
    for token, (label, size) in CYCLE_FILES.items():
        fd = memfd(label, pattern(label, size))
        if label == "pages":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            os.lseek(fd, 1234, os.SEEK_SET)
        luo.preserve_fd(session, fd, token)
        os.close(fd)  # the session keeps the file
    return [session]


def cycle_verify(luo: Backend, held: Held) -> Held:
    with luo.device() as dev:
        session = dev.retrieve_session(b"contract-cycle")
    for token in reversed(list(CYCLE_FILES)):  # any order
        label, size = CYCLE_FILES[token]
        fd = luo.retrieve_fd(session, token)
        assert os.fstat(fd).st_size == size, label
        assert digest(fd) == hashlib.sha256(pattern(label, size)).hexdigest(), f"content of {label}"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.get_blocking(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        if label == "pages":
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK, "seals are kept"
            assert os.lseek(fd, 0, os.SEEK_CUR) == 1234, "file position is kept"
        os.close(fd)
    luo.finish(session)
    expect(errno.ENOENT, errors.NoSuchToken, lambda: luo.retrieve_fd(session, 1))
    os.close(session)
    return []


# -- a second update in a row: finish, then preserve the same file into a new session of the same name


def again_prepare(luo: Backend, held: Held) -> Held:
    with luo.device() as dev:
        session = dev.create_session(b"contract-again")
    fd = memfd("again", pattern("again-1", 2 * PAGE))
    luo.preserve_fd(session, fd, 1)
    os.close(fd)
    return [session]


def again_carry(luo: Backend, held: Held) -> Held:
    with luo.device() as dev:
        incoming = dev.retrieve_session(b"contract-again")
        fd = luo.retrieve_fd(incoming, 1)
        assert digest(fd) == hashlib.sha256(pattern("again-1", 2 * PAGE)).hexdigest()
        os.pwrite(fd, pattern("again-2", 2 * PAGE), 0)  # the service goes on changing it
        # The name of an incoming session may be reused for an outgoing one at once...
        outgoing = dev.create_session(b"contract-again")
    # ...but the retrieved file cannot be preserved again until its session is finished.
    expect(errno.EBUSY, errors.AlreadyPreserved, lambda: luo.preserve_fd(outgoing, fd, 1))
    luo.finish(incoming)
    os.close(incoming)
    luo.preserve_fd(outgoing, fd, 1)
    os.close(fd)
    return [outgoing]


def again_verify(luo: Backend, held: Held) -> Held:
    with luo.device() as dev:
        session = dev.retrieve_session(b"contract-again")
    fd = luo.retrieve_fd(session, 1)
    assert digest(fd) == hashlib.sha256(pattern("again-2", 2 * PAGE)).hexdigest()
    os.close(fd)
    os.close(session)  # implicit finish
    return []


# -- what is carried and what is not


def lifetimes_prepare(luo: Backend, held: Held) -> Held:
    with luo.device() as dev:
        kept = dev.create_session(b"contract-kept")
        closed = dev.create_session(b"contract-closed")
        unretrieved = dev.create_session(b"contract-unretrieved")
    for i, session in enumerate((kept, closed, unretrieved)):
        for token, label in ((1, f"f{i}"), (2, f"g{i}")):
            fd = memfd(label, pattern(label, PAGE))
            luo.preserve_fd(session, fd, token)
            os.close(fd)
    os.close(closed)  # a session closed before the kexec is not carried
    return [kept, unretrieved]


def lifetimes_boot2(luo: Backend, held: Held) -> Held:
    with luo.device() as dev:
        expect(errno.ENOENT, errors.NoSuchSession, lambda: dev.retrieve_session(b"contract-closed"))
        kept = dev.retrieve_session(b"contract-kept")
        expect(errno.EINVAL, errors.InvalidArgument, lambda: dev.retrieve_session(b"contract-kept"))
    fd = luo.retrieve_fd(kept, 1)
    again = luo.retrieve_fd(kept, 1)  # a second retrieve gives a new fd to the same file
    assert os.fstat(fd).st_ino == os.fstat(again).st_ino and fd != again
    expect(errno.ENOENT, errors.NoSuchToken, lambda: luo.retrieve_fd(kept, 99))
    expect(errno.ENOENT, errors.NoSuchToken, lambda: luo.retrieve_fd(kept, 99))  # sticky
    assert luo.session_name(kept) == b"contract-kept"
    # Closing a retrieved session finishes it: token 2, never retrieved, is gone with it.
    os.close(kept)
    with luo.device() as dev:
        expect(errno.ENOENT, errors.NoSuchSession, lambda: dev.retrieve_session(b"contract-kept"))
    assert digest(fd) == hashlib.sha256(pattern("f0", PAGE)).hexdigest(), "a retrieved file outlives its session"
    # ...and after the finish the file may be preserved again.
    with luo.device() as dev:
        session = dev.create_session(b"contract-kept-2")
    luo.preserve_fd(session, fd, 1)
    for f in (fd, again, session):
        os.close(f)
    return []  # contract-unretrieved stays unretrieved in this boot


def lifetimes_boot3(luo: Backend, held: Held) -> Held:
    with luo.device() as dev:
        # Incoming sessions nobody retrieved are not carried further; nor are sessions nobody held.
        for name in (b"contract-unretrieved", b"contract-kept-2", b"contract-kept"):
            expect(errno.ENOENT, errors.NoSuchSession, lambda n=name: dev.retrieve_session(n))
    return []


SCENARIOS = (
    Scenario(
        "cycle",
        "preserve -> kexec -> retrieve in any order -> identical content, size, seals, "
        "position, O_RDWR|O_CLOEXEC -> finish -> ENOENT",
        (cycle_prepare, cycle_verify),
    ),
    Scenario(
        "second-update",
        "retrieved files are EBUSY until FINISH; then they can be preserved into a new "
        "session of the same name and cross a second kexec",
        (again_prepare, again_carry, again_verify),
    ),
    Scenario(
        "lifetimes",
        "only held sessions cross; retrieve twice is EINVAL; retrieve errors are sticky; "
        "closing a retrieved session finishes it; unretrieved sessions are not carried further",
        (lifetimes_prepare, lifetimes_boot2, lifetimes_boot3),
    ),
)
