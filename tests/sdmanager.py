"""A real ``systemd --user`` service manager for root, in a private mount namespace: the tier between fake
cgroups (``UnitTree``) and booting containers (``tests/nspawn``), for integration tests of units, generators,
hooks and fd stores against the systemd installed on this machine.

How it runs (see :meth:`UserManager.start`)::

    sh boot.sh                                   # host mount namespace
      echo $$ > /sys/fs/cgroup/<hierarchy>/NAME/cgroup.procs      (name=systemd and unified on hybrid hosts)
      exec unshare --mount --propagation private -- sh -c '
        mount tmpfs on /run; mkdir /run/systemd/system            (systemd --user needs it: "booted with systemd";
                                                                   units may use /run freely: the host's is hidden)
        harness drop-in into /run/systemd/user.conf.d/
        bind DIR/journal (journal sockets we serve) on /run/systemd/journal
        mkdir /run/user/0                                         (XDG_RUNTIME_DIR: private bus socket, notify socket)
        mount tmpfs on /etc/systemd/user                          (hides the host's enabled user units)
        bind DIR/kmsg (a FIFO we read) on /dev/kmsg, /dev/null on /dev/console
        exec systemd --user --log-target=journal'

Nothing is created on the host outside ``directory`` and the cgroup ``NAME`` (removed by :meth:`UserManager.stop`):
``/run/systemd/system`` exists only inside the namespace.  ``systemctl``/any command reaches the manager through
``nsenter --target PID --mount`` with the manager's environment (:meth:`UserManager.run`).

Where things come from:

* units: ``unit_dirs`` first (``SYSTEMD_UNIT_PATH=DIR:DIR:`` -- the trailing ``:`` keeps the defaults, which
  are needed: ``/usr/lib/systemd/user`` holds ``default.target``/``basic.target``/``app.slice``, and the generator
  output directories are only searched as part of the defaults), then ``$XDG_CONFIG_HOME/systemd/user``
  (:attr:`UserManager.unit_dir`, writable: tests may write units there and :meth:`UserManager.daemon_reload`),
  then the system defaults.  ``dbus.socket`` is masked so no session bus is socket-activated.
* generators: only ``generator_dirs`` (``SYSTEMD_GENERATOR_PATH``, no defaults: the host's
  ``systemd-xdg-autostart-generator`` stays out).  They run at start and at every daemon-reload with
  ``$XDG_RUNTIME_DIR/systemd/generator{,.early,.late}`` as arguments.
* environment: the manager passes its own environment to every unit, so ``environment=`` is simply the
  manager's process environment (check with ``systemctl --user show-environment``).  Environment generators
  (``environment.d``) are disabled, so the host's ``/etc/environment.d`` does not leak in.

Logs: there is no journald (``journalctl`` shows nothing of this manager), so the harness serves the two
journal sockets itself (:class:`LogCollector`, bound on ``/run/systemd/journal`` inside the namespace): the
manager logs there (``--log-target=journal``), units' stdout/stderr arrive there (``StandardOutput=journal``, the
default) and so does ``sd_journal_send()``.  A FIFO bind-mounted on ``/dev/kmsg`` catches what generators write
to the kernel log, so none of it reaches the host's.  Read it with :meth:`UserManager.journal` (a unit's output),
:meth:`UserManager.entries` (like ``journalctl --user-unit``) or :meth:`UserManager.log` (``journal.log``, all of
it).  ``/dev/console`` is ``/dev/null`` inside the namespace; ``/dev/log`` (syslog) is not served.
(``--log-target=console`` is no use: systemd 252 in user mode reopens ``/dev/console`` and insists on a tty;
``kmsg`` is rate-limited to 200 lines per 5 s.)

A unit's control group (``systemctl show -p ControlGroup``, and the ``name=systemd`` line of
``/proc/PID/cgroup`` on this hybrid host) is ``/NAME/app.slice/UNIT`` (:meth:`UserManager.unit_cgroup`); the
manager itself sits in ``/NAME/init.scope``.

Standard library only (Python >= 3.9).  Must run as root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional

CGROUP_FS = Path("/sys/fs/cgroup")
RUNTIME_DIR = "/run/user/0"
SYSTEMD_CANDIDATES = ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MASKED_UNITS = ("dbus.socket",)
SUN_PATH_MAX = 107
STOP_TIMEOUT = 20.0

# Read by the manager from /run/systemd/user.conf.d/ inside the namespace (never written on the host).
MANAGER_CONF = """[Manager]
DefaultTimeoutStartSec=30s
DefaultTimeoutStopSec=10s
"""

NAMESPACE_SCRIPT = """set -eu
mount -t tmpfs -o mode=0755 luo-sdmanager /run
mkdir -p /run/systemd/system /run/systemd/user.conf.d /run/systemd/journal /run/user
cp "$1" /run/systemd/user.conf.d/50-luo-sdmanager.conf
mount --bind "$2" /run/systemd/journal
mkdir -m 0700 /run/user/0
if [ -d /etc/systemd/user ]; then mount -t tmpfs -o mode=0755,size=1m luo-sdmanager /etc/systemd/user; fi
mount --bind "$3" /dev/kmsg
if [ -e /dev/console ]; then mount --bind /dev/null /dev/console; fi
shift 3
exec env -u PWD -u OLDPWD "$@"
"""


class ManagerError(RuntimeError):
    """The user manager failed to start, or a command run against it failed (message carries the details)."""


def available() -> tuple[bool, str]:
    """(True, "") when this machine can run a private ``systemd --user``, else (False, why) -- for pytest skips."""
    if os.geteuid() != 0:
        return False, "needs root"
    if systemd_binary() is None:
        return False, "systemd is not installed"
    for tool in ("unshare", "nsenter", "systemctl", "mount"):
        if shutil.which(tool) is None:
            return False, f"{tool} not installed"
    if tracking_hierarchy() is None:
        return False, "no cgroup hierarchy mounted under /sys/fs/cgroup"
    return True, ""


def systemd_binary() -> Optional[str]:
    for candidate in SYSTEMD_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def cgroup_hierarchies() -> list[tuple[Path, str]]:
    """(mount point, super options) of every cgroup and cgroup2 mount of this mount namespace."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, _, options = tail.split(" ", 2)
        if fstype in ("cgroup", "cgroup2"):
            mount_point = Path(fields.split(" ")[4].replace("\\040", " "))
            found.append((mount_point, options if fstype == "cgroup" else "cgroup2"))
    return found


def tracking_hierarchy() -> Optional[Path]:
    """The hierarchy systemd tracks units in: ``name=systemd`` on legacy/hybrid hosts, else the cgroup2 mount."""
    hierarchies = cgroup_hierarchies()
    for mount_point, options in hierarchies:
        if "name=systemd" in options.split(","):
            return mount_point
    for mount_point, options in hierarchies:
        if options == "cgroup2":
            return mount_point
    return None


def cgroup_of(pid: int, hierarchy: str = "name=systemd") -> str:
    """The path of ``pid`` in one hierarchy, from ``/proc/PID/cgroup`` (``""`` is the cgroup2 line)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == hierarchy:
            return path
    if hierarchy == "name=systemd":  # pure cgroup2 host
        return cgroup_of(pid, "")
    raise KeyError(f"pid {pid} has no {hierarchy!r} line in /proc/{pid}/cgroup")


@dataclass(frozen=True)
class LogLine:
    """One journal entry, as journald would record it.

    ``source`` is ``stdout`` (a unit's stdout/stderr), ``native`` (``sd_journal_send()``/the manager's own log),
    ``kmsg`` (written to ``/dev/kmsg``, e.g. by a generator) or ``harness`` (the collector's own failure).
    ``unit`` is the ``USER_UNIT=``/``UNIT=`` field the manager puts on its messages about a unit, else the
    writer's unit (see :class:`LogCollector`; ``init.scope`` for the manager, ``""`` if unknown).
    ``identifier`` is ``SYSLOG_IDENTIFIER=``, for ``stdout`` ``SyslogIdentifier=`` or the executable's name."""

    source: str
    unit: str
    identifier: str
    pid: int
    text: str


def parse_native(data: bytes) -> dict[str, str]:
    """Fields of one journal native-protocol datagram (``KEY=value`` lines, or ``KEY``, a little-endian 64-bit
    length and binary data)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            end = len(data)
        line = data[pos:end]
        key, eq, value = line.partition(b"=")
        if eq:
            pos = end + 1
        else:
            size = int.from_bytes(data[end + 1 : end + 9], "little")
            value = data[end + 9 : end + 9 + size]
            pos = end + 9 + size + 1
        fields[key.decode(errors="replace")] = value.decode("utf-8", "replace")
    return fields


LOG_LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}


@dataclass
class _Stream:
    """One unit process's stdout/stderr connection."""

    pid: int
    unit: str
    header: list[str] = field(default_factory=list)
    buffer: bytearray = field(default_factory=bytearray)


class LogCollector:
    """The parts of journald and the kernel log that a manager without them needs, served from one thread.
    Entries up to ``max_priority`` go to :attr:`lines` and, one line each, to ``log_path``.

    * ``journal_dir/socket`` (bound on ``/run/systemd/journal/socket``): the native protocol, used by the
      manager for its own log (``--log-target=journal``) and by ``sd_journal_send()``.
    * ``journal_dir/stdout`` (``/run/systemd/journal/stdout``): systemd connects a unit's stdout/stderr to it
      (``StandardOutput=journal``, the default), writes a seven-line header (identifier, unit -- empty from a
      user manager --, priority, level prefix, forward to syslog/kmsg/console), then the unit's output.
    * ``kmsg_path``, a FIFO (bound on ``/dev/kmsg``): what generators (or anything else) write to the kernel log.
      (Not used for the manager's own log: systemd rate-limits its /dev/kmsg writes to 200 per 5 s.)

    Which unit a stdout stream belongs to: its process's cgroup when the stream connects, or -- when the
    process has already exited by then, as a quick ``echo`` does -- the unit named in that process's own
    debug message "UNIT: Executing: …", sent (with ``USER_UNIT=``) by the forked child before it execs and
    hence before its first output.  The manager therefore always logs at debug level; entries above
    ``max_priority`` are only used for this.
    """

    HEADER_LINES = 7

    def __init__(
        self,
        journal_dir: Path,
        kmsg_path: Path,
        log_path: Path,
        unit_of: Callable[[int], str],
        max_priority: int = LOG_LEVELS["info"],
    ) -> None:
        self.lines: list[LogLine] = []
        #: set once the manager runs: its own messages name many units and must not map its PID to one
        self.manager_pid = 0
        self._max_priority = max_priority
        self._unit_of = unit_of
        self._pid_units: dict[int, str] = {}
        self._lock = threading.Condition()
        self._log: IO[str] = open(log_path, "a", encoding="utf-8")  # noqa: SIM115
        os.mkfifo(kmsg_path, 0o600)
        # read-write: writers never block in open() and we never see EOF while the manager runs
        self._kmsg_fd = os.open(kmsg_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._kmsg_buffer = bytearray()
        self._native = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._native.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._native.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self._native.bind(str(journal_dir / "socket"))
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(journal_dir / "stdout"))
        self._listener.listen(64)
        for name in ("socket", "stdout"):
            os.chmod(journal_dir / name, 0o666)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="sdmanager-journal", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as e:
            self._add(LogLine("harness", "", "sdmanager", os.getpid(), f"journal collector failed: {e!r}"))
            raise

    def _serve(self) -> None:
        streams: dict[socket.socket, _Stream] = {}
        with selectors.DefaultSelector() as sel:
            for source in (self._listener, self._native, self._kmsg_fd, self._wake_r):
                sel.register(source, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        self._read_native()
                        self._read_kmsg(final=True)
                        for conn, stream in streams.items():
                            self._drain(stream, final=True)
                            conn.close()
                        return
                    if key.fileobj == self._kmsg_fd:
                        self._read_kmsg(final=False)
                    elif key.fileobj is self._native:
                        self._read_native()
                    elif key.fileobj is self._listener:
                        conn, _ = self._listener.accept()
                        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                        pid = int.from_bytes(creds[:4], "little")
                        streams[conn] = _Stream(pid, self._unit_of(pid))
                        sel.register(conn, selectors.EVENT_READ)
                    else:
                        conn = key.fileobj  # type: ignore[assignment]
                        data = conn.recv(65536)
                        streams[conn].buffer.extend(data)
                        self._drain(streams[conn], final=not data)
                        if not data:
                            sel.unregister(conn)
                            conn.close()
                            del streams[conn]

    def _add(self, line: LogLine) -> None:
        with self._lock:
            self.lines.append(line)
            self._log.write(f"{line.unit or '-'} {line.identifier}[{line.pid}]: {line.text}\n")
            self._log.flush()
            self._lock.notify_all()

    @staticmethod
    def _split(buffer: bytearray, final: bool) -> Iterator[str]:
        while b"\n" in buffer or (final and buffer):
            raw, sep, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest if sep else b""
            yield raw.decode("utf-8", "replace")

    def _read_native(self) -> None:
        fd_space = socket.CMSG_SPACE(253 * 4)
        cred_space = socket.CMSG_SPACE(12)
        while True:
            try:
                data, ancdata, _, _ = self._native.recvmsg(1 << 20, fd_space + cred_space, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = int.from_bytes(payload[:4], "little")
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    for i in range(0, len(payload) - len(payload) % 4, 4):
                        fd = int.from_bytes(payload[i : i + 4], "little")
                        with os.fdopen(fd, "rb") as memfd:  # large entries come as a sealed memfd
                            data += memfd.read()
            fields = parse_native(data)
            named = fields.get("USER_UNIT") or fields.get("UNIT") or ""
            if named and pid and pid != self.manager_pid:
                self._pid_units[pid] = named
            priority = fields.get("PRIORITY", "6")
            if priority.isdigit() and int(priority) > self._max_priority:
                continue
            unit = named or self._unit_of(pid)
            identifier = fields.get("SYSLOG_IDENTIFIER", "")
            for text in fields.get("MESSAGE", "").splitlines() or [""]:
                self._add(LogLine("native", unit, identifier, pid, text))

    def _read_kmsg(self, final: bool) -> None:
        while True:
            try:
                data = os.read(self._kmsg_fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            self._kmsg_buffer.extend(data)
        for raw in self._split(self._kmsg_buffer, final):
            text = raw[raw.index(">") + 1 :] if raw.startswith("<") and ">" in raw[:5] else raw
            self._add(LogLine("kmsg", "", "kmsg", 0, text))

    def _drain(self, stream: _Stream, final: bool) -> None:
        for text in self._split(stream.buffer, final):
            if len(stream.header) < self.HEADER_LINES:
                stream.header.append(text)
                continue
            if not stream.unit:
                stream.unit = stream.header[1]
            if not stream.unit:
                self._read_native()  # the process's "Executing:" message was sent before this output
                stream.unit = self._pid_units.get(stream.pid, "")
            self._add(LogLine("stdout", stream.unit, stream.header[0], stream.pid, text))

    def entries(self, unit: Optional[str] = None, source: Optional[str] = None) -> list[LogLine]:
        with self._lock:
            return [
                line
                for line in self.lines
                if (unit is None or line.unit == unit) and (source is None or line.source == source)
            ]

    def wait_for(self, predicate: Callable[[LogLine], bool], timeout: float) -> Optional[LogLine]:
        """The first entry (old or new) ``predicate`` accepts, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._lock:
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(remaining)

    def close(self) -> None:
        os.write(self._wake_w, b"x")
        self._thread.join(10)
        self._listener.close()
        self._native.close()
        for fd in (self._wake_r, self._wake_w, self._kmsg_fd):
            os.close(fd)
        self._log.close()


class UserManager:
    """A private ``systemd --user`` manager for root.  Call :meth:`start`, then :meth:`stop` (or use
    :func:`user_manager`).

    ``directory`` (created if missing) holds everything of this manager: the boot script, logs, sockets and the
    manager's ``$HOME``/``$XDG_*`` directories.  Unix socket paths in it must stay below 108 bytes."""

    def __init__(
        self,
        directory: Path,
        *,
        unit_dirs: Sequence[Path] = (),
        generator_dirs: Sequence[Path] = (),
        environment: Optional[Mapping[str, str]] = None,
        log_level: str = "info",
        name: Optional[str] = None,
    ) -> None:
        self.directory = Path(directory).resolve()
        self.unit_dirs = [Path(d).resolve() for d in unit_dirs]
        self.generator_dirs = [Path(d).resolve() for d in generator_dirs]
        if log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        #: the manager's messages up to this level are kept (it always logs at debug: see LogCollector)
        self.log_level = log_level
        self.max_priority = LOG_LEVELS[log_level]
        self.name = name or f"luo-sdmanager-{os.getpid()}-{secrets.token_hex(4)}"
        #: the manager's cgroup root as /proc/PID/cgroup shows it (name=systemd line); units are below app.slice
        self.cgroup = "/" + self.name
        self.pid = 0
        self.proc: Optional[subprocess.Popen[bytes]] = None
        #: seconds from spawning the manager to its READY=1 (start-up finished)
        self.startup_seconds = 0.0
        #: everything the journal would have (see LogCollector), one line per entry: "UNIT IDENT[PID]: TEXT"
        self.log_path = self.directory / "journal.log"
        #: stdout/stderr of the boot script (mount errors) and of anything else that bypasses the journal
        self.stdio_log_path = self.directory / "stdio.log"
        #: writable, in the unit search path ($XDG_CONFIG_HOME/systemd/user): see write_unit()
        self.unit_dir = self.directory / "config" / "systemd" / "user"
        self._logs: Optional[LogCollector] = None

        base = {
            "PATH": os.environ.get("PATH", DEFAULT_PATH),
            "LANG": "C.UTF-8",
            "HOME": str(self.directory / "home"),
            "USER": "root",
            "LOGNAME": "root",
            "XDG_RUNTIME_DIR": RUNTIME_DIR,
            "XDG_CONFIG_HOME": str(self.directory / "config"),
            "XDG_DATA_HOME": str(self.directory / "data"),
            "XDG_STATE_HOME": str(self.directory / "state"),
            "XDG_CACHE_HOME": str(self.directory / "cache"),
            "SYSTEMD_GENERATOR_PATH": ":".join(map(str, self.generator_dirs or [self.directory / "no-generators"])),
            "SYSTEMD_ENVIRONMENT_GENERATOR_PATH": str(self.directory / "no-generators"),
        }
        if self.unit_dirs:
            base["SYSTEMD_UNIT_PATH"] = ":".join(map(str, self.unit_dirs)) + ":"
        #: the manager's process environment, which it hands to every unit (but PATH: see manager_conf());
        #: also the environment of run()/systemctl()
        self.environment: dict[str, str] = {**base, **(environment or {})}
        self._path_given = environment is not None and "PATH" in environment

    def manager_conf(self) -> str:
        """The drop-in the manager reads from /run/systemd/user.conf.d/ inside the namespace.  A user manager
        gives units its compiled-in default PATH, not its own: a PATH passed in ``environment`` is set again
        with ``DefaultEnvironment=``."""
        # the command line's --log-* options are forgotten at daemon-reload; the configuration is read again
        conf = MANAGER_CONF + "LogTarget=journal\nLogLevel=debug\nLogColor=no\n"
        if self._path_given:
            quoted = ("PATH=" + self.environment["PATH"]).replace("\\", "\\\\").replace('"', '\\"')
            conf += f'DefaultEnvironment="{quoted}"\n'
        return conf

    # -- life cycle --------------------------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Boots the manager and returns once it reports start-up finished on our notify socket (READY=1 and a
        status other than "Reached basic.target": its boot transaction is done).  :attr:`startup_seconds` says
        how long that took."""
        if self.proc is not None:
            raise ManagerError("manager already started")
        ok, why = available()
        if not ok:
            raise ManagerError(f"cannot run systemd --user here: {why}")
        for sub in ("home", "config", "data", "state", "cache", "no-generators", "journal"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        for unit in MASKED_UNITS:
            mask = self.unit_dir / unit
            if not mask.is_symlink():
                mask.symlink_to("/dev/null")
        conf = self.directory / "manager.conf"
        conf.write_text(self.manager_conf())
        notify_path = self.directory / "notify.sock"
        journal_dir = self.directory / "journal"
        kmsg_path = self.directory / "kmsg"
        for path in (notify_path, journal_dir / "socket", journal_dir / "stdout", kmsg_path):
            if path != kmsg_path and len(str(path).encode()) > SUN_PATH_MAX:
                raise ManagerError(f"socket path too long for AF_UNIX: {path}")
            if path.exists() or path.is_symlink():
                path.unlink()
        self._logs = LogCollector(journal_dir, kmsg_path, self.log_path, self.unit_of_pid, self.max_priority)
        try:
            self._boot(conf, notify_path, journal_dir, kmsg_path, timeout)
        except BaseException:
            self.stop()
            raise

    def _boot(self, conf: Path, notify_path: Path, journal_dir: Path, kmsg_path: Path, timeout: float) -> None:
        assert self._logs is not None
        procs = self._create_cgroups()
        systemd = systemd_binary()
        assert systemd is not None
        manager_argv = [systemd, "--user", "--log-target=journal", "--log-level=debug"]
        inner = ["sh", "-c", NAMESPACE_SCRIPT, "sh", str(conf), str(journal_dir), str(kmsg_path)]
        boot = self.directory / "boot.sh"
        boot.write_text(
            "set -eu\n"
            + "".join(f"echo $$ > {shlex.quote(str(p))}\n" for p in procs)
            + "exec unshare --mount --propagation private -- "
            + " ".join(shlex.quote(a) for a in inner + manager_argv)
            + "\n"
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            began = time.monotonic()
            with open(self.stdio_log_path, "ab") as stdio:
                self.proc = subprocess.Popen(
                    ["sh", str(boot)],
                    env={**self.environment, "NOTIFY_SOCKET": str(notify_path)},
                    stdin=subprocess.DEVNULL,
                    stdout=stdio,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                )
            self.pid = self.proc.pid  # sh, unshare and sh exec: this PID becomes systemd
            self._logs.manager_pid = self.pid
            self._wait_ready(notify, timeout)
            self.startup_seconds = time.monotonic() - began
        notify_path.unlink()

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        pidfd = os.pidfd_open(self.pid)
        ready = finished = False
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(notify, selectors.EVENT_READ)
                sel.register(pidfd, selectors.EVENT_READ)
                while True:
                    remaining = deadline - time.monotonic()
                    events = sel.select(max(remaining, 0)) if remaining > 0 else []
                    if not events:
                        raise ManagerError(f"systemd --user not ready in {timeout}s\n{self.log_tail()}")
                    for key, _ in events:
                        if key.fileobj == pidfd:
                            code = self.proc.wait()
                            raise ManagerError(f"systemd --user exited with {code} during start-up\n{self.log_tail()}")
                        fields = notify.recv(4096).decode(errors="replace").split("\n")
                        # 252 sends "READY=1\nSTATUS=Reached basic.target." first, then, once the boot
                        # transaction (default.target and all it pulls in) is done, "READY=1\nSTATUS=Ready.".
                        ready = ready or "READY=1" in fields
                        finished = finished or any(
                            f.startswith("STATUS=") and not f.startswith("STATUS=Reached basic.target") for f in fields
                        )
                        if ready and finished:
                            return
        finally:
            os.close(pidfd)

    def _create_cgroups(self) -> list[Path]:
        """Creates NAME in the tracking hierarchy (and in the cgroup2 one on hybrid hosts); returns the
        cgroup.procs files to join, tracking hierarchy first."""
        tracking = tracking_hierarchy()
        assert tracking is not None
        targets = [tracking]
        for mount_point, options in cgroup_hierarchies():
            if options == "cgroup2" and mount_point != tracking:
                targets.append(mount_point)
        procs = []
        for hierarchy in targets:
            group = hierarchy / self.name
            group.mkdir()
            procs.append(group / "cgroup.procs")
        return procs

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stops the manager (SIGTERM: it starts exit.target, stopping every unit, then exits), kills by PID
        whatever is left in its cgroups, and removes the cgroups.  Safe to call more than once."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill_cgroup_members()
                    self.proc.wait(10)
            self._kill_cgroup_members()
            self._remove_cgroups()
        finally:
            if self._logs is not None:
                self._logs.close()
                self._logs = None

    def _cgroup_members(self) -> set[int]:
        pids: set[int] = set()
        for mount_point, _ in cgroup_hierarchies():
            group = mount_point / self.name
            if group.is_dir():
                for procs in group.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError):
                        pids.update(int(p) for p in procs.read_text().split())
        return pids

    def _kill_cgroup_members(self) -> None:
        """SIGKILLs each process in this manager's cgroups (all descendants of the manager we started) through a
        pidfd taken while it was still in them (so a recycled PID is never hit), and waits until each has exited."""
        for _ in range(10):  # units may fork while we kill; each round takes only the survivors
            pids = self._cgroup_members()
            if not pids:
                return
            pidfds = []
            for pid in pids:
                try:
                    pidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    continue
                pidfds.append(pidfd)
                with contextlib.suppress(OSError, KeyError):
                    if cgroup_of(pid).startswith(self.cgroup + "/") or cgroup_of(pid) == self.cgroup:
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            try:
                with selectors.DefaultSelector() as sel:
                    for fd in pidfds:
                        sel.register(fd, selectors.EVENT_READ)
                    deadline = time.monotonic() + 10
                    while sel.get_map() and time.monotonic() < deadline:
                        for key, _ in sel.select(deadline - time.monotonic()):
                            sel.unregister(key.fileobj)
            finally:
                for fd in pidfds:
                    os.close(fd)
            if self.proc is not None:
                self.proc.poll()  # reap the manager if it was among them
        raise ManagerError(f"processes keep appearing in cgroup {self.cgroup}: {sorted(self._cgroup_members())}")

    def _remove_cgroups(self) -> None:
        """Removes NAME (bottom-up) from every hierarchy: systemd may have created it in v1 controllers too."""
        for mount_point, _ in cgroup_hierarchies():
            group = mount_point / self.name
            if not group.is_dir():
                continue
            for sub in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                sub.rmdir()
            group.rmdir()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- talking to it -----------------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: Optional[str] = None,
        environment: Optional[Mapping[str, str]] = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` in the manager's mount namespace with the manager's environment (plus ``environment``),
        in the caller's cgroup (not as a unit).  With ``check``, a non-zero exit raises :class:`ManagerError`
        carrying the output and the tail of the manager's log."""
        if not self.running:
            raise ManagerError("the user manager is not running")
        nsenter = ["nsenter", f"--target={self.pid}", "--mount", f"--wd={self.directory}", "--"]
        done = subprocess.run(
            [*nsenter, *argv],
            env={**self.environment, **(environment or {})},
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise ManagerError(
                f"{shlex.join(argv)} exited with {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}\n"
                f"{self.log_tail()}"
            )
        return done

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ARGS`` against this manager (jobs block until done, as usual)."""
        return self.run(["systemctl", "--user", "--no-pager", "--no-ask-password", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl --user show -p PROP… UNIT`` as a dict (all properties when none are named)."""
        args = ["show", *(f"--property={p}" for p in props), "--", unit]
        out = self.systemctl(*args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def daemon_reload(self) -> None:
        """Reloads units (and reruns generators); returns once the reload is done."""
        self.systemctl("daemon-reload")

    def main_pid(self, unit: str) -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def unit_cgroup(self, unit: str) -> str:
        """The cgroup path systemd gives ``unit`` (``/NAME/app.slice/UNIT`` for services)."""
        return self.show(unit, "ControlGroup")["ControlGroup"]

    def environment_block(self) -> dict[str, str]:
        """What units get from the manager: ``systemctl --user show-environment``."""
        out = self.systemctl("show-environment").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write_unit(self, name: str, text: str) -> Path:
        """Writes a unit into :attr:`unit_dir` (call :meth:`daemon_reload` if the manager runs)."""
        path = self.unit_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    # -- logs --------------------------------------------------------------------------------------------------

    def unit_of_pid(self, pid: int) -> str:
        """The unit ``pid`` belongs to, from its cgroup (``/NAME/app.slice/foo.service`` -> ``foo.service``);
        ``""`` if it is not in this manager or is gone."""
        try:
            path = cgroup_of(pid)
        except (OSError, KeyError):
            return ""
        if not path.startswith(self.cgroup + "/"):
            return ""
        for part in path[len(self.cgroup) + 1 :].split("/"):
            if not part.endswith(".slice"):
                return part
        return ""

    def journal(self, unit: Optional[str] = None) -> list[str]:
        """Lines units wrote to stdout/stderr so far (all units, or only ``unit``; see :class:`LogLine`)."""
        return [line.text for line in self.entries(unit, "stdout")]

    def entries(self, unit: Optional[str] = None, source: Optional[str] = None) -> list[LogLine]:
        """Journal entries so far, like ``journalctl [--user-unit UNIT]``: for a unit, also the manager's
        messages about it ("Started …").  ``source``: ``stdout``, ``native`` or ``kmsg`` (see :class:`LogLine`)."""
        return self._logs.entries(unit, source) if self._logs is not None else []

    def wait_for_entry(
        self, text: str, *, unit: Optional[str] = None, source: Optional[str] = None, timeout: float = 10
    ) -> LogLine:
        """Waits until a journal entry containing ``text`` (of ``unit``/``source`` if given) has arrived.  Output
        reaches the harness asynchronously: a unit's last lines may arrive after ``systemctl start`` returned."""

        def matches(line: LogLine) -> bool:
            return (
                text in line.text and (unit is None or line.unit == unit) and (source is None or line.source == source)
            )

        found = self._logs.wait_for(matches, timeout) if self._logs is not None else None
        if found is None:
            raise ManagerError(
                f"no journal entry with {text!r} (unit {unit}, source {source}) in {timeout}s\n{self.log_tail()}"
            )
        return found

    def log(self) -> str:
        """The whole journal so far as text: the manager's log (``log_level``), units' output and native
        entries, and what generators wrote to /dev/kmsg."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for title, path in (("journal", self.log_path), ("boot script", self.stdio_log_path)):
            if path.exists():
                tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                parts.append(f"--- {title} log ({path}) ---\n{tail}")
        return "\n".join(parts)


@contextlib.contextmanager
def user_manager(
    directory: Path,
    *,
    unit_dirs: Sequence[Path] = (),
    generator_dirs: Sequence[Path] = (),
    environment: Optional[Mapping[str, str]] = None,
    log_level: str = "info",
    timeout: float = 30,
) -> Iterator[UserManager]:
    """A started :class:`UserManager`, stopped (cgroups removed) on exit.  In a test module::

    @pytest.fixture
    def manager(tmp_path: Path) -> Iterator[UserManager]:
        with user_manager(tmp_path / "sd", unit_dirs=[UNITS]) as manager:
            yield manager
    """
    manager = UserManager(
        directory, unit_dirs=unit_dirs, generator_dirs=generator_dirs, environment=environment, log_level=log_level
    )
    manager.start(timeout)
    try:
        yield manager
    finally:
        manager.stop()
