"""luo-qemu start|stop UNIT: a QEMU virtual machine as a systemd service that keeps running across a kernel
live update.  The ExecStart= and ExecStop= of ``luo-qemu@.service``; see luo-qemu(8).

Guest RAM lives in a memfd that QEMU maps (memory-backend-file on /proc/self/fd/N, share=on) and that luod
holds under the name ``guest-ram``; device state goes to a second memfd, ``vm-state``; a third, ``vm-args``,
holds what QEMU's command line is made of (from the configuration), so that the resumed QEMU gets the same one.

- start, cold: new memfds, stored in luod, QEMU started on them; if this QEMU cannot save itself for a live
  update (no cpr-reboot), an inhibitor makes luod's pre-flight refuse, before anything stops.
- stop for a live update (luod armed, or a kexec job queued): QEMU saves its device state into ``vm-state``
  in cpr-reboot mode with x-ignore-shared, which leaves the guest RAM where it is, then quits; luo-hook stop
  (the next ExecStop=) preserves the memfds.  If QEMU copied the guest RAM into the state after all, that
  is not a live update: the memfds are given up and the guest will boot afresh.
- start after the kexec (the blackout): the launcher retrieves the memfds from luod itself (the unit has
  ``Restore=early``: no luo-hook process runs before it, and it starts while luod restores, not after luod's
  READY=1), starts QEMU on the same RAM with the same arguments and ``-incoming defer``, and loads the state;
  the guest carries on.  This path imports only what it uses (no tomllib, re, json, subprocess or typing:
  they cost more than the rest of it), talks QMP on a socket connected before QEMU starts, with every
  command sent ahead, and waits for events, not by polling.
- an ordinary stop: ACPI power-down (system_powerdown), ``quit`` after the configured time; the memfds are
  removed from luod, so the next start boots the guest afresh.

The launcher does not stay: READY=1 comes with MAINPID= of QEMU once the guest runs, and QEMU is the service.
"""

from __future__ import annotations

import _socket as socket
import os
import sys
import time

from luo_systemd import varlink
from luo_systemd.errors import InvalidRequest, LuoError, VmmFailed
from luo_systemd.qmp import Qmp
from luo_systemd.service_manager import notify

TYPE_CHECKING = False  # typing costs the restore ~10 ms
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Optional

    from luo_systemd.vmconfig import VmConfig

RUNTIME_DIR = "/run/luo-qemu"  # RuntimeDirectory=luo-qemu/%i: the QMP socket
STATE_DIR = "/var/lib/luo-qemu"  # StateDirectory=luo-qemu: the figures of the last live update
RAM = "guest-ram"
STATE = "vm-state"
ARGS = "vm-args"
SAVE_FDSET = 1  # -add-fd set of the (write-only) state memfd that QEMU saves into
LOAD_FDSET = 2  # -add-fd set of the (read-only) restored state memfd that QEMU loads from
UNIT_PREFIX, UNIT_SUFFIX = "luo-qemu@", ".service"
INSTANCE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-"
MAX_ARGS_BYTES = 1 << 20  # a restored vm-args larger than this is not ours
SAVE_TIMEOUT_SEC = 60.0
START_TIMEOUT_SEC = 60.0
# The cpr-reboot save and load: device state only; RAM in a shared file mapping is left where it is.
IGNORE_SHARED = {"capability": "x-ignore-shared", "state": True}
MIGRATION_EVENTS = {"capability": "events", "state": True}
# The restore's QMP commands, sent at once before QEMU has even started: its monitor reads them right after
# its greeting, so the load starts as soon as QEMU can.
LOAD = (
    ("migrate-set-capabilities", {"capabilities": [IGNORE_SHARED]}),
    ("migrate-set-parameters", {"mode": "cpr-reboot"}),
    ("migrate-incoming", {"uri": f"file:/dev/fdset/{LOAD_FDSET}"}),
)


class Launch:
    """What QEMU's command line is made of, besides fds: the same on both sides of a live update.  Travels
    in the ``vm-args`` memfd as NUL-separated fields (a plain class: this is on the restore path)."""

    __slots__ = ("args", "machine", "memory_mib", "name", "qemu")

    def __init__(self, name: str, qemu: str, machine: str, memory_mib: int, args: tuple[str, ...]) -> None:
        self.name, self.qemu, self.machine, self.memory_mib, self.args = name, qemu, machine, memory_mib, args

    @classmethod
    def of(cls, cfg: VmConfig) -> Launch:
        return cls(cfg.name, cfg.qemu, cfg.machine, cfg.memory_mib, cfg.args)

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib << 20

    def encode(self) -> bytes:
        return "\0".join((self.qemu, self.machine, str(self.memory_mib), *self.args)).encode()

    @classmethod
    def decode(cls, name: str, data: bytes) -> Launch:
        fields = data.decode(errors="replace").split("\0")
        if len(fields) < 3 or not fields[2].isdigit() or not fields[0].startswith("/"):
            raise VmmFailed(f"the restored {ARGS} of {name} is not a QEMU command line of luo-qemu's")
        return cls(name, fields[0], fields[1], int(fields[2]), tuple(fields[3:]))


def instance_of(unit: str) -> str:
    name = unit[len(UNIT_PREFIX) : -len(UNIT_SUFFIX)] if unit.startswith(UNIT_PREFIX) else ""
    if not unit.endswith(UNIT_SUFFIX) or not name or name.strip(INSTANCE_CHARS):
        raise InvalidRequest(f"{unit!r} is not an instance of luo-qemu@.service")
    return name


def qemu_argv(launch: Launch, ram_fd: int, save_fd: int, load_fd: Optional[int], qmp_fd: int) -> list[str]:
    """QEMU's command line: the same on both sides of a live update, plus -incoming on the restoring side."""
    size = f"{launch.memory_mib}M"
    argv = [
        launch.qemu,
        "-name",
        launch.name,
        "-machine",
        f"{launch.machine},memory-backend=ram0",
        "-m",
        size,
        # Only a shared file mapping is left in place by x-ignore-shared: memory-backend-ram, share=off or
        # QEMU's own memory-backend-memfd would be copied whole into the state.  mem-path must be a path
        # QEMU can open(): /dev/fdset/N does not work here.
        "-object",
        f"memory-backend-file,id=ram0,size={size},mem-path=/proc/self/fd/{ram_fd},share=on",
        # An fdset wants the access mode QEMU opens with: write-only for the save, read-only for the load.
        "-add-fd",
        f"fd={save_fd},set={SAVE_FDSET},opaque={STATE}",
        # QMP on a listening socket the launcher made (and connected to) before QEMU started.
        "-chardev",
        f"socket,id=luo-qmp,fd={qmp_fd},server=on,wait=off",
        "-qmp",
        "chardev:luo-qmp",
        *launch.args,
    ]
    if load_fd is not None:
        argv += ["-add-fd", f"fd={load_fd},set={LOAD_FDSET},opaque=restored-{STATE}", "-incoming", "defer"]
    return argv


def ram_was_copied(migrate_info: dict[str, Any], memory_bytes: int) -> bool:
    """Whether QEMU put the guest RAM into the state instead of leaving it in place: then the state is as
    large as the RAM, and this is no live update (cpr-reboot does not refuse unshared RAM by itself)."""
    return int(migrate_info.get("ram", {}).get("total", 0)) >= memory_bytes


def resumable(memory_bytes: int, ram_bytes: int, state_bytes: int) -> bool:
    """Whether the memfds a live update brought back resume the guest; False for a fresh boot (the stop did
    not save: QEMU was gone, or could not); VmmFailed when they must not be used, nor booted over."""
    if state_bytes == 0:
        return False
    if ram_bytes < memory_bytes:
        raise VmmFailed(f"the restored guest RAM is smaller than memory_mib={memory_bytes >> 20}: not resuming")
    if state_bytes >= memory_bytes:
        raise VmmFailed(f"the saved state ({state_bytes} bytes) holds a copy of the guest RAM: not a live update")
    return True


def cpr_support(params: dict[str, Any], version: dict[str, Any]) -> str:
    """Why this QEMU cannot save a guest for a live update ("" if it can), from query-migrate-parameters."""
    if "mode" in params:  # the migration mode parameter came with cpr-reboot (QEMU 8.2)
        return ""
    q = version.get("qemu", {})
    return (
        f"QEMU {q.get('major')}.{q.get('minor')}.{q.get('micro')} cannot keep the guest across a live update "
        "(it has no cpr-reboot migration mode; QEMU 8.2 or newer has): the VM would be rebooted"
    )


# -- I/O


def log(message: str, priority: int = 6) -> None:
    print(f"<{priority}>luo-qemu: {message}", file=sys.stderr, flush=True)


def luod_socket() -> str:
    return os.environ.get("LUOD_SOCKET", "/run/luod/liveupdate.sock")


def inhibitor_path(unit: str) -> str:
    from luo_systemd import config  # noqa: PLC0415 - not on the restore path

    return os.path.join(config.load(config.config_files()).inhibit_dir, unit)


def set_inhibitor(unit: str, reason: str) -> None:
    path = inhibitor_path(unit)
    if not reason:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(reason + "\n")
    os.replace(path + ".tmp", path)


def qmp_path(name: str) -> str:
    return os.path.join(RUNTIME_DIR, name, "qmp.sock")


def record(name: str, key: str, figures: dict[str, Any]) -> None:
    """The last live update's figures, in /var/lib/luo-qemu/NAME.json (the save's survive the kexec)."""
    path = os.path.join(STATE_DIR, name + ".json")
    try:
        with open(path, "rb") as f:
            doc = varlink.loads(f.read())
    except (OSError, ValueError):
        doc = {}
    doc[key] = figures
    if key == "save":
        doc.pop("restore", None)
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(varlink.dumps(doc))
    os.replace(path + ".tmp", path)


def new_memfd(name: str, content: bytes | int) -> int:
    """A memfd of ``content``: bytes, or a size (zeros)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if isinstance(content, int):
        os.ftruncate(fd, content)
    else:
        os.write(fd, content)
    return fd


def read_all(fd: int, limit: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > limit:
        raise VmmFailed(f"{size} bytes where at most {limit} are expected")
    return os.pread(fd, size, 0)


def reopen(fd: int, flags: int) -> int:
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def close_all(fds: Sequence[int]) -> None:
    varlink.close_all([fd for fd in fds if fd >= 0])  # -1: no fd


def qmp_listener(path: str) -> tuple[socket.socket, socket.socket]:
    """QEMU's QMP socket, listening at ``path``, and the launcher's connection to it: made before QEMU
    starts, so that the launcher neither polls for the socket nor waits for it to appear."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(4)
        client.connect(path)  # waits in the backlog until QEMU's monitor accepts it
    except OSError as e:
        listener.close()
        client.close()
        raise VmmFailed(f"cannot make the QMP socket {path}: {e.strerror}") from None
    client.settimeout(START_TIMEOUT_SEC)
    return listener, client


def spawn(argv: list[str], fds: Sequence[int]) -> int:
    """Starts QEMU with ``fds`` inherited (at the same numbers); its pid.  posix_spawn, not subprocess (not
    luo_systemd.processes either, which is asyncio's): this is on the restore path."""
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        return os.posix_spawn(argv[0], argv, os.environ, file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", 0, 0)])
    except OSError as e:
        raise VmmFailed(f"cannot start {argv[0]}: {e.strerror}") from None
    finally:
        for fd in fds:
            os.set_inheritable(fd, False)


def process_start_time() -> float:
    """When this process was started (wall clock, 10 ms resolution): the restore figures include the
    interpreter's start.  /proc's start time counts from boot (CLOCK_BOOTTIME), so it is turned into an age
    first: the wall clock may have been stepped since boot."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rpartition(")")[2].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def start(unit: str) -> str:
    t_start = time.time()
    name = instance_of(unit)
    # Restore=early: the unit starts with luod's socket, not after luod's READY=1, so luod itself says what
    # it restored for this unit (it answers once this unit's memfds are back): nothing, or the three.  Should
    # one be missing, this fails: a fresh boot would replace the guest's RAM in luod for good (Restart=
    # tries again).
    with varlink.Client(luod_socket(), timeout=30) as luod:
        reply, fds = luod.call("Retrieve")
    try:
        restored = dict(zip(reply.get("names", ()), fds))
        if restored:
            if sorted(restored) != sorted((RAM, STATE, ARGS)) or len(fds) != len(restored):
                raise VmmFailed(f"luod restored {' '.join(sorted(restored))} for {unit}, not {RAM} {STATE} {ARGS}")
            ram, saved, args = restored[RAM], restored[STATE], restored[ARGS]
            launch = Launch.decode(name, read_all(args, MAX_ARGS_BYTES))
            if resumable(launch.memory_bytes, os.fstat(ram).st_size, os.fstat(saved).st_size):
                return resume(unit, launch, ram, saved, args, t_start)
    finally:
        close_all(fds)
    return boot(unit, name)


def resume(unit: str, launch: Launch, ram: int, saved: int, args: int, t_start: float) -> str:
    t_retrieved = time.time()
    state_bytes = os.fstat(saved).st_size
    state = new_memfd(f"{STATE}:{launch.name}", 0)  # a fresh one for the next save (a restored one is frozen)
    save_fd = reopen(state, os.O_WRONLY)
    load_fd = reopen(saved, os.O_RDONLY)
    listener, client = qmp_listener(qmp_path(launch.name))
    try:
        qmp_fd = listener.fileno()
        pid = spawn(qemu_argv(launch, ram, save_fd, load_fd, qmp_fd), [ram, save_fd, load_fd, qmp_fd])
        t_spawned = time.time()
    finally:
        listener.close()  # QEMU's now: should it exit, the connection ends instead of waiting for a greeting
        close_all([save_fd, load_fd])
    try:
        with varlink.Client(luod_socket(), timeout=30) as luod:  # while QEMU starts
            luod.call("Store", {"names": [RAM, STATE, ARGS]}, [ram, state, args])
        t_stored = time.time()
        with Qmp(client, pipeline=LOAD) as qmp:
            t_qmp = time.time()
            for command, _ in LOAD:
                qmp.reply(command)
            qmp.event(("RESUME",))  # the guest runs again by itself once the state is loaded
            t_running = time.time()
    except VmmFailed as e:
        raise VmmFailed(f"{e} (QEMU loading the state of {launch.name}; its own words are in the journal)") from None
    finally:
        client.close()
        os.close(state)
    record(
        launch.name,
        "restore",
        {
            "process_started": process_start_time(),
            "started": t_start,
            "retrieved": t_retrieved,
            "qemu_spawned": t_spawned,
            "qmp_ready": t_qmp,
            "running": t_running,
            "stored": t_stored,
            "state_bytes": state_bytes,
        },
    )
    status = f"guest resumed from {state_bytes} bytes of device state in {(t_running - t_start) * 1000:.0f} ms"
    notify([(f"READY=1\nMAINPID={pid}\nSTATUS={status}", [])])
    return status


def boot(unit: str, name: str) -> str:
    """A cold start: new memfds, a fresh guest (not on the restore path: the configuration is read here)."""
    from luo_systemd.vmconfig import load_config  # noqa: PLC0415 - tomllib and re: not on the restore path

    launch = Launch.of(load_config(name))
    ram = new_memfd(f"{RAM}:{name}", launch.memory_bytes)
    state = new_memfd(f"{STATE}:{name}", 0)
    args = new_memfd(f"{ARGS}:{name}", launch.encode())
    save_fd = reopen(state, os.O_WRONLY)
    listener, client = qmp_listener(qmp_path(name))
    try:
        pid = spawn(qemu_argv(launch, ram, save_fd, None, listener.fileno()), [ram, save_fd, listener.fileno()])
    finally:
        listener.close()
        os.close(save_fd)
    try:
        with varlink.Client(luod_socket(), timeout=30) as luod:  # while QEMU starts
            luod.call("Store", {"names": [RAM, STATE, ARGS]}, [ram, state, args])
        with Qmp(client, (("query-version", {}), ("query-migrate-parameters", {}))) as qmp:
            version = qmp.reply("query-version")
            reason = cpr_support(qmp.reply("query-migrate-parameters"), version)
    finally:
        client.close()
        close_all([ram, state, args])
    set_inhibitor(unit, reason)
    if reason:
        log(f"{unit} cannot be live-updated: {reason}", priority=4)
    status = f"guest booted with {launch.memory_mib} MiB of RAM"
    notify([(f"READY=1\nMAINPID={pid}\nSTATUS={status}", [])])
    return status


def live_update_under_way() -> bool:
    """luod is armed, or systemd has a kexec job that luod will notice at the first preserve."""
    import subprocess  # noqa: PLC0415 - not on the restore path

    from luo_systemd.kexec_watch import LIST_JOBS_ARGS, kexec_job_listed  # noqa: PLC0415

    try:
        with varlink.Client(luod_socket(), timeout=10) as luod:
            if luod.call("Status")[0].get("phase") == "armed":
                return True
    except LuoError as e:
        log(f"luod cannot tell whether a live update is under way ({e}): an ordinary stop", priority=4)
        return False
    jobs = subprocess.run(["systemctl", *LIST_JOBS_ARGS], capture_output=True, text=True, timeout=5, check=False)
    return kexec_job_listed(jobs.stdout)


def wait_exit(pid: int, timeout: float) -> bool:
    """Waits for QEMU (the unit's main process, not our child) to exit."""
    import select  # noqa: PLC0415 - not on the restore path

    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def forget(unit: str) -> None:
    """Gives up the memfds (luod frees them): the next start boots the guest afresh."""
    try:
        with varlink.Client(luod_socket(), timeout=30) as luod:
            luod.call("Remove", {"names": [RAM, STATE, ARGS]})
    except LuoError as e:
        log(f"could not remove the memfds of {unit} from luod: {e}", priority=4)


def save(name: str, memory_bytes: int, qmp: Qmp, pid: int) -> str:
    t_pause = time.time()
    # All at once; the MIGRATION events say when it is done (no polling).
    qmp.send("migrate-set-capabilities", capabilities=[IGNORE_SHARED, MIGRATION_EVENTS])
    qmp.send("migrate-set-parameters", mode="cpr-reboot")
    qmp.send("migrate", uri=f"file:/dev/fdset/{SAVE_FDSET}")
    for command in ("migrate-set-capabilities", "migrate-set-parameters", "migrate"):
        qmp.reply(command)
    info = qmp.wait_migration()  # the guest is paused from here on
    t_saved = time.time()
    if ram_was_copied(info, memory_bytes):
        raise VmmFailed(f"QEMU copied the guest RAM into the state ({info['ram']['total']} bytes): not a live update")
    qmp.command("quit")
    wait_exit(pid, 10)
    t_exited = time.time()
    figures = {
        "paused": t_pause,
        "saved": t_saved,
        "exited": t_exited,
        "ram_bytes": memory_bytes,
        "ram_copied_bytes": int(info["ram"]["total"]),
        "qemu": qmp.greeting.get("QMP", {}).get("version", {}).get("qemu", {}),
    }
    record(name, "save", figures)
    return (
        f"saved the device state for the live update in {(t_saved - t_pause) * 1000:.0f} ms "
        f"(QEMU's own RAM copied: {figures['ram_copied_bytes']} bytes; guest RAM kept in place: "
        f"{memory_bytes} bytes); QEMU gone after {(t_exited - t_pause) * 1000:.0f} ms"
    )


def stop(unit: str) -> str:
    from luo_systemd.vmconfig import load_config  # noqa: PLC0415 - not on the restore path

    name = instance_of(unit)
    cfg = load_config(name)
    pid = int(os.environ.get("MAINPID") or 0)
    try:
        qmp = Qmp.connect(qmp_path(name), timeout=2)
    except VmmFailed:
        forget(unit)
        set_inhibitor(unit, "")
        return f"QEMU of {unit} is gone: nothing to save"
    with qmp:
        inhibited = os.path.exists(inhibitor_path(unit))
        if not inhibited and live_update_under_way():
            try:
                return save(name, cfg.memory_bytes, qmp, pid)
            except VmmFailed as e:
                log(f"{e}; {unit} will boot afresh after the kexec", priority=3)
                qmp.command("quit")
        else:
            qmp.command("system_powerdown")
            if not wait_exit(pid, cfg.powerdown_timeout_sec):
                qmp.command("quit")
    wait_exit(pid, 10)
    forget(unit)
    set_inhibitor(unit, "")
    return f"{unit} stopped (a fresh boot next time)"


VERBS = {"start": start, "stop": stop}


def main(argv: Sequence[str] = ()) -> int:
    args = list(argv or sys.argv)[1:]
    if len(args) != 2 or args[0] not in VERBS:
        print("usage: luo-qemu start|stop luo-qemu@NAME.service", file=sys.stderr)
        return 2
    verb, unit = args
    try:
        log(VERBS[verb](unit))
    except LuoError as e:
        log(f"{verb} {unit}: {e}", priority=3)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
