"""luod: the live-update agent.  Wires configuration, the LUO backend, the broker and the two interfaces.

Start-up order matters: first the fds the service manager kept for us (a restart after a crash), else the
sessions the previous kernel carried (the first start after a live update); only then is the Varlink
interface opened and READY=1 sent.  Varlink calls are answered from then on, while a thread loads asyncio
(``serve_while_loading``); D-Bus joins later: no opted-in unit waits for the event loop or the bus.
See luod(8).
"""

from __future__ import annotations

import _socket
import itertools
import os
import resource
import stat
import sys

from luo_systemd import cgroups, config, journal, names, service_manager
from luo_systemd.api import Problem, wire
from luo_systemd.broker import Broker, BrokerConfig
from luo_systemd.errors import LuoError
from luo_systemd.journal import log
from luo_systemd.liveupdate import Backend, emulator_backend, kernel_backend
from luo_systemd.policy import DROPIN, Policy, parse_policy
from luo_systemd.state import NoFdStore

# Everything up to READY=1 keeps to modules that load fast (tests/test_imports.py checks the list):
# after a live update every restored unit waits for luod's first answers.  What only serves afterwards is
# imported there.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Sequence
    from typing import Callable, Optional

    from luo_systemd.dbus_service import AgentBus
    from luo_systemd.kexec import Loader
    from luo_systemd.kexec_watch import KexecWatcher
    from luo_systemd.manifest import Manifest
    from luo_systemd.state import FdStore
    from luo_systemd.varlink_service import Connection, VarlinkService

VARLINK_FDNAME = "varlink"  # FileDescriptorName= of luod.socket
METRICS_COALESCE_SEC = 0.5
BUS_RETRY_SEC = 1.0
BUS_WAIT_SEC = 300
SCM_MAX_FD = 253  # the kernel's limit of fds in one message


class SystemdFdStore:
    """Our own fd store: fds are pushed with FDSTORE=1, FDNAME=key and FDPOLL=0 (session fds of the
    emulator are sockets that may report POLLHUP; systemd would drop them), at most SCM_MAX_FD to a message
    (systemd takes up to 768).  One socket to $NOTIFY_SOCKET serves luod's life: ``service_manager.send``,
    like sd_notify(), makes one per message, and a restore pushes a message per unit."""

    def __init__(self) -> None:
        self.sock: Optional[_socket.socket] = None  # connected at the first message, and anew after a failure

    def keep(self, key: str, *fds: int) -> None:
        for i in range(0, len(fds), SCM_MAX_FD):
            if not self._send(f"FDSTORE=1\nFDNAME={key}\nFDPOLL=0", fds[i : i + SCM_MAX_FD]):
                log.warning("Could not keep %s in the fd store: an agent crash would lose it", key)

    def drop(self, key: str) -> None:
        self._send(f"FDSTOREREMOVE=1\nFDNAME={key}", [])

    def _send(self, message: str, fds: Sequence[int]) -> bool:
        for _ in range(2):  # the second time on a new socket: the manager's may be a new one (re-executed)
            try:
                if self.sock is None:
                    self.sock = service_manager.notify_socket()
                service_manager.send_fds(self.sock, message.encode(), fds)
                return True
            except OSError:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
        return False


def policy_reader(policy_dir: str) -> Callable[[str], Optional[Policy]]:
    """Reads a unit's [X-LiveUpdate] as the generator normalized it (a template's applies to instances).
    The broker asks for every unit it carries whenever it writes the manifest: a file is parsed again only
    when its stat changed (the generator rewrites it on daemon-reload)."""
    parsed: dict[str, tuple[tuple[int, int, int], Optional[Policy], bool]] = {}  # path -> stamp, policy, valid

    def read(path: str) -> tuple[Optional[Policy], bool]:
        st = os.stat(path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = parsed.get(path)
        if cached is None or cached[0] != stamp:
            try:
                with open(path) as f:
                    cached = (stamp, parse_policy([f.read()]), True)
            except LuoError as e:
                log.error("Ignoring %s: %s", path, e)
                cached = (stamp, None, False)
            parsed[path] = cached
        return cached[1], cached[2]

    def policy_of(unit: str) -> Optional[Policy]:
        for name in (unit, names.template_of(unit)):
            if name is None:
                continue
            path = os.path.join(policy_dir, name + ".d", DROPIN)
            try:
                policy, valid = read(path)
            except FileNotFoundError:
                parsed.pop(path, None)
                continue
            if valid:
                return policy
        return None

    return policy_of


def opted_in_units(policy_dir: str, policy_of: Callable[[str], Optional[Policy]]) -> int:
    """Units the generator found an [X-LiveUpdate] section in.  Templates (``luo-qemu@.service``) are not
    units: their instances cannot be listed without asking systemd, which luod does not do for metrics."""
    try:
        dirs = os.listdir(policy_dir)
    except FileNotFoundError:
        return 0
    return sum(1 for d in dirs if d.endswith(".d") and "@." not in d and policy_of(d[:-2]) is not None)


def make_backend(cfg: config.Config) -> Backend:
    return emulator_backend(cfg.emulator_socket) if cfg.backend == "emulator" else kernel_backend()


def kill_exemption_check() -> list[Problem]:
    """The agent must outlive systemd-shutdown's kill: argv[0] '@…' (any systemd) or SurviveFinalKillSignal=."""
    with open("/proc/self/cmdline", "rb") as f:
        argv0 = f.read().split(b"\0", 1)[0]
    if argv0.startswith(b"@") or os.environ.get("LUOD_SURVIVES_FINAL_KILL") == "1":
        return []
    return [
        Problem(
            "luod.service",
            "the agent is not exempt from the shutdown kill: its sessions would be "
            "closed before the kexec (is luo-systemd-generator installed?)",
        )
    ]


MAX_INHIBITORS = 256
MAX_REASON = 512


def inhibitor_check(directory: str) -> Callable[[], list[Problem]]:
    """Units that cannot be live-updated right now say why in DIRECTORY/UNIT (luo-qemu with a QEMU that has
    no cpr-reboot): the pre-flight refuses with their reason, before anything stops."""

    def check() -> list[Problem]:
        try:
            units = sorted(n for n in os.listdir(directory) if names.is_unit_name(n))[:MAX_INHIBITORS]
        except FileNotFoundError:
            return []
        except OSError as e:
            return [Problem("", f"cannot read the inhibitors in {directory}: {e.strerror}")]
        problems = []
        for unit in units:
            try:
                fd = os.open(os.path.join(directory, unit), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue  # removed meanwhile: the unit can be live-updated again
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue  # only root writes here; still, a FIFO or a device is not a reason
                reason = os.read(fd, MAX_REASON).decode(errors="replace").strip()
            except OSError:
                continue
            finally:
                os.close(fd)
            problems.append(Problem(unit, reason or "cannot be live-updated right now"))
        return problems

    return check


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one (systemd's default soft limit is 1024): luod holds every
    unit's fds, and nothing here uses select()."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start(cfg: config.Config) -> tuple[Broker, int, Optional[Manifest]]:
    """Everything up to READY=1, without the event loop: the recovery, or the restore up to the memfds
    (Broker.begin_restore, whose manifest is returned), and the Varlink socket listening, as an fd (callers
    queue in its backlog until ``serve_while_loading`` answers them)."""
    raise_fd_limit()
    fds = service_manager.listen_fds()
    store: FdStore = SystemdFdStore() if os.environ.get("NOTIFY_SOCKET") else NoFdStore()
    if isinstance(store, NoFdStore):
        log.warning("Not running under a service manager: an agent crash would lose every stored fd")
    backend = make_backend(cfg)
    broker = Broker(
        backend,
        policy_reader(cfg.policy_dir),
        store,
        BrokerConfig(max_fds_total=cfg.max_fds_total, busy_retries=cfg.busy_retries, env_dir=cfg.env_dir),
    )
    kept = {key: fdl for key, fdl in fds.items() if key.startswith("luod-")}
    manifest = None
    if not broker.recover(kept):  # no fd store handed back: a fresh start, perhaps after a live update
        try:
            manifest = broker.begin_restore()  # the memfds follow after READY=1 (serve_while_loading)
        except LuoError as e:
            log.warning("Nothing restored: %s", e)
    return broker, activated_or_bound(fds.get(VARLINK_FDNAME), cfg.varlink_socket), manifest


def record_last_update(cfg: config.Config, manifest: Manifest) -> None:
    """What the manifest carried, for ``liveupdatectl verify``: at the restore's last step (``Broker.at_end``),
    once the units' fds are back (no Retrieve waits for it, every Finish does), and before the manifest's
    session is finished, so that an agent that crashes before it is written restores again and writes it."""
    from luo_systemd.runfiles import last_update_of, write_last_update  # noqa: PLC0415 - after live updates only

    try:
        write_last_update(cfg.last_update_file, last_update_of(manifest))
    except OSError as e:  # the restore goes on: only verify's record of it is missing
        log.warning("Could not record live update %d for liveupdatectl verify: %s", manifest.update_count, e)


def preflight(cfg: config.Config, broker: Broker) -> Loader:
    """The kexec loader and the pre-flight checks, after READY=1: nothing before it runs a pre-flight, and
    reading kernel formats (decompressors included) costs the start-up every opted-in unit waits for."""
    from luo_systemd.kexec import loader_for  # noqa: PLC0415
    from luo_systemd.kexec_preflight import loaded_kernel_check, memory_check  # noqa: PLC0415

    loader = loader_for(cfg)
    broker.extra_checks = (
        kill_exemption_check,
        loaded_kernel_check(loader),
        inhibitor_check(cfg.inhibit_dir),
        memory_check(broker.carried_memfds, cfg.memory_margin_mib),
    )
    return loader


async def serve(
    cfg: config.Config, broker: Broker, loader: Loader, varlink: VarlinkService, adopted: list[Connection]
) -> int:
    import asyncio  # noqa: PLC0415 - after READY=1 (see main)
    import signal  # noqa: PLC0415

    from luo_systemd.kexec_watch import KexecWatcher  # noqa: PLC0415 - imports asyncio

    tasks: list[asyncio.Task[object]] = []
    watcher = KexecWatcher(broker, loader, cfg.systemctl)
    varlink.before_preserve = watcher.before_preserve
    tasks.append(asyncio.ensure_future(varlink.serve(adopted)))

    stop = asyncio.Event()
    failed: list[BaseException] = []

    def task_ended(task: asyncio.Task[object]) -> None:
        # A service that stops serving must not leave luod "running": fail, so systemd restarts it.
        if not task.cancelled():
            failed.append(task.exception() or RuntimeError("the Varlink service ended"))
            log.critical("A luod task ended: %s; exiting so that the service manager restarts luod", failed[-1])
            stop.set()

    for task in tasks:
        task.add_done_callback(task_ended)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # Deadlines appear only at the restore (or the recovery), before this: a change can only remove one,
    # and a timer that finds nothing expired sets the next.  Not rescheduled at every change: that scanned
    # every restored unit at every Finish.
    def schedule_expiry() -> None:
        wait = broker.next_expiry()
        if wait is not None:
            loop.call_later(wait + 0.5, on_expiry)

    def on_expiry() -> None:
        broker.expire_orphans()
        schedule_expiry()

    schedule_expiry()
    if cfg.metrics_file:
        metrics_changed = asyncio.Event()
        broker.listeners.append(metrics_changed.set)
        tasks.append(asyncio.ensure_future(keep_metrics(broker, loader, cfg, metrics_changed)))
    # The bus joins after READY=1: units ordered After=luod.service wait for READY, and they talk Varlink.
    # A D-Bus caller meanwhile waits in dbus-daemon (io.liveupdate.Agent1.service activates luod.service).
    if cfg.dbus:
        joining = asyncio.ensure_future(on_bus(cfg, broker, loader, varlink.cgroup_root, watcher, tasks))
        joining.add_done_callback(bus_ended)
        tasks.append(joining)
    await stop.wait()
    # Our fds live on in the fd store; a restart picks them up.
    service_manager.send("STOPPING=1")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)  # each leaves what it joined (the bus)
    return 1 if failed else 0


async def on_bus(
    cfg: config.Config,
    broker: Broker,
    loader: Loader,
    cgroup_root: str,
    watcher: KexecWatcher,
    tasks: list[asyncio.Task[object]],
) -> None:
    """luod on the system bus, as soon as the bus answers, until cancelled or the bus goes away.  luod is not
    ordered after dbus.socket (which comes only after sysinit.target): after a live update every restored unit
    waits for luod's answer, and luod must not wait for the bus; so the bus may not be listening yet.  It is
    tried again every BUS_RETRY_SEC for BUS_WAIT_SEC: the bus is a second door (hooks and units use Varlink),
    and it may be gone for good -- dbus.service stops in the very shutdown that a live update is.  A failure
    here never ends luod: its exit would drop every session before the kexec."""
    import asyncio  # noqa: PLC0415 - after READY=1 (see main)
    import concurrent.futures  # noqa: PLC0415 - asyncio's own import
    import functools  # noqa: PLC0415 - asyncio's own import

    # At the lowest priority, in a thread of its own: on a busy boot it does not take the CPU from the
    # restored units starting meanwhile (in the sid qemu tier, the demo's start took 7 s instead of 3), nor
    # the event loop from their calls (dbus_next alone is ~20 ms).
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(1) as importer:
        await loop.run_in_executor(importer, import_dbus_service)
    from dbus_next.errors import AuthError, DBusError  # noqa: PLC0415 - loaded by now

    from luo_systemd.dbus_service import BUS_NAME  # noqa: PLC0415

    deadline = loop.time() + BUS_WAIT_SEC
    for attempt in itertools.count():
        try:
            bus = await join_bus(broker, cgroup_root, watcher)
            break
        except (OSError, EOFError, AuthError, DBusError) as e:
            reason = e or type(e).__name__
            if not attempt:
                log.warning("Not on the system bus (%s): serving Varlink only until it answers", reason)
            if loop.time() >= deadline:
                log.warning("Not on the system bus after %d s (%s): serving Varlink only", BUS_WAIT_SEC, reason)
                return
            await asyncio.sleep(BUS_RETRY_SEC)
    if attempt:
        log.info("On the system bus")
    try:
        if cfg.block_shutdown:
            from luo_systemd.dbus_client import inhibit_shutdown  # noqa: PLC0415
            from luo_systemd.inhibitor import ShutdownBlock, keep_blocking  # noqa: PLC0415 - imports asyncio

            block = ShutdownBlock(functools.partial(inhibit_shutdown, bus, "luod"))
            changed = asyncio.Event()
            broker.listeners.append(changed.set)
            tasks.append(asyncio.ensure_future(keep_blocking(broker, loader, block, changed)))
        service_manager.send(
            f"STATUS=Phase {broker.phase.value}, {len(broker.units)} unit(s), on the bus as {BUS_NAME}"
        )
        try:
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        except Exception as e:  # the bus went away: dbus.service stops in the shutdown a live update is
            log.info("Left the system bus: %s", e)
    finally:
        bus.disconnect()  # type: ignore[no-untyped-call]


def bus_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("Left the system bus after an unexpected error: %r", task.exception())


async def join_bus(broker: Broker, cgroup_root: str, watcher: KexecWatcher) -> AgentBus:
    """luod's D-Bus service on the system bus; raises what connecting raises (nothing is left open then)."""
    from luo_systemd.dbus_service import (  # noqa: PLC0415
        BUS_NAME,
        OBJECT_PATH,
        Agent1,
        AgentBus,
        install_fd_guard,
        watch_peers,
    )

    bus = AgentBus()  # connects its socket here
    try:
        await bus.connect()
        agent = Agent1(bus, broker, cgroup_root, watcher.before_preserve)
        install_fd_guard(bus, agent)
        await watch_peers(bus)
        bus.export(OBJECT_PATH, agent)
        await bus.request_name(BUS_NAME)
    except BaseException:
        bus.disconnect()  # type: ignore[no-untyped-call]
        raise
    return bus


def lowest_priority() -> None:
    """The calling thread at nice 19 (Linux: setpriority sets the calling thread's nice value, not the
    process's).  Not contextlib.suppress: contextlib imports collections and functools."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except OSError:
        pass  # a lower priority only helps


def import_dbus_service() -> None:
    lowest_priority()
    import luo_systemd.dbus_service  # noqa: F401, PLC0415


def serve_while_loading(varlink: VarlinkService) -> list[Connection]:
    """Answers Varlink calls and ends the restore (``VarlinkService.serve_early``), and once the restore has
    ended imports what the event loop needs (``import_event_loop``) in a thread, between the calls; the
    connections still open are returned for ``serve``.  Running beside the calls, the thread took the GIL back
    at each of their system calls and a CPU from the callers: 10 restored units' Retrieve and Finish, one
    after another, took 80 ms; between them, 28 (medians of 7, bench/run.py's bed of 100 fds, 2 CPUs)."""
    import _thread  # noqa: PLC0415 - threading's C half: nothing else to load on the way to the first answer

    loaded, wake = os.pipe2(os.O_CLOEXEC)
    failed: list[BaseException] = []
    answering = _thread.allocate_lock()

    def between_calls() -> None:
        with answering:
            pass

    def load() -> None:
        # At the lowest priority, like the D-Bus import: on a busy boot the restored units starting meanwhile
        # come first (sid qemu tier, one vCPU, under other work: blackout luod/native 1.23 / 1.18 / 1.18 at
        # nice 0, 1.13 / 1.08 / 1.11 at nice 19).
        lowest_priority()
        try:
            import_event_loop(between_calls)
        except BaseException as e:
            failed.append(e)
        finally:
            os.write(wake, b"\0")

    try:
        adopted = varlink.serve_early(loaded, lambda: _thread.start_new_thread(load, ()), answering)
    finally:
        os.close(loaded)
    os.close(wake)
    if failed:
        raise failed[0]
    return adopted


# What ``serve`` and ``preflight`` need: asyncio (~4 bare interpreter starts here, with logging and inspect),
# the pre-flight's loader (kernel formats, decompressors) and ctypes (a Store's memfd check,
# luo_systemd.syscalls).  Imported one at a time, each after what it imports first, so that a call waits for
# at most one of them.
EVENT_LOOP_MODULES = (
    "collections",
    "enum",
    "re",
    "traceback",
    "threading",
    "logging",
    "concurrent.futures",
    "socket",
    "subprocess",
    "inspect",
    "typing",
    "asyncio",
    "ctypes",
    "signal",
    "luo_systemd.kernel_format",
    "luo_systemd.kexec",
    "luo_systemd.kexec_preflight",
    "luo_systemd.kexec_watch",
)


def import_event_loop(between: Callable[[], object]) -> None:
    """``EVENT_LOOP_MODULES``, calling ``between`` before each.  asyncio without ssl: luod speaks over unix
    sockets only, and ssl (OpenSSL) is a quarter of asyncio's import time and 4 MiB of luod's memory."""
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type] # None: an import raises ImportError
    for name in EVENT_LOOP_MODULES:
        between()
        __import__(name)


async def keep_metrics(broker: Broker, loader: Loader, cfg: config.Config, changed: asyncio.Event) -> None:
    """Rewrites the metrics textfile at every change of luod's state, and every RECHECK_SEC for what luod is
    not told about (memory, a kernel loaded or unloaded).  It never opens /dev/liveupdate (Broker.summary)."""
    import asyncio  # noqa: PLC0415 - after READY=1 (see main)

    from luo_systemd import metrics  # noqa: PLC0415
    from luo_systemd.inhibitor import recheck, until_change_or_recheck  # noqa: PLC0415 - imports asyncio
    from luo_systemd.runfiles import read_last_update  # noqa: PLC0415

    writer = metrics.TextfileWriter(cfg.metrics_file)
    policy_of = policy_reader(cfg.policy_dir)
    loaded, problems = False, None
    while True:
        changed.clear()
        if not os.path.isdir(os.path.dirname(cfg.metrics_file)):  # no textfile collector here: no work at all
            await asyncio.sleep(METRICS_COALESCE_SEC)  # nor a wake-up per change in a burst of them
            await until_change_or_recheck(changed)
            continue
        status = wire(broker.summary())  # the Status method's wire form, which verify reads
        last = read_last_update(cfg.last_update_file)
        writer.note_finished(status, last)
        if not broker.armed:  # armed, the units are stopping: keep the blackout free of extra work
            try:
                loaded, found = await recheck(broker, loader)
                problems = len(found)
            except (LuoError, OSError) as e:
                log.debug("Pre-flight for the metrics failed: %s", e)
                problems = None
        carried: dict[str, int] = {}
        for unit, fd in broker.carried_memfds():
            carried[unit] = carried.get(unit, 0) + os.fstat(fd).st_size
        opted_in = opted_in_units(cfg.policy_dir, policy_of)
        sample = metrics.Sample(status, opted_in, carried, last, writer.finished_usec, loaded, problems)
        try:
            writer.write(metrics.render(sample))
        except OSError as e:
            log.warning("Failed to write %s: %s", cfg.metrics_file, e)
        # A sample looks at every unit: a burst of changes (a Preserve per stopping unit) makes one.
        await asyncio.sleep(METRICS_COALESCE_SEC)
        await until_change_or_recheck(changed)


def activated_or_bound(fds: Optional[list[int]], path: str) -> int:
    """The listening Varlink socket's fd: luod.socket's, else bound here.  ``_socket``, the C half of socket:
    socket imports enum and selectors, which only serve after READY=1."""
    if fds:
        return fds[0]
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.bind(path)
    os.chmod(path, 0o666)  # open to local callers: every method authorizes its caller itself
    sock.listen(128)
    return sock.detach()


def config_arguments(argv: list[str]) -> Optional[list[str]]:
    """The --config files of luod's command line (None: the standard ones).  luod.service passes no
    arguments; ``--config FILE`` pairs (tests, a luod run by hand) are taken as they are.  argparse (with
    shutil, gettext, bz2 and lzma, which it imports) costs luod's start, which every opted-in unit waits for,
    about as much as the interpreter's own start-up: it sees anything else (--help, --config=FILE, a mistake)."""
    if not argv:
        return None
    options, values = argv[0::2], argv[1::2]
    if len(options) == len(values) and set(options) == {"--config"} and not any(v.startswith("-") for v in values):
        return values
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="luod", description="The live-update agent (see luod(8)).")
    parser.add_argument("--config", action="append", help="read this file instead of the standard ones")
    files: Optional[list[str]] = parser.parse_args(argv).config
    return files


def main(argv: Optional[list[str]] = None) -> int:
    files = config_arguments(sys.argv[1:] if argv is None else argv)
    journal.setup("luod")
    try:
        cfg = config.load(files or config.config_files())
    except LuoError as e:
        log.error("Bad configuration: %s", e)
        return 1
    try:
        broker, listener_fd, manifest = start(cfg)
    except LuoError as e:
        log.error("%s", e)
        return 1
    # READY=1 before asyncio and D-Bus are imported: every opted-in unit waits for it after a kexec, and
    # then for the answer to its first call, which comes before asyncio has loaded too (serve_while_loading).
    backend = broker.backend.kind
    service_manager.send(f"READY=1\nSTATUS=Phase {broker.phase.value}, {len(broker.units)} unit(s), backend {backend}")
    log.info("luod ready (backend %s, phase %s)", backend, broker.phase.value)
    if manifest is not None:
        log.info("Live update %d: restoring %d unit(s)", manifest.update_count, len(manifest.units))
        broker.at_end = lambda: record_last_update(cfg, manifest)
    from luo_systemd.varlink_service import VarlinkService  # noqa: PLC0415 - after READY=1

    varlink = VarlinkService(
        broker, cgroups.manager_root(cgroups.cgroup_path("self")), _socket.socket(fileno=listener_fd)
    )
    try:
        adopted = serve_while_loading(varlink)
        import asyncio  # noqa: PLC0415 - loaded by now

        journal.route_logging()  # asyncio's records (and dbus-next's)
        return asyncio.run(serve(cfg, broker, preflight(cfg, broker), varlink, adopted))
    except LuoError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
