"""Runs the contract suite on a real LUO kernel across real kexecs (inside the qemu guest only).

    python3 -m tests.contract.kexec_driver --boot N

Boot N runs step N of every scenario in ``scenarios.SCENARIOS`` that has one, with ``kernel_backend()``,
and keeps the fds the steps return open.  If any scenario has a step N+1, it loads the next kernel with
``kexec_file_load`` (the same command line with ``luo_boot=N+1``) and kexecs while still holding them.
Boot 0 first runs the single-boot rules (``test_rules.py -k kernel``) with pytest and checks that they
leaked nothing into the scenarios.

The boot number is the scenarios' only state.  The running tally of verdicts rides along on the kernel
command line (``luo_tally=PASSED,FAILED``) so that the last boot can print the total.  Output (serial
console), one verdict per line:

    RULES pytest PASS|FAIL <why>
    CHECK no-leak PASS|FAIL <why>
    SCENARIO <name> step <n> PASS|FAIL <error>
    contract-kexec boot <n>: <p> passed, <f> failed
    contract-kexec: <P> passed, <F> failed          (last boot only: all boots)

Never run this on a machine you care about: it reboots it with kexec.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import sys
import time
import traceback
from typing import Callable, Optional

import pytest

from luo_systemd import syscalls, uapi
from luo_systemd.liveupdate import Backend, kernel_backend
from tests.contract.scenarios import SCENARIOS, memfd

LINUX_REBOOT_CMD_KEXEC = 0x45584543
RULES_ARGS = ["-p", "no:cacheprovider", "tests/contract/test_rules.py", "-k", "kernel", "-v"]


class Tally:
    def __init__(self, passed: int = 0, failed: int = 0) -> None:
        self.passed = passed
        self.failed = failed
        self.boot_passed = 0
        self.boot_failed = 0

    def verdict(self, what: str, ok: bool, why: str = "") -> None:
        if ok:
            self.passed += 1
            self.boot_passed += 1
        else:
            self.failed += 1
            self.boot_failed += 1
        say(f"{what} {'PASS' if ok else 'FAIL'}{' ' + why if why else ''}")


def say(line: str) -> None:
    print(line, flush=True)


def read_cmdline() -> str:
    with open("/proc/cmdline") as f:
        return f.read().strip()


def param(cmdline: str, key: str) -> Optional[str]:
    for word in cmdline.split():
        if word.startswith(key + "="):
            return word[len(key) + 1 :]
    return None


def with_params(cmdline: str, **values: str) -> str:
    words = [w for w in cmdline.split() if w.split("=", 1)[0] not in values]
    return " ".join(words + [f"{k}={v}" for k, v in values.items()])


# -- what LUO objects a process holds --------------------------------------------------------------


def luo_fds(pid: str = "self") -> dict[int, str]:
    """fd -> target for every session, device or memfd fd of a process."""
    found: dict[int, str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        target = syscalls.fd_target(int(name), pid)
        if target.startswith(uapi.SESSION_LINK_PREFIX) or target == uapi.LIVEUPDATE_DEV or target.startswith("/memfd:"):
            found[int(name)] = target
    return found


def other_holders() -> dict[str, dict[int, str]]:
    """LUO fds held by any process but this one (a child a test forgot to reap would carry them)."""
    me = str(os.getpid())
    out = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit() and pid != me:
            held = luo_fds(pid)
            if held:
                out[pid] = held
    return out


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


# -- boot 0: the single-boot rules -----------------------------------------------------------------


class Outcomes:
    """A pytest plugin that counts the outcomes of the test calls (and of failed setups)."""

    def __init__(self) -> None:
        self.n = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0, "xpassed": 0, "error": 0}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        xfail = hasattr(report, "wasxfail")
        if report.when == "call":
            key = ("xfailed" if report.outcome == "skipped" else "xpassed") if xfail else report.outcome
            self.n[key] += 1
        elif report.outcome == "skipped":
            self.n["xfailed" if xfail else "skipped"] += 1
        elif report.outcome == "failed":
            self.n["error"] += 1

    def __str__(self) -> str:
        return ", ".join(f"{v} {k}" for k, v in self.n.items() if v) or "no tests ran"


def run_rules(tally: Tally) -> None:
    """pytest in this process, so that a leaked fd would be seen here and would cross the kexec."""
    before = luo_fds()
    t0 = time.monotonic()
    say(f"contract-kexec: python3 -m pytest {' '.join(RULES_ARGS)}  (in-process)")
    counts = Outcomes()
    rc = pytest.main(list(RULES_ARGS), plugins=[counts])
    say(f"contract-kexec: pytest exit status {int(rc)} after {time.monotonic() - t0:.1f}s")
    # All skipped (no /dev/liveupdate) is exit status 0 too: it must not count as a pass.
    tally.verdict("RULES pytest", rc == 0 and counts.n["passed"] > 0, f"(exit status {int(rc)}, {counts})")

    problems = []
    leaked = {fd: t for fd, t in luo_fds().items() if fd not in before}
    if leaked:
        problems.append(f"this process still holds {leaked}")
        for fd in leaked:  # they must not cross the kexec with the scenarios' sessions
            os.close(fd)
    others = other_holders()
    if others:
        problems.append(f"other processes hold {others}")
    try:
        with kernel_backend().device():
            pass
    except Exception as e:
        problems.append(f"/dev/liveupdate does not open: {e}")
    tally.verdict("CHECK no-leak", not problems, "; ".join(problems))


# -- the scenarios ---------------------------------------------------------------------------------


def run_steps(boot: int, luo: Backend, tally: Tally) -> list[int]:
    """Step ``boot`` of every scenario that has one; returns every fd to hold across the kexec."""
    hold: list[int] = []
    for scenario in SCENARIOS:
        if boot >= len(scenario.steps):
            continue
        step = scenario.steps[boot]
        before = open_fds()
        t0 = time.monotonic()
        try:
            held = list(step(luo, []))  # fds of an earlier boot mean nothing in this kernel
        except BaseException as e:
            held = []
            error = f"{type(e).__name__}: {e}".replace("\n", " | ")
            tally.verdict(f"SCENARIO {scenario.name} step {boot}", False, f"({step.__name__}) {error}")
            for line in traceback.format_exc().rstrip().splitlines():
                say(f"  | {line}")
        else:
            tally.verdict(
                f"SCENARIO {scenario.name} step {boot}",
                True,
                f"({step.__name__}, {time.monotonic() - t0:.2f}s, holds {len(held)} fd(s))",
            )
        # Whatever the step opened and did not hand back must not ride across the kexec unnoticed.
        stray = sorted(open_fds() - before - set(held))
        stray_luo = {fd: syscalls.fd_target(fd) for fd in stray}
        if stray:
            say(f"  note: {scenario.name} step {boot} left fds open (closed now): {stray_luo}")
            for fd in stray:
                try:
                    os.close(fd)
                except OSError:
                    pass
        hold += held
    return hold


# -- probes: behaviour no contract rule pins yet (docs/emulator.md "not seen on a kernel yet") --------
# Informational only (no verdict); opt-in with luo_probes=1 on the kernel command line
# (LUO_EXTRA_APPEND=luo_probes=1 tests/qemu/run-contract.sh).  On 7.2.13 the kernel answers EINVAL for
# FINISH of an outgoing session and PRESERVE_FD into an incoming one, as the emulator does.


def probe(what: str, call: Callable[[], object]) -> None:
    try:
        result = call()
    except Exception as e:
        say(f"PROBE {what}: {type(e).__name__} errno={getattr(e, 'errno', None)} ({e})")
    else:
        say(f"PROBE {what}: succeeded ({result!r})")


def run_probes(boot: int, luo: Backend) -> list[int]:
    hold: list[int] = []
    if boot == 0:
        with luo.device() as dev:
            empty = dev.create_session(b"probe-finish-empty")
            full = dev.create_session(b"probe-finish-full")
            carried = dev.create_session(b"probe-incoming")
        probe("FINISH of an empty outgoing session", lambda: luo.finish(empty))
        fd = memfd("probe", b"p" * 4096)
        luo.preserve_fd(full, fd, 1)
        probe("FINISH of an outgoing session holding a memfd", lambda: luo.finish(full))
        probe("PRESERVE_FD of the same memfd again after that FINISH", lambda: luo.preserve_fd(full, fd, 2))
        other = memfd("probe2", b"q" * 4096)
        luo.preserve_fd(carried, other, 1)
        for f in (empty, full, fd, other):
            os.close(f)
        hold.append(carried)
    elif boot == 1:
        with luo.device() as dev:
            incoming = dev.retrieve_session(b"probe-incoming")
        new = memfd("probe3", b"r" * 4096)
        probe("PRESERVE_FD into a retrieved (incoming) session, token 2", lambda: luo.preserve_fd(incoming, new, 2))
        probe("PRESERVE_FD into a retrieved session, its own token 1", lambda: luo.preserve_fd(incoming, new, 1))
        probe("RETRIEVE_FD token 2 of that session", lambda: os.close(luo.retrieve_fd(incoming, 2)))
        probe("FINISH of that session", lambda: luo.finish(incoming))
        probe("PRESERVE_FD into it after FINISH, token 3", lambda: luo.preserve_fd(incoming, new, 3))
        os.close(incoming)
        os.close(new)
    return hold


def kexec_next(cmdline: str, kernel: str, initrd: str) -> None:
    """kexec_file_load + reboot(LINUX_REBOOT_CMD_KEXEC).  Returns only if either fails."""
    copy = "/tmp/next-initrd.img"
    if initrd != copy:
        shutil.copyfile(initrd, copy)  # /sys/firmware/initrd (retain_initrd) is not a regular file
    t0 = time.monotonic()
    kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    ifd = os.open(copy, os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.kexec_file_load(kfd, ifd, cmdline)
    finally:
        os.close(kfd)
        os.close(ifd)
    with open("/sys/kernel/kexec_loaded") as f:
        loaded = f.read().strip()
    size = os.path.getsize(copy)
    say(
        f"contract-kexec: kexec_file_load({kernel}, initrd {size} bytes, {cmdline!r}) took "
        f"{time.monotonic() - t0:.2f}s, kexec_loaded={loaded}"
    )
    os.unlink(copy)
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.reboot(ctypes.c_int(LINUX_REBOOT_CMD_KEXEC)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"reboot(LINUX_REBOOT_CMD_KEXEC): {os.strerror(err)}")
    raise OSError(0, "reboot(LINUX_REBOOT_CMD_KEXEC) returned")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boot", type=int, required=True, help="boot number (0 = cold boot)")
    parser.add_argument("--kernel", default="/boot/bzImage", help="the kernel to kexec into")
    parser.add_argument(
        "--initrd", default="/sys/firmware/initrd", help="the initrd for the next boot (needs retain_initrd)"
    )
    parser.add_argument("--no-rules", action="store_true", help="boot 0: skip the pytest run of test_rules.py")
    args = parser.parse_args(argv)

    cmdline = read_cmdline()
    tally_in = param(cmdline, "luo_tally") or "0,0"
    passed, failed = (int(x) for x in tally_in.split(","))
    tally = Tally(passed, failed) if args.boot else Tally()
    boots = max(len(s.steps) for s in SCENARIOS)
    say(
        f"contract-kexec: boot {args.boot} of 0..{boots - 1}, kernel {os.uname().release}, "
        f"/dev/liveupdate {'present' if os.path.exists(uapi.LIVEUPDATE_DEV) else 'MISSING'}"
    )

    if args.boot == 0 and not args.no_rules:
        run_rules(tally)

    hold = run_steps(args.boot, kernel_backend(), tally)
    if param(cmdline, "luo_probes") == "1":
        hold += run_probes(args.boot, kernel_backend())
    say(f"contract-kexec boot {args.boot}: {tally.boot_passed} passed, {tally.boot_failed} failed")

    if args.boot + 1 < boots:
        names = []
        for fd in hold:
            try:
                names.append(kernel_backend().session_name(fd).decode(errors="backslashreplace"))
            except Exception:
                names.append(syscalls.fd_target(fd))
        say(f"contract-kexec: holding {len(hold)} fd(s) across the kexec: {names}")
        next_cmdline = with_params(cmdline, luo_boot=str(args.boot + 1), luo_tally=f"{tally.passed},{tally.failed}")
        try:
            kexec_next(next_cmdline, args.kernel, args.initrd)
        except OSError as e:
            say(f"contract-kexec: KEXEC FAIL {e}")
            say(f"contract-kexec: {tally.passed} passed, {tally.failed + 1} failed")
            return 1
    say(f"contract-kexec: {tally.passed} passed, {tally.failed} failed")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
