"""Received fds, owned from the moment they come off a socket until they are closed or handed on.

Every fd a peer sends luod (Varlink's SCM_RIGHTS in ``varlink.Reader``, the unix fds of a D-Bus message in
``dbus_service``, a caller's pidfd) is wrapped at once.  Whoever keeps one takes the number out with
``detach()`` (``state.Held.take`` when luod holds it for a unit); the ``with`` of the call that received it
closes everything else, on every path, exceptions included.  Closing twice, or after a detach, does
nothing.  No imports beyond ``os``: luo-hook loads this with varlink.py at every unit start and stop.
"""

from __future__ import annotations

import os

CLOSED = -1


class OwnedFd:
    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd == CLOSED:
            raise ValueError("the fd was closed or handed on")
        return self._fd

    def detach(self) -> int:
        """The fd, now owned by the caller: this object no longer closes it."""
        fd = self.fileno()
        self._fd = CLOSED
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, CLOSED
        if fd != CLOSED:
            try:
                os.close(fd)
            except OSError:
                pass  # EBADF: a bug elsewhere; nothing left to free here

    @property
    def closed(self) -> bool:
        return self._fd == CLOSED

    def __enter__(self) -> OwnedFd:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __repr__(self) -> str:  # the number only: never the file behind it
        return "<OwnedFd closed>" if self._fd == CLOSED else f"<OwnedFd {self._fd}>"


class OwnedFds(list[OwnedFd]):
    """The fds that came with one message, owned together: ``with`` closes every one not handed on."""

    @classmethod
    def wrap(cls, fds: list[int]) -> OwnedFds:
        return cls(OwnedFd(fd) for fd in fds)

    def take_all(self) -> OwnedFds:
        """Moves every fd into a new owner (this one is left empty)."""
        taken = OwnedFds(self)
        self.clear()
        return taken

    def close(self) -> None:
        for fd in self:
            fd.close()

    def __enter__(self) -> OwnedFds:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
