#!/usr/bin/env python3
"""Boot cached Debian root file systems under systemd-nspawn: the project's end-to-end tier.

A :class:`Container` boots a throw-away copy-on-write view (overlayfs: the cached rootfs from
``build-rootfs.sh`` as the lower layer, a per-run upper directory) of a rootfs with a real systemd as
PID 1, runs commands inside it with ``nsenter``, and can run a kexec transaction and boot the *same*
upper directory again -- a kexec into a new kernel with the disk state kept.

Safety: nspawn always runs with ``--drop-capability=CAP_SYS_BOOT`` (otherwise a ``kexec --load``
in the container would reach the host kernel), and every process this module starts (nspawn and
each nsenter) has CAP_SYS_BOOT removed from its bounding set first, so nothing run through the
harness can load a kernel or reboot the host. Nothing here talks to the host's systemd.

Standard library only (Python >= 3.9). Must run as root.

CLI::

    python3 tests/nspawn/harness.py build [SUITE ...]
    python3 tests/nspawn/harness.py run SUITE [--bind HOST:GUEST] [--state DIR] [--no-build] -- CMD ...
    python3 tests/nspawn/harness.py selfcheck [SUITE ...] [--keep] [--no-build] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Optional, Union

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-rootfs.sh"
SUITES = ("bookworm", "trixie", "sid")
RUNNING_STATES = ("running", "degraded")
CAP_SYS_BOOT = 22
# systemd >= 258 no longer boots on cgroup v1; nspawn 252 on this hybrid host gives a container
# cgroup v1 unless told otherwise.
UNIFIED_FROM_VERSION = 258
GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}

PathLike = Union[str, "os.PathLike[str]"]
Bind = Union[str, Sequence[PathLike]]


class HarnessError(RuntimeError):
    """Something in the container harness failed (message carries the details)."""


def available() -> tuple[bool, str]:
    """(True, "") when this machine can run the nspawn tier, else (False, why) -- for pytest skips."""
    if os.geteuid() != 0:
        return False, "needs root"
    for tool in ("systemd-nspawn", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return False, f"{tool} not installed (apt-get install systemd-container util-linux)"
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            return False, "kernel has no overlayfs (use mode='copy')"
    except OSError:
        pass
    return True, ""


def cache_dir() -> Path:
    return Path(os.environ.get("LUO_CACHE", "/var/cache/luo-systemd"))


def rootfs_path(suite: str) -> Path:
    """Where build-rootfs.sh puts SUITE's tree (it may not exist yet)."""
    return cache_dir() / "rootfs" / suite


def rootfs_ready(suite: str) -> bool:
    return (rootfs_path(suite) / ".luo-rootfs-stamp").is_file()


def ensure_rootfs(suite: str, *, quiet: bool = False) -> Path:
    """Build SUITE's rootfs unless it is cached and current; return its path."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; one of {', '.join(SUITES)}")
    subprocess.run(
        ["bash", str(BUILD_SCRIPT), suite],
        check=True,
        stdout=subprocess.DEVNULL if quiet else None,
        stderr=subprocess.DEVNULL if quiet else None,
    )
    return rootfs_path(suite)


def rootfs_info(rootfs: PathLike) -> dict[str, str]:
    """The key=value facts build-rootfs.sh recorded (suite, systemd version, ...)."""
    info = {}
    try:
        for line in (Path(rootfs) / ".luo-rootfs-info").read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                info[k] = v
    except OSError:
        pass
    return info


def systemd_major(rootfs: PathLike) -> Optional[int]:
    """systemd's major version in a rootfs, from libsystemd-shared-NNN*.so; None if not found."""
    root = Path(rootfs)
    for d in ("usr/lib/systemd", "usr/lib/x86_64-linux-gnu/systemd", "lib/systemd"):
        for p in sorted((root / d).glob("libsystemd-shared-*.so")):
            m = re.match(r"libsystemd-shared-(\d+)", p.name)
            if m:
                return int(m.group(1))
    return None


# ---------------------------------------------------------------------------------------------
# capability hygiene for every child we start

# Every command we start runs under this prefix: CAP_SYS_BOOT leaves the bounding and inheritable
# sets, so neither the command nor anything it execs (as root: permitted = inheritable | bounding)
# can ever hold it -- no kexec_load/kexec_file_load/reboot reaching the host kernel.
NO_SYS_BOOT = ["setpriv", "--bounding-set=-sys_boot", "--inh-caps=-sys_boot", "--"]


def _ambient_has_sys_boot() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapAmb:"):
            return bool(int(line.split()[1], 16) & (1 << CAP_SYS_BOOT))
    return False


def _check_caps() -> None:
    if os.geteuid() != 0:
        raise HarnessError("the nspawn harness must run as root")
    if _ambient_has_sys_boot():
        # ambient caps survive exec; setpriv clears the bounding and inheritable sets only
        raise HarnessError("CAP_SYS_BOOT is in this process's ambient set; refusing to run")


# ---------------------------------------------------------------------------------------------


def unit_name_from_path(path: str, suffix: str = ".mount") -> str:
    """``systemd-escape --path --suffix=mount PATH`` in Python."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "-" + suffix
    out = []
    for i, ch in enumerate("/".join(parts)):
        if ch == "/":
            out.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_.") and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out) + suffix


def _proc_children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    return children


def _nspid(pid: int) -> Optional[list[int]]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return [int(x) for x in line.split()[1:]]
    except OSError:
        return None
    return None


def _environ_has(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


class Container:
    """One container state (an overlay upper dir, or a full copy) that can be booted repeatedly.

    ``rootfs``: a cached tree (``rootfs_path(suite)``). ``state_dir``: where this container keeps
    its writable layer, its merged mount point and the console log; it survives exits, so boot()
    after an exit boots the same disk state again. ``binds`` / ``binds_ro``: ``"HOST:GUEST"``
    strings or ``(host, guest)`` pairs. ``mode``: ``"overlay"`` (default; instant) or ``"copy"``
    (``cp -a --reflink=auto`` of the whole tree on first boot). ``unified``: force the cgroup v2
    hierarchy in the container (default: when the rootfs's systemd is >= 258).
    ``max_runtime``: a watchdog kills nspawn after so many seconds of one boot.
    ``keep_binds_at_shutdown``: give the bind mounts' mount units DefaultDependencies=no, so they
    stay mounted until the container is gone (system-shutdown hooks can write to the host).
    """

    def __init__(
        self,
        rootfs: PathLike,
        state_dir: PathLike,
        *,
        binds: Iterable[Bind] = (),
        binds_ro: Iterable[Bind] = (),
        mode: str = "overlay",
        unified: Optional[bool] = None,
        private_network: bool = True,
        machine: Optional[str] = None,
        max_runtime: float = 900.0,
        extra_args: Sequence[str] = (),
        init_args: Sequence[str] = (),
        setenv: Optional[dict[str, str]] = None,
        keep_binds_at_shutdown: bool = True,
    ) -> None:
        self.rootfs = Path(rootfs).resolve()
        if not (self.rootfs / "usr/lib/os-release").exists() and not (self.rootfs / "etc/os-release").exists():
            raise HarnessError(f"{self.rootfs} is not an OS tree (build it with build-rootfs.sh)")
        if mode not in ("overlay", "copy"):
            raise ValueError("mode must be 'overlay' or 'copy'")
        self.state_dir = Path(state_dir).resolve()
        self.mode = mode
        self.binds = [self._bind(b) for b in binds]
        self.binds_ro = [self._bind(b) for b in binds_ro]
        ver = systemd_major(self.rootfs)
        self.systemd_version = ver
        self.unified = unified if unified is not None else bool(ver and ver >= UNIFIED_FROM_VERSION)
        self.private_network = private_network
        self.machine = machine or re.sub(r"[^A-Za-z0-9-]", "-", f"luo-{self.rootfs.name}")[:60]
        self.max_runtime = max_runtime
        self.extra_args = list(extra_args)
        self.init_args = list(init_args)
        self.setenv = dict(setenv or {})
        self.keep_binds_at_shutdown = keep_binds_at_shutdown
        self.boots = 0
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.leader: Optional[int] = None
        self.returncode: Optional[int] = None
        self._log: Optional[IO[bytes]] = None
        self._lock_fd: Optional[int] = None
        self._watchdog: Optional[threading.Timer] = None
        self._marker = b""
        self.state_dir.mkdir(parents=True, exist_ok=True)

    # -- layout -----------------------------------------------------------------------------
    @staticmethod
    def _bind(b: Bind) -> tuple[str, str]:
        if isinstance(b, str):
            host, sep, guest = b.partition(":")
            return (host, guest if sep else host)
        h, g = b
        return (os.fspath(h), os.fspath(g))

    @property
    def root_dir(self) -> Path:
        """The container's root as nspawn sees it (only mounted in nspawn's private namespace)."""
        return self.state_dir / ("merged" if self.mode == "overlay" else "root")

    @property
    def upper_dir(self) -> Path:
        """Files the container wrote (overlay mode); readable from the host at any time."""
        return self.state_dir / ("upper" if self.mode == "overlay" else "root")

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace").replace("\r", "")
        except OSError:
            return ""

    def shutdown_kind(self) -> Optional[str]:
        """How the last boot ended, from the console: kexec, reboot, poweroff, halt or None.

        nspawn's exit code cannot tell: without CAP_SYS_BOOT, systemd-shutdown's reboot() fails
        with EPERM and it exits 0 ("Exiting container.") for all four.
        """
        last = self.console_text().rsplit("===== luo harness: boot ", 1)[-1]
        for kind in ("kexec", "reboot", "poweroff", "halt"):
            if f"systemd-{kind}.service" in last or f"systemd-shutdown {kind}" in last:
                return kind
        return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def guest_path(self, path: str) -> Path:
        """A host path to a file in the running container (through /proc/LEADER/root)."""
        if not self.running or self.leader is None:
            raise HarnessError("container is not running")
        return Path(f"/proc/{self.leader}/root") / path.lstrip("/")

    # -- boot -----------------------------------------------------------------------------------
    def _prepare(self) -> list[str]:
        """The command prefix that runs nspawn in a private mount namespace.

        There the overlay is mounted (it vanishes with nspawn) and a tmpfs covers
        /run/systemd/nspawn, where nspawn would otherwise leave its propagation and lock
        directories on the host.
        """
        Path("/run/systemd/nspawn").mkdir(parents=True, exist_ok=True)
        script = "mount -t tmpfs -o mode=0755 luo-nspawn-run /run/systemd/nspawn || exit 125; "
        args = ["", "", "", ""]
        if self.mode == "overlay":
            for d in ("upper", "work", "merged"):
                (self.state_dir / d).mkdir(exist_ok=True)
            script += 'mount -t overlay luo-rootfs -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4" || exit 125; '
            args = [str(self.rootfs), str(self.state_dir / "upper"), str(self.state_dir / "work"), str(self.root_dir)]
        else:
            root = self.root_dir
            if not root.exists():
                tmp = self.state_dir / "root.tmp"
                if tmp.exists():
                    shutil.rmtree(tmp)
                subprocess.run(["cp", "-a", "--reflink=auto", str(self.rootfs), str(tmp)], check=True)
                tmp.rename(root)
        self._write_bind_dropins()
        for procs in self._create_cgroups():
            script += f"echo $$ > {shlex.quote(str(procs))} || exit 125; "
        script += 'shift 4; exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "luo-nspawn", *args]

    def _write_bind_dropins(self) -> None:
        """Keep bind mounts mounted through a shutdown (written offline into the writable layer).

        nspawn's bind mounts show up as mount units with default dependencies, so the shutdown
        transaction's umount.target unmounts them before systemd-shutdown runs the
        system-shutdown hooks; a hook then writes into the container's own directory instead of
        the host's. ``DefaultDependencies=no`` drops the Conflicts=umount.target.
        """
        if not self.keep_binds_at_shutdown:
            return
        base = self.upper_dir / "etc/systemd/system"
        for _, guest in self.binds + self.binds_ro:
            d = base / (unit_name_from_path(guest) + ".d")
            d.mkdir(parents=True, exist_ok=True)
            (d / "50-luo-harness.conf").write_text(
                "# written by tests/nspawn/harness.py: keep the host bind mounted until the end\n"
                "[Unit]\nDefaultDependencies=no\n"
            )

    def nspawn_command(self) -> list[str]:
        cmd = [
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            "--drop-capability=CAP_SYS_BOOT",
            "--boot",
            f"--directory={self.root_dir}",
            f"--machine={self.machine}",
            "--console=read-only",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
            f"--setenv=LUO_HARNESS_ID={self._marker.decode().split('=', 1)[1]}",
        ]
        if self.private_network:
            cmd.append("--private-network")
        for k, v in self.setenv.items():
            cmd.append(f"--setenv={k}={v}")
        for host, guest in self.binds:
            cmd.append(f"--bind={host}:{guest}")
        for host, guest in self.binds_ro:
            cmd.append(f"--bind-ro={host}:{guest}")
        cmd += self.extra_args
        if self.init_args:
            cmd += ["--", *self.init_args]
        return cmd

    def boot(self, timeout: float = 30.0) -> int:
        """Start nspawn and return the host PID of the container's PID 1 (once it exists)."""
        if self.running:
            raise HarnessError("container is already running")
        _check_caps()
        self.boots += 1
        self._marker = f"LUO_HARNESS_ID={os.getpid()}-{id(self)}-{self.boots}-{time.monotonic_ns()}".encode()
        self._lock_rootfs()
        try:
            prefix = self._prepare()
            env = dict(os.environ)
            env.pop("NOTIFY_SOCKET", None)
            env["TERM"] = "dumb"
            env["SYSTEMD_COLORS"] = "0"
            env.pop("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", None)
            if self.unified:
                env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
            self._log = open(self.console_log, "ab")  # noqa: SIM115 -- kept open while nspawn runs
            self._log.write(f"\n===== luo harness: boot {self.boots} of {self.rootfs} =====\n".encode())
            self._log.flush()
            self.returncode = None
            self.leader = None
            self.proc = subprocess.Popen(
                [*NO_SYS_BOOT, *prefix, *self.nspawn_command()],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            if self._log:
                self._log.close()
                self._log = None
            self._remove_cgroups()
            self._unlock_rootfs()
            raise
        self._watchdog = threading.Timer(self.max_runtime, self._watchdog_fire)
        self._watchdog.daemon = True
        self._watchdog.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._finish()
                raise HarnessError(f"systemd-nspawn exited with {self.returncode} during boot:\n{self._tail()}")
            pid = self._find_leader()
            if pid:
                self.leader = pid
                return pid
            time.sleep(0.01)
        self.kill()
        raise HarnessError(f"no container PID 1 after {timeout} s:\n{self._tail()}")

    def _cgroup_dirs(self) -> list[Path]:
        """This boot's own cgroup in each hierarchy nspawn places a ``--keep-unit`` container by: the one
        systemd tracks units in (``name=systemd`` on hybrid hosts) and the cgroup2 mount.  Without it every
        container shares the caller's cgroup, and two at once collide on paths like
        ``/system.slice/luod.service``."""
        name = f"luo-nspawn-{os.getpid()}-{id(self)}-{self.boots}"
        mounts = [Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")]
        hierarchies = [m for m in mounts[:2] if (m / "cgroup.procs").exists()] or [mounts[2]]
        return [h / name for h in hierarchies]

    def _create_cgroups(self) -> list[Path]:
        """Creates this boot's cgroups; returns the cgroup.procs files nspawn's shell joins before it execs."""
        procs = []
        for group in self._cgroup_dirs():
            group.mkdir(exist_ok=True)
            procs.append(group / "cgroup.procs")
        return procs

    def _remove_cgroups(self) -> None:
        """Removes this boot's cgroups bottom-up once the container is gone (a busy one is left, not fatal)."""
        for group in self._cgroup_dirs():
            if group.is_dir():
                for sub in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        sub.rmdir()
                with contextlib.suppress(OSError):
                    group.rmdir()

    def _lock_rootfs(self) -> None:
        """Hold build-rootfs.sh's lock shared while nspawn runs, so no rebuild deletes our lower layer."""
        lock = self.rootfs.parent / f".{self.rootfs.name}.lock"
        if self._lock_fd is None and lock.exists():
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise HarnessError(f"{self.rootfs} is being replaced by build-rootfs.sh; try again") from None
            self._lock_fd = fd

    def _unlock_rootfs(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _find_leader(self) -> Optional[int]:
        assert self.proc is not None
        children = _proc_children_map()
        todo, seen = [self.proc.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            ns = _nspid(pid)
            if ns and len(ns) > 1 and ns[-1] == 1 and _environ_has(pid, self._marker):
                return pid
            todo.extend(children.get(pid, ()))
        # PID 1 may have been reparented away from nspawn: look for our marker anywhere.
        for d in os.listdir("/proc"):
            if d.isdigit():
                ns = _nspid(int(d))
                if ns and len(ns) > 1 and ns[-1] == 1 and _environ_has(int(d), self._marker):
                    return int(d)
        return None

    def _tail(self, n: int = 40) -> str:
        return "\n".join(self.console_text().splitlines()[-n:])

    def _watchdog_fire(self) -> None:
        if self.running:
            assert self._log is not None
            try:
                self._log.write(b"\n===== luo harness: max_runtime reached, killing nspawn =====\n")
                self._log.flush()
            except (OSError, ValueError):
                pass
            self.kill()

    def _finish(self) -> None:
        assert self.proc is not None
        self.returncode = self.proc.wait()
        if self._watchdog:
            self._watchdog.cancel()
        if self._log:
            self._log.close()
            self._log = None
        self._remove_cgroups()
        self._unlock_rootfs()

    # -- inside the container -------------------------------------------------------------------
    def run(
        self,
        cmd: Union[str, Sequence[str]],
        *,
        input: Union[str, bytes, None] = None,
        timeout: float = 60.0,
        check: bool = False,
        env: Optional[dict[str, str]] = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess[Any]:
        """Run CMD (argv list, or a string for /bin/sh -c) inside the running container.

        It enters all of PID 1's namespaces and its root with nsenter, as root, with a clean
        environment (GUEST_ENV plus ``env``) and without CAP_SYS_BOOT. It is not part of any unit:
        use ``systemd-run`` inside for processes that must belong to the system manager.
        """
        if not self.running or self.leader is None:
            raise HarnessError("container is not running")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full = [*NO_SYS_BOOT, "nsenter", f"--target={self.leader}", "--all", "--", *argv]
        e = dict(GUEST_ENV)
        e.update(env or {})
        if isinstance(input, str) and not text:
            input = input.encode()
        if isinstance(input, bytes) and text:
            input = input.decode()
        p = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=e,
            text=text,
            start_new_session=True,
        )
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # nsenter and the command it forked
            except ProcessLookupError:
                pass
            out, err = p.communicate()
            raise subprocess.TimeoutExpired(full, timeout, out, err) from None
        res = subprocess.CompletedProcess(argv, p.returncode, out, err)
        if check and p.returncode != 0:
            raise HarnessError(
                f"{argv!r} failed with {p.returncode} in the container\nstdout: {out!r}\nstderr: {err!r}"
            )
        return res

    def sh(self, script: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
        return self.run(["/bin/sh", "-c", script], **kw)

    def write_file(self, path: str, data: Union[str, bytes], mode: int = 0o644) -> None:
        """Create or replace a file inside the running container."""
        text = isinstance(data, str)
        self.run(
            ["/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"', "sh", path, f"{mode:o}"],
            input=data,
            text=text,
            check=True,
        )

    def read_file(self, path: str) -> str:
        return str(self.run(["cat", path], check=True).stdout)

    def system_state(self, timeout: float = 10.0) -> str:
        return str(self.run(["systemctl", "is-system-running"], timeout=timeout).stdout).strip()

    def wait_running(self, timeout: float = 60.0) -> str:
        """Wait until ``systemctl is-system-running --wait`` says running or degraded; return it."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not self.running:
                self._finish()
                raise HarnessError(
                    f"container exited with {self.returncode} while booting (last state {last!r}):\n{self._tail()}"
                )
            try:
                r = self.run(["systemctl", "is-system-running", "--wait"], timeout=remaining)
            except subprocess.TimeoutExpired:
                break
            state = str(r.stdout).strip()
            last = state or str(r.stderr).strip()
            if state in RUNNING_STATES:
                return state
            if state in ("stopping", "maintenance"):
                raise HarnessError(f"system state {last!r}:\n{self._tail()}")
            time.sleep(0.02)  # manager not reachable yet (offline / no bus / no private socket)
        raise HarnessError(f"system not running after {timeout} s (last {last!r}):\n{self._tail()}")

    def failed_units(self) -> list[str]:
        r = self.run(["systemctl", "--failed", "--plain", "--no-legend", "--no-pager"])
        return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]

    # -- shutdown ---------------------------------------------------------------------------
    def start_kexec(self) -> subprocess.CompletedProcess[Any]:
        """Queue the kexec transaction (what ``systemctl kexec`` does, minus loading a kernel)."""
        return self.run(
            ["systemctl", "start", "kexec.target", "--job-mode=replace-irreversibly", "--no-block"],
            check=True,
        )

    def poweroff(self) -> subprocess.CompletedProcess[Any]:
        return self.run(["systemctl", "poweroff", "--no-block"], check=True)

    def wait_exit(self, timeout: float = 120.0) -> int:
        """Wait for nspawn to exit and return its exit code (kill it after TIMEOUT)."""
        if self.proc is None:
            raise HarnessError("container was never booted")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise HarnessError(f"container did not exit within {timeout} s (killed):\n{self._tail()}") from None
        self._finish()
        assert self.returncode is not None
        return self.returncode

    def terminate(self, grace: float = 20.0) -> int:
        """Ask nspawn to shut the container down (SIGTERM -> guest poweroff), kill after GRACE."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.returncode is None:
            self._finish()
        return self.returncode if self.returncode is not None else -1

    def kill(self) -> None:
        """SIGKILL nspawn and the container's PID 1 (both started by us)."""
        if self.proc is not None and self.proc.poll() is None:
            leader = self.leader
            if leader and _nspid(leader) and _environ_has(leader, self._marker):
                try:
                    os.kill(leader, signal.SIGKILL)  # ends the whole PID namespace
                except ProcessLookupError:
                    pass
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        if self.running:
            self.terminate()
        elif self.proc is not None and self.returncode is None:
            self._finish()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# self-check

HOOK = r"""#!/bin/sh
# luo harness self-check: runs from systemd-shutdown after the final kill, argv[1] = the verb.
d=/mnt/luo-check
echo "$1" >"$d/hook-arg.tmp" && mv "$d/hook-arg.tmp" "$d/hook-arg"
pgrep -a -f '^@survivor' >"$d/survivors" 2>&1
pgrep -a -f '^luo-victim' >"$d/victims" 2>&1
ps -ww -eo pid,uid,args >"$d/ps" 2>&1
sync
"""


def selfcheck_suite(
    suite: str, keep: bool = False, build: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    res: dict[str, Any] = {"suite": suite, "ok": False}
    t = time.monotonic()
    if build:
        rootfs = ensure_rootfs(suite, quiet=True)
    elif rootfs_path(suite).is_dir():
        rootfs = rootfs_path(suite)
    else:
        raise HarnessError(f"no cached rootfs for {suite}; run build-rootfs.sh {suite}")
    res["ensure_rootfs_s"] = round(time.monotonic() - t, 2)
    res["rootfs"] = rootfs_info(rootfs)
    state = Path(tempfile.mkdtemp(prefix=f"luo-nspawn-{suite}-"))
    hostdir = state / "host"
    hostdir.mkdir()
    res["state_dir"] = str(state)
    c = Container(rootfs, state / "c", binds=[(hostdir, "/mnt/luo-check")])
    res["unified"] = c.unified
    try:
        t = time.monotonic()
        c.boot()
        res["boot_leader_s"] = round(time.monotonic() - t, 3)
        res["state1"] = c.wait_running()
        res["boot_s"] = round(time.monotonic() - t, 3)
        res["failed_units1"] = c.failed_units()
        ver = c.run(["systemctl", "--version"], check=True).stdout.splitlines()[0]
        res["systemctl_version"] = ver
        log(f"[{suite}] up in {res['boot_s']} s ({res['state1']}): {ver}")

        c.write_file("/usr/lib/systemd/system-shutdown/luo-selfcheck.shutdown", HOOK, 0o755)
        c.run(
            [
                "systemd-run",
                "--unit=luo-survivor",
                "-p",
                "DefaultDependencies=no",
                "/bin/bash",
                "-c",
                "exec -a @survivor sleep 1000",
            ],
            check=True,
        )
        c.run(
            [
                "systemd-run",
                "--unit=luo-victim",
                "-p",
                "DefaultDependencies=no",
                "/bin/bash",
                "-c",
                "exec -a luo-victim sleep 1001",
            ],
            check=True,
        )
        for _ in range(200):
            before = c.run(["pgrep", "-a", "-f", "^(@survivor|luo-victim)"]).stdout
            if "@survivor" in before and "luo-victim" in before:
                break
            time.sleep(0.01)
        else:
            raise HarnessError(f"survivor/victim not started: {before!r}")

        t = time.monotonic()
        c.start_kexec()
        rc = c.wait_exit(120)
        res["kexec_s"] = round(time.monotonic() - t, 3)
        res["kexec_exit_code"] = rc
        hook_arg = (hostdir / "hook-arg").read_text().strip() if (hostdir / "hook-arg").exists() else None
        survivors = (hostdir / "survivors").read_text() if (hostdir / "survivors").exists() else ""
        victims = (hostdir / "victims").read_text() if (hostdir / "victims").exists() else ""
        res["hook_arg"] = hook_arg
        res["survivor_alive_in_hook"] = "@survivor" in survivors
        res["victim_alive_in_hook"] = "luo-victim" in victims
        res["shutdown_kind"] = c.shutdown_kind()
        log(
            f"[{suite}] kexec transaction: nspawn exit {rc} after {res['kexec_s']} s; hook argv[1]={hook_arg!r}; "
            f"@survivor alive in hook: {res['survivor_alive_in_hook']}; "
            f"plain victim alive: {res['victim_alive_in_hook']}"
        )
        for f in ("hook-arg", "survivors", "victims", "ps"):
            if (hostdir / f).exists():
                (hostdir / f).rename(hostdir / f"kexec-{f}")

        t = time.monotonic()
        c.boot()
        res["state2"] = c.wait_running()
        res["boot2_s"] = round(time.monotonic() - t, 3)
        res["failed_units2"] = c.failed_units()
        res["hook_kept_on_disk"] = (
            c.run(["test", "-x", "/usr/lib/systemd/system-shutdown/luo-selfcheck.shutdown"]).returncode == 0
        )
        boots = c.run(["journalctl", "--list-boots", "--no-pager", "-q"]).stdout
        res["journal_boots"] = len([x for x in boots.splitlines() if x.strip()])
        log(
            f"[{suite}] second boot in {res['boot2_s']} s ({res['state2']}); hook still on disk: "
            f"{res['hook_kept_on_disk']}; journal boots: {res['journal_boots']}"
        )

        t = time.monotonic()
        c.poweroff()
        res["poweroff_exit_code"] = c.wait_exit(120)
        res["poweroff_s"] = round(time.monotonic() - t, 3)
        arg_file = hostdir / "hook-arg"
        res["poweroff_hook_arg"] = arg_file.read_text().strip() if arg_file.exists() else None

        res["ok"] = (
            res["state1"] in RUNNING_STATES
            and res["kexec_exit_code"] == 0
            and hook_arg == "kexec"
            and res["shutdown_kind"] == "kexec"
            and res["survivor_alive_in_hook"]
            and not res["victim_alive_in_hook"]
            and res["state2"] in RUNNING_STATES
            and res["hook_kept_on_disk"]
        )
    except Exception as e:  # report, don't hide
        res["error"] = f"{type(e).__name__}: {e}"
        log(f"[{suite}] ERROR {res['error']}")
    finally:
        c.close()
        res["console_log"] = str(c.console_log)
        if keep or not res["ok"]:
            log(f"[{suite}] state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    log(f"[{suite}] {'OK' if res['ok'] else 'FAILED'}")
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="harness.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) cached rootfs trees")
    b.add_argument("suites", nargs="*", default=list(SUITES))
    r = sub.add_parser("run", help="boot a throw-away container, run CMD inside, power off")
    r.add_argument("suite")
    r.add_argument("--bind", action="append", default=[], metavar="HOST:GUEST")
    r.add_argument("--bind-ro", action="append", default=[], metavar="HOST:GUEST")
    r.add_argument("--state", help="state dir to use and keep (default: a temporary one, removed)")
    r.add_argument("--timeout", type=float, default=300.0)
    r.add_argument("--no-build", action="store_true", help="use the cached tree as it is")
    s = sub.add_parser("selfcheck", help="boot / kexec transaction / boot again, per suite")
    s.add_argument("suites", nargs="*", default=list(SUITES))
    s.add_argument("--keep", action="store_true", help="keep state dirs")
    s.add_argument("--no-build", action="store_true", help="use the cached trees as they are")
    s.add_argument("--json", help="write results to this file")
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    a = ap.parse_args(argv)

    if a.cmd == "build":
        for suite in a.suites:
            ensure_rootfs(suite)
        return 0
    if a.cmd == "run":
        cmd = command
        if not cmd:
            ap.error("run needs a command after --")
        if a.no_build:
            rootfs = rootfs_path(a.suite)
            if not rootfs.is_dir():
                raise HarnessError(f"no cached rootfs for {a.suite}; run build-rootfs.sh {a.suite}")
        else:
            rootfs = ensure_rootfs(a.suite, quiet=True)
        state = Path(a.state) if a.state else Path(tempfile.mkdtemp(prefix=f"luo-nspawn-{a.suite}-"))
        try:
            with Container(rootfs, state, binds=a.bind, binds_ro=a.bind_ro) as c:
                c.boot()
                c.wait_running()
                try:
                    p = c.run(cmd, timeout=a.timeout)
                except subprocess.TimeoutExpired:
                    print("harness: command timed out", file=sys.stderr)
                    return 124
                sys.stdout.write(p.stdout)
                sys.stderr.write(p.stderr)
                c.poweroff()
                c.wait_exit(60)
                return p.returncode
        finally:
            if not a.state:
                shutil.rmtree(state, ignore_errors=True)
    if a.cmd == "selfcheck":
        results = [selfcheck_suite(suite, keep=a.keep, build=not a.no_build) for suite in a.suites]
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
        print()
        print(
            f"{'suite':9} {'systemd':22} {'boot':>6} {'kexec':>6} {'exit':>4} {'hook':>6} {'@surv':>5} "
            f"{'boot2':>6}  result"
        )
        for x in results:
            print(
                f"{x['suite']:9} {x['rootfs'].get('systemd', '?'):22} {x.get('boot_s', '-')!s:>6} "
                f"{x.get('kexec_s', '-')!s:>6} {x.get('kexec_exit_code', '-')!s:>4} {x.get('hook_arg', '-')!s:>6} "
                f"{x.get('survivor_alive_in_hook', '-')!s:>5} {x.get('boot2_s', '-')!s:>6}  "
                f"{'OK' if x['ok'] else 'FAILED ' + x.get('error', '')}"
            )
        ok = all(x["ok"] for x in results)
        print(f"{sum(x['ok'] for x in results)} passed, {sum(not x['ok'] for x in results)} failed")
        return 0 if ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
