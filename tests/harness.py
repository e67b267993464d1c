"""Real parts for tests: the emulator, a private system-style dbus-daemon, a real luod process, and
processes placed in cgroups that look like units (so the agent derives their unit as under systemd)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from luo_systemd import cgroups, varlink
from luo_systemd.broker import Broker
from luo_systemd.liveupdate import EmuControl, EmulatorTransport, emulator_backend
from luo_systemd.manifest import Manifest

READY_TIMEOUT = 10.0


def wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes], what: str) -> None:
    """Waits for READY=1 on a NOTIFY_SOCKET we own (no sleep-polling for sockets to appear)."""
    notify.settimeout(READY_TIMEOUT)
    while True:
        try:
            msg = notify.recv(4096)
        except socket.timeout:
            proc.kill()
            raise RuntimeError(f"{what} did not become ready in {READY_TIMEOUT}s") from None
        if b"READY=1" in msg.split(b"\n"):
            return


class Emulator:
    """A running ``luo-emu serve`` process."""

    def __init__(self, directory: Path, name: str = "luo-emu.sock", without_luo: bool = False) -> None:
        self.socket = str(directory / name)
        notify_path = str(directory / ".notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(notify_path)
            env = dict(os.environ, NOTIFY_SOCKET=notify_path)
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "luo_systemd.emulator",
                    "--socket",
                    self.socket,
                    "serve",
                    *(["--without-luo"] if without_luo else []),
                ],
                env=env,
                stderr=subprocess.PIPE,
            )
            wait_ready(notify, self.proc, "luo-emu")
        self.transport = EmulatorTransport(self.socket)
        self.backend = emulator_backend(self.socket)

    def status(self) -> dict[str, object]:
        return dict(json.loads(self.transport.control(EmuControl.STATUS)))

    def load(self, cmdline: str = "kho=on liveupdate=on", legacy: bool = False, kernel: Optional[Path] = None) -> None:
        """Loads ``kernel`` (default: a synthetic bzImage of the emulator's own LUO formats)."""
        if kernel is None:
            kernel = Path(self.socket).with_name("vmlinuz")
            if not kernel.exists():
                # Only here: tests.images needs zstandard and lz4, which the qemu tier's staged python lacks
                # (tests/qemu/run-contract.sh copies this file into its initrd).
                from tests.images import write_kernel  # noqa: PLC0415

                write_kernel(kernel)
        fd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
        try:
            payload = json.dumps({"cmdline": cmdline, "legacy": legacy}).encode()
            self.transport.control(EmuControl.LOAD_KERNEL, payload, [fd])
        finally:
            os.close(fd)

    def kexec(self, cold: bool = False) -> dict[str, object]:
        return dict(json.loads(self.transport.control(EmuControl.KEXEC, json.dumps({"cold": cold}).encode())))

    def live_update(self) -> dict[str, object]:
        """Loads a LUO-enabled kernel the right way and kexecs into it."""
        self.load()
        return self.kexec()

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=10)
        return err.decode()


TOP = Path(__file__).resolve().parent.parent
CGROUP_FS = Path("/sys/fs/cgroup/systemd")  # on hybrid hosts systemd tracks units here
NOBODY = 65534
# Put before luod's program: the soft RLIMIT_NOFILE systemd gives a service without LimitNOFILE= (1024),
# which luod raises.  Set in luod's own process, not around the spawn: the tests' process may hold more fds.
SOFT_NOFILE_1024 = "import resource as r; r.setrlimit(r.RLIMIT_NOFILE, (1024, r.getrlimit(r.RLIMIT_NOFILE)[1]))\n"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""


def rootfs_dbus_daemon(suite: str) -> Optional[list[str]]:
    """argv running the dbus-daemon of a cached Debian root file system here, through that root file
    system's own dynamic loader and libraries (no chroot: the bus's socket and luod's policy file stay
    where the tests put them); None if that root file system was not built.  trixie's and sid's dbus
    1.16 give ProcessFD in GetConnectionCredentials (dbus >= 1.15.8); the host's 1.14 does not."""
    root = Path(os.environ.get("LUO_CACHE", "/var/cache/luo-systemd"), "rootfs", suite)
    libs = root / "usr/lib/x86_64-linux-gnu"
    if not (root / "usr/bin/dbus-daemon").exists() or not (libs / "ld-linux-x86-64.so.2").exists():
        return None
    return [str(libs / "ld-linux-x86-64.so.2"), "--library-path", str(libs), str(root / "usr/bin/dbus-daemon")]


class DBusDaemon:
    """A dbus-daemon configured like the system bus (default deny), with luod's own policy file."""

    def __init__(self, directory: Path, daemon: Sequence[str] = ("dbus-daemon",)) -> None:
        # Like /run/dbus: reachable by unprivileged callers (pytest's tmp_path is not).
        self.run_dir = Path(tempfile.mkdtemp(prefix="luo-bus-"))
        self.run_dir.chmod(0o755)
        self.socket = self.run_dir / "system_bus_socket"
        config = directory / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=self.socket, policy=TOP / "units" / "io.liveupdate.Agent1.conf"))
        self.proc = subprocess.Popen(
            [*daemon, f"--config-file={config}", "--nofork", "--print-address"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()  # printed once it listens
        assert self.address.startswith("unix:"), self.address
        self.pidfds = self.gives_process_fd()

    def gives_process_fd(self) -> bool:
        """Whether this bus puts ProcessFD into GetConnectionCredentials (dbus-daemon 1.14 does not), asked
        for a connection of our own."""
        import asyncio  # noqa: PLC0415 - the qemu tier's initrd has this file but no dbus-next

        from dbus_next.aio.message_bus import MessageBus  # noqa: PLC0415

        from luo_systemd.dbus_service import driver_call  # noqa: PLC0415

        async def ask() -> bool:
            bus = await MessageBus(bus_address=self.address, negotiate_unix_fd=True).connect()
            try:
                reply = await bus.call(driver_call("GetConnectionCredentials", "s", [bus.unique_name]))
            finally:
                bus.disconnect()
            assert reply is not None
            for fd in reply.unix_fds:
                os.close(fd)
            return "ProcessFD" in reply.body[0]

        return asyncio.run(ask())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.run_dir, ignore_errors=True)


class UnitTree:
    """A cgroup subtree shaped like a service manager's: ROOT/app.slice/UNIT."""

    def __init__(self, name: str) -> None:
        self.root = f"/{name}"
        self.path = CGROUP_FS / name
        (self.path / "app.slice").mkdir(parents=True, exist_ok=True)

    def procs(self, unit: str) -> Path:
        group = self.path / "app.slice" / unit
        group.mkdir(exist_ok=True)
        return group / "cgroup.procs"

    @contextlib.contextmanager
    def spawning_into(self, unit: str) -> Iterator[None]:
        """This process in UNIT's cgroup while it spawns a child there, back in its own after: as a service
        manager starts a unit, with no shell in between (bench/run.py times luod's start)."""
        own = CGROUP_FS / cgroups.cgroup_path("self").lstrip("/") / "cgroup.procs"
        self.procs(unit).write_text(str(os.getpid()))
        try:
            yield
        finally:
            own.write_text(str(os.getpid()))

    def argv(self, unit: str, argv: list[str], uid: Optional[int] = None) -> list[str]:
        """argv that first moves itself into UNIT's cgroup (and drops to ``uid``), then execs."""
        drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
        return ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(self.procs(unit)), *drop, *argv]

    def cleanup(self) -> None:
        for group in sorted(self.path.rglob("*"), key=lambda p: -len(p.parts)):
            if group.is_dir():
                for pid in set((group / "cgroup.procs").read_text().split()) - {str(os.getpid())}:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for group in sorted([p for p in self.path.rglob("*") if p.is_dir()], key=lambda p: -len(p.parts)):
            try:
                group.rmdir()
            except OSError:
                pass
        try:
            self.path.rmdir()
        except OSError:
            pass


POLICY = "[X-LiveUpdate]\n"
PACKAGED_DIRS = "['/usr/lib/python3/dist-packages']"  # what units/luod.service puts on sys.path


def restore(broker: Broker) -> Optional[Manifest]:
    """A broker's whole restore at once, as luod's start-up and its early phase make it together."""
    manifest = broker.begin_restore()
    while broker.restoring:
        broker.restore_step()
    broker.finish_manifest()
    return manifest


def close_held(broker: Broker) -> None:
    """Closes every fd an in-process broker holds for its units, as luod's exit does for luod's: otherwise the
    test's process keeps a test's memfds and sessions open for the rest of the run."""
    fds = {broker.manifest_session.fd} if broker.manifest_session else set()
    for state in broker.units.values():
        fds.update(entry.held.fd for entry in (*state.stored.values(), *state.restored.values()))
        sessions = (*state.client_sessions.values(), *state.restored_client_sessions.values())
        fds.update(held.fd for held in (state.out_session, state.in_session, *sessions) if held is not None)
    for fd in fds:
        os.close(fd)
    broker.units.clear()


def python_path() -> str:
    """Where this test run's packages are, for child processes whose argv[0] hides the venv."""
    return ":".join([str(TOP / "src"), str(TOP), sysconfig.get_paths()["purelib"]])


def with_package_dirs(unit: str, dirs: Optional[list[str]] = None) -> str:
    """luod.service's text with ``dirs`` (this run's package directories) for the packages' (luod runs with
    -I -S: no PYTHONPATH, no venv).  The checkout's src/ last: the unit looks for the package there."""
    assert PACKAGED_DIRS in unit, "units/luod.service no longer names the packages' directories"
    return unit.replace(PACKAGED_DIRS, repr(python_path().split(":")[::-1] if dirs is None else dirs))


def luod_command(dirs: Optional[list[str]] = None) -> list[str]:
    """python3 and its arguments, as units/luod.service's ExecStart= runs them (argv[0] aside)."""
    text = with_package_dirs((TOP / "units" / "luod.service").read_text(), dirs)
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    _path, _argv0, *arguments = shlex.split(line.removeprefix("ExecStart="))
    return [sys.executable, *arguments]


F_DUPFD_QUERY = 1027  # Linux 6.10: fcntl(a, F_DUPFD_QUERY, b) is 1 when a and b are the same open file


def same_open_file(a: int, b: int) -> bool:
    """systemd's same_fd(): whether two fds are one open file description (a dup of each other).  Kernels
    before 6.10 cannot tell without kcmp(); there the sink keeps every fd (test_systemd_user has systemd's
    own fd store)."""
    try:
        return fcntl.fcntl(a, F_DUPFD_QUERY, b) == 1
    except OSError:
        return False


class NotifySink:
    """Receives luod's sd_notify messages (READY=1, STATUS=, FDSTORE=1 with fds): the part of a service
    manager the agent talks to when no real one runs.  Messages are kept; fds are closed, unless a
    ``fdstore`` is given: then it keeps them by FDNAME= and honours FDSTOREREMOVE=1, as systemd does, and
    like systemd (service_add_fd_store) it drops a pushed fd that is an open file it already keeps."""

    def __init__(self, path: Path, fdstore: Optional[dict[str, list[int]]] = None) -> None:
        self.path = path
        self.fdstore = fdstore
        if path.exists():
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []
        self.ready = threading.Event()
        self.on_bus = threading.Event()  # luod joins D-Bus after READY=1 and says so in STATUS=
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 4096, 253)
            except OSError:
                return
            if not data and not fds:  # shut down, and every queued message handled
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            if self.fdstore is not None and fields.get("FDSTORE") == "1":
                for fd in fds:
                    if not any(same_open_file(fd, kept) for named in self.fdstore.values() for kept in named):
                        self.fdstore.setdefault(fields["FDNAME"], []).append(os.dup(fd))
            if self.fdstore is not None and fields.get("FDSTOREREMOVE") == "1":
                for old in self.fdstore.pop(fields["FDNAME"], []):
                    os.close(old)
            for fd in fds:
                os.close(fd)
            self.messages.append(data.decode())
            if "READY=1" in data.decode().split("\n"):
                self.ready.set()
            if "on the bus as" in fields.get("STATUS", ""):
                self.on_bus.set()

    def close(self) -> None:
        """Ends after the messages already sent (a killed luod's last ones too) are handled."""
        self.sock.setblocking(False)
        self.sock.shutdown(socket.SHUT_RD)
        self.thread.join(5)
        self.sock.close()


LISTEN_FDS_LAUNCHER = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
high = [os.dup(fd) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)  # dup2 onto itself keeps the dup's close-on-exec
for fd in high:
    if fd >= 3 + len(fds):
        os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
os.execv(sys.argv[2], sys.argv[3:])
"""


class Agent:
    """A real luod process (in unit luod.service of a UnitTree) on the emulator and a private bus."""

    def __init__(self, directory: Path, emulator: Emulator, bus: Optional[DBusDaemon], tree: UnitTree) -> None:
        self.dir = directory
        self.emulator = emulator
        self.bus = bus
        self.tree = tree
        # The socket's directory must be reachable by unprivileged callers; pytest's tmp_path is not.
        self.run_dir = Path(tempfile.mkdtemp(prefix="luod-test-"))
        self.run_dir.chmod(0o755)
        self.varlink = str(self.run_dir / "liveupdate.sock")
        self.policy_dir = directory / "generator"
        self.env_dir = directory / "env"
        self.config = directory / "luod.toml"
        self.textfile = directory / "textfile" / "luo-systemd.prom"  # written once the directory exists
        self.config.write_text(
            textwrap.dedent(f"""\
            [agent]
            backend = "emulator"
            emulator_socket = "{emulator.socket}"
            varlink_socket = "{self.varlink}"
            policy_dir = "{self.policy_dir}"
            env_dir = "{self.env_dir}"
            metrics_file = "{self.textfile}"
            last_update_file = "{directory / "last-update.json"}"
            next_kernel_file = "{directory / "next-kernel.json"}"
            dbus = {"true" if bus else "false"}
            """)
        )
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.spawned_at = 0.0  # time.perf_counter() as the last start spawned luod
        self.log = directory / "luod.log"
        self.fdstore: Optional[dict[str, list[int]]] = None  # a dict: luod's fd store is kept and handed back
        self.env: dict[str, str] = {}  # extra environment for luod
        self.command = luod_command()  # what runs as luod, before --config

    def opt_in(self, unit: str, section: str = POLICY) -> None:
        d = self.policy_dir / f"{unit}.d"
        d.mkdir(parents=True, exist_ok=True)
        (d / "50-liveupdate.conf").write_text(section)

    def start(self, wait: bool = True) -> None:
        self.notify = NotifySink(self.dir / "notify.sock", self.fdstore)
        env = dict(os.environ, NOTIFY_SOCKET=str(self.notify.path), SYSTEMD_LOG_LEVEL="debug", **self.env)
        env.pop("INVOCATION_ID", None)
        if self.bus:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus.address
        # argv[0] '@luod', as luod.service sets it for systemd-shutdown's kill exemption.
        *python, program = self.command
        executable, argv = python[0], ["@luod", *python[1:], SOFT_NOFILE_1024 + program, "--config", str(self.config)]
        kept = [(k, fd) for k, named in sorted(self.fdstore.items()) for fd in named] if self.fdstore else []
        if kept:  # handed back as systemd does: fds 3.. with LISTEN_FDNAMES, LISTEN_PID of luod itself
            env["LISTEN_FDNAMES"] = ":".join(k for k, _ in kept)
            fds = ",".join(str(fd) for _, fd in kept)
            executable, argv = sys.executable, [sys.executable, "-c", LISTEN_FDS_LAUNCHER, fds, executable, *argv]
        with open(self.log, "ab") as log, self.tree.spawning_into("luod.service"):
            self.spawned_at = time.perf_counter()  # after the cgroup move: bench/run.py times luod from here
            self.proc = subprocess.Popen(
                argv, executable=executable, env=env, stdout=log, stderr=log, pass_fds=[fd for _, fd in kept]
            )
        if not wait:
            return
        if not self.notify.ready.wait(READY_TIMEOUT) or (self.bus and not self.notify.on_bus.wait(READY_TIMEOUT)):
            self.proc.kill()
            raise RuntimeError(f"luod did not become ready; log:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=READY_TIMEOUT)
            self.proc = None
            self.notify.close()

    def wait_dead(self) -> int:
        """luod ended by itself (a crash test's SIGKILL): its exit status."""
        assert self.proc is not None
        code = self.proc.wait(timeout=READY_TIMEOUT)
        self.proc = None
        self.notify.close()
        return code

    def cleanup(self) -> None:
        self.stop()
        self.lose_fdstore()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def lose_fdstore(self) -> None:
        """The machine went down, and luod's fd store with it: what it kept is closed (a kept one is empty)."""
        for named in (self.fdstore or {}).values():
            for fd in named:
                os.close(fd)
        if self.fdstore is not None:
            self.fdstore = {}

    def call(
        self,
        method: str,
        params: Optional[dict[str, Any]] = None,
        fds: list[int] = (),  # type: ignore[assignment]
    ) -> tuple[dict[str, Any], list[int]]:
        with varlink.Client(self.varlink, timeout=10) as client:
            return client.call(method, params, fds)

    def run_as(self, unit: str, code: str, uid: Optional[int] = None) -> subprocess.CompletedProcess[str]:
        """Runs Python ``code`` in a process of ``unit`` (as ``uid``); ``sock`` is luod's Varlink path."""
        prologue = f"import os, json\nfrom luo_systemd import varlink, errors\nsock = {self.varlink!r}\n"
        argv = self.tree.argv(unit, [sys.executable, "-c", prologue + textwrap.dedent(code)], uid=uid)
        env = dict(os.environ, PYTHONPATH=python_path())
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)


class NodeExporter:
    """Debian's prometheus-node-exporter with only the textfile collector, on 127.0.0.1 and a free port."""

    # unpacked from Debian's package by scripts/bootstrap.sh --test
    BINARY = Path(
        os.environ.get("LUO_CACHE", "/var/cache/luo-systemd"), "node-exporter/usr/bin/prometheus-node-exporter"
    )

    def __init__(self, textfile_dir: Path) -> None:
        with socket.socket() as s:  # a free port; node_exporter binds it a moment later
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(self.BINARY),
                f"--web.listen-address={self.address}",
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={textfile_dir}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"node_exporter did not listen on {self.address}: {self.stop()}") from None
                time.sleep(0.1)

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=10) as reply:
            return str(reply.read().decode())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err.decode(errors="replace")
