"""luod blocks a shutdown while the loaded kernel fails the pre-flight, so the operator is told why.

``systemctl reboot`` becomes a kexec when a kernel is loaded, and ``systemctl kexec`` kexecs into it, both
through logind.  While a loaded kernel fails the pre-flight (another LUO format, too little memory, ...),
luod holds a logind block inhibitor on "shutdown" whose reason is the pre-flight's verdict; logind refuses
the request (``systemctl --check-inhibitors=yes`` prints the reason).  For root, 262 refuses outright (a
"block" inhibitor is strong; ``systemctl -i`` skips it), 257 asks polkit for reboot-ignore-inhibit, 252 lets
it through.  Triggers that do not ask logind (SIGRTMIN+6, ``systemctl start kexec.target``) meet luod's
check at the first stop hook instead (kexec_watch).  The kernel tells nobody when a kernel is loaded, so
luod re-checks after every change it sees and every RECHECK_SEC.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Sequence
from typing import Callable, Optional

from luo_systemd.api import Problem, refusing
from luo_systemd.broker import Broker
from luo_systemd.errors import LuoError
from luo_systemd.journal import log
from luo_systemd.kexec import Loader

RECHECK_SEC = 15.0


async def until_change_or_recheck(changed: asyncio.Event) -> None:
    """Waits for ``changed``, at most RECHECK_SEC.  Not asyncio.wait_for: on Python 3.11 it swallows a
    cancellation that comes just as the event is set (CPython gh-86296, fixed in 3.12), and a task that loops
    on it never ends: luod, stopped right after a change, hung in its shutdown (seen in bench/run.py)."""
    waiter = asyncio.ensure_future(changed.wait())
    try:
        await asyncio.wait({waiter}, timeout=RECHECK_SEC)
    finally:
        waiter.cancel()


def block_reason(armed: bool, loaded: bool, problems: Sequence[Problem]) -> Optional[str]:
    """The inhibitor's reason, or None when nothing should be blocked (no kernel loaded, an update under way,
    or a pre-flight that passes)."""
    blocking = refusing(problems)
    if armed or not loaded or not blocking:
        return None
    reasons = "; ".join(p.line() for p in blocking)
    return f"the loaded kernel fails the live-update pre-flight: {reasons} (liveupdatectl preflight)"


class ShutdownBlock:
    def __init__(self, take: Callable[[str], Awaitable[int]]) -> None:
        self.take = take
        self.fd: Optional[int] = None
        self.why: Optional[str] = None

    async def update(self, why: Optional[str]) -> None:
        if why == self.why:
            return
        self.release()
        if why is None:
            log.info("Shutdown no longer blocked: the loaded kernel passes the pre-flight, or none is loaded")
            return
        self.why = why  # also when logind refuses: tried once per reason, not at every re-check
        try:
            self.fd = await self.take(why)
        except (LuoError, OSError) as e:
            log.warning("Cannot block shutdown while the loaded kernel fails the pre-flight: %s", e)
            return
        log.warning("Blocking shutdown: %s", why)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.why = None, None


async def recheck(broker: Broker, loader: Loader) -> tuple[bool, list[Problem]]:
    """Whether a kernel is loaded, and what the pre-flight finds now, without opening /dev/liveupdate: a
    look on luod's own initiative must never hold the single-open device when systemd-shutdown (>= 261)
    opens it at the kexec."""
    loaded = loader.state().loaded
    if loaded:  # decompressing the running kernel's image takes a while: not in the event loop
        with contextlib.suppress(LuoError):
            await asyncio.get_running_loop().run_in_executor(None, loader.running_formats)
    return loaded, broker.preflight(open_device=False)


async def keep_blocking(broker: Broker, loader: Loader, block: ShutdownBlock, changed: asyncio.Event) -> None:
    """Holds the shutdown block exactly while a loaded kernel fails the pre-flight."""
    try:
        while True:
            changed.clear()
            try:
                if broker.armed:  # an update under way blocks nothing: no pre-flight at every unit's Preserve
                    why = None
                else:
                    loaded, problems = await recheck(broker, loader)
                    why = block_reason(broker.armed, loaded, problems)
            except (LuoError, OSError) as e:
                log.warning("Pre-flight re-check failed: %s", e)
                why = block.why
            await block.update(why)
            await until_change_or_recheck(changed)
    finally:
        block.release()
