"""Noticing a kexec that systemd started without liveupdatectl (``systemctl kexec``, ``kexec.target``).

Such a kexec skips the pre-flight check and nobody armed luod, but the units still stop through their
ExecStop= hooks.  So when a hook asks to preserve while luod is not armed, luod asks systemd whether
kexec.target has a job queued, and arms itself if it has.  It asks with systemctl, which talks to PID 1 over
its private socket: the system bus may already be gone at that point of a shutdown.

It asks only when a kernel is loaded for the kexec: ``systemctl kexec`` loads one before it queues the job,
and without one systemd-shutdown reboots instead.  Every ordinary stop of an opted-in unit (no kernel
loaded) is answered without forking systemctl.
"""

from __future__ import annotations

from collections.abc import Sequence

from luo_systemd import journal, processes
from luo_systemd.api import AGENT, refusing
from luo_systemd.broker import Broker
from luo_systemd.errors import LuoError
from luo_systemd.journal import log
from luo_systemd.kexec import Loader

KEXEC_TARGET = "kexec.target"
SYSTEMCTL_TIMEOUT_SEC = 5.0
LIST_JOBS_ARGS = ("list-jobs", "--no-legend", "--plain", KEXEC_TARGET)  # after the systemctl argv


def kexec_job_listed(list_jobs_output: str) -> bool:
    """Whether ``systemctl list-jobs`` output shows a job of kexec.target (also read by luo-qemu)."""
    return any(line.split()[1:2] == [KEXEC_TARGET] for line in list_jobs_output.splitlines())


class KexecWatcher:
    def __init__(self, broker: Broker, loader: Loader, systemctl: Sequence[str] = ("systemctl",)) -> None:
        self.broker = broker
        self.loader = loader
        self.systemctl = list(systemctl)
        self.refused = False  # this shutdown's kexec was turned into a reboot: ask no more

    async def kexec_pending(self) -> bool:
        """Whether kexec.target has a job (a kexec transaction is under way) and a kernel to kexec into."""
        try:
            if not self.loader.state().loaded:
                return False
        except OSError as e:
            log.warning("Cannot tell whether a kernel is loaded (%s): asking systemd for a kexec job", e)
        argv = [*self.systemctl, *LIST_JOBS_ARGS]
        try:
            out = await processes.output_of(argv, SYSTEMCTL_TIMEOUT_SEC)
        except processes.ChildFailed as e:
            log.warning("Cannot ask systemd for a kexec job (%s): treating this stop as an ordinary one", e)
            return False
        return kexec_job_listed(out)

    async def before_preserve(self) -> None:
        """The pre-flight at the first opted-in unit's stop: passed, arm; failed, unload the kernel, so that
        systemd-shutdown reboots instead of kexecing (the kexec transaction is irreversible; a cold reboot
        keeps a kernel of another LUO format from panicking on what this one hands over)."""
        if self.broker.armed or self.refused or not await self.kexec_pending():
            return
        problems = refusing(self.broker.preflight())
        if not problems:
            log.info("A kexec was started without liveupdatectl; the pre-flight passed: preserving units as they stop")
            self.broker.arm(AGENT)
            return
        self.refused = True
        reasons = "; ".join(p.line() for p in problems)
        try:
            self.loader.unload()
            outcome = "unloaded the kernel: the machine reboots instead, nothing is carried"
        except (LuoError, OSError) as e:
            outcome = f"and the kernel could not be unloaded ({e}): the kexec goes ahead without a live update"
        journal.event(
            journal.REFUSED,
            f"Refusing the kexec started without liveupdatectl, the pre-flight failed: {reasons}; {outcome}",
            level=journal.CRITICAL,
        )
