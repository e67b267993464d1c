"""luo-qemu start|stop UNIT: a QEMU virtual machine as a systemd service that keeps running across a kernel
live update.  The ExecStart= and ExecStop= of ``luo-qemu@.service``; see luo-qemu(8).

Guest RAM lives in a memfd that QEMU maps (memory-backend-file on /proc/self/fd/N, share=on) and that luod
holds under the name ``guest-ram``; device state goes to a second memfd, ``vm-state``.

- start, cold: new memfds, stored in luod, QEMU started on them; if this QEMU cannot save itself for a live
  update (no cpr-reboot), an inhibitor makes luod's pre-flight refuse, before anything stops.
- stop for a live update (luod armed, or a kexec job queued): QEMU saves its device state into ``vm-state``
  in cpr-reboot mode with x-ignore-shared, which leaves the guest RAM where it is, then quits; luo-hook stop
  (the next ExecStop=) preserves both memfds.  If QEMU copied the guest RAM into the state after all, that
  is not a live update: the memfds are given up and the guest will boot afresh.
- start after the kexec: the restored memfds arrive in LISTEN_FDS; QEMU starts on the same RAM with the same
  arguments and ``-incoming defer``, loads the state with migrate-incoming, and the guest carries on.
- an ordinary stop: ACPI power-down (system_powerdown), ``quit`` after the configured time; the memfds are
  removed from luod, so the next start boots the guest afresh.

The launcher does not stay: READY=1 comes with MAINPID= of QEMU once the guest runs, and QEMU is the service.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

from luo_systemd import varlink
from luo_systemd.errors import InvalidRequest, LuoError, VmmFailed
from luo_systemd.qmp import Qmp
from luo_systemd.service_manager import listen_fds, notify

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CONFIG_DIR = "/etc/luo-qemu"
RUNTIME_DIR = "/run/luo-qemu"  # RuntimeDirectory=luo-qemu/%i: the QMP socket
STATE_DIR = "/var/lib/luo-qemu"  # StateDirectory=luo-qemu: the figures of the last live update
RAM = "guest-ram"
STATE = "vm-state"
SAVE_FDSET = 1  # -add-fd set of the (write-only) state memfd that QEMU saves into
LOAD_FDSET = 2  # -add-fd set of the (read-only) restored state memfd that QEMU loads from
UNIT_RE = re.compile(r"^luo-qemu@([A-Za-z0-9_.:-]+)\.service$")
# A versioned machine type: a bare "q35" becomes another type when QEMU is updated, and the state the old
# QEMU saved no longer loads ("Machine type received is ... and local is ...").
MACHINE_RE = re.compile(r"^[a-z][a-z0-9_-]*-\d+\.\d+$")
# Options that the launcher sets itself, or that would break keeping the RAM in place: a second RAM
# backend, a loader writing blobs into guest RAM while QEMU starts (before the restore), a monitor it
# does not know of, a daemonizing QEMU.
RESERVED_OPTIONS = ("-m", "-machine", "-M", "-mem-path", "-mem-prealloc", "-incoming", "-qmp", "-daemonize", "-name")
RESERVED_VALUES = ("memory-backend-", "loader")
MAX_MEMORY_MIB = 1 << 24  # 16 TiB
DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
DEFAULT_POWERDOWN_SEC = 30.0
SAVE_TIMEOUT_SEC = 60.0
START_TIMEOUT_SEC = 60.0


class VmConfig(NamedTuple):  # not a dataclass: importing dataclasses costs ~20 ms of the restore
    name: str
    machine: str  # versioned, e.g. pc-q35-10.0
    memory_mib: int
    args: tuple[str, ...] = ()  # everything else QEMU needs: drives, devices, serial, accel
    qemu: str = DEFAULT_QEMU
    powerdown_timeout_sec: float = DEFAULT_POWERDOWN_SEC  # an ordinary stop: ACPI power-down, then quit

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib << 20


def instance_of(unit: str) -> str:
    m = UNIT_RE.match(unit)
    if not m:
        raise InvalidRequest(f"{unit!r} is not an instance of luo-qemu@.service")
    return m.group(1)


def parse_config(name: str, doc: dict[str, Any], origin: str = "") -> VmConfig:
    """The VM's settings from its TOML document; every mistake is an InvalidRequest naming the key."""
    where = origin or name
    allowed = set(VmConfig._fields) - {"name"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise InvalidRequest(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(allowed))})")
    machine = doc.get("machine")
    if not isinstance(machine, str) or not MACHINE_RE.match(machine):
        raise InvalidRequest(
            f"{where}: machine must be a versioned machine type such as 'pc-q35-10.0' "
            "(a bare 'q35' changes with QEMU updates and the saved state would no longer load)"
        )
    memory = doc.get("memory_mib")
    if type(memory) is not int or not 1 <= memory <= MAX_MEMORY_MIB:
        raise InvalidRequest(f"{where}: memory_mib must be an integer from 1 to {MAX_MEMORY_MIB}")
    args = doc.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InvalidRequest(f"{where}: args must be a list of strings")
    for i, arg in enumerate(args):
        if arg in RESERVED_OPTIONS:
            raise InvalidRequest(f"{where}: args may not contain {arg}: luo-qemu sets it (machine, memory_mib)")
        if i > 0 and args[i - 1] in ("-object", "-device") and arg.startswith(RESERVED_VALUES):
            raise InvalidRequest(
                f"{where}: args may not add {args[i - 1]} {arg.split(',')[0]}: guest RAM is luo-qemu's memory "
                "backend, and a loader would write into guest RAM before the restore"
            )
    qemu = doc.get("qemu", DEFAULT_QEMU)
    if not isinstance(qemu, str) or not os.path.isabs(qemu):
        raise InvalidRequest(f"{where}: qemu must be an absolute path")
    timeout = doc.get("powerdown_timeout_sec", DEFAULT_POWERDOWN_SEC)
    if type(timeout) not in (int, float) or not 0 <= timeout <= 3600:
        raise InvalidRequest(f"{where}: powerdown_timeout_sec must be a number of seconds from 0 to 3600")
    return VmConfig(name, machine, memory, tuple(args), qemu, float(timeout))


def load_config(name: str, directory: str = CONFIG_DIR) -> VmConfig:
    path = os.path.join(directory, name + ".toml")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InvalidRequest(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    return parse_config(name, doc, path)


def qemu_argv(cfg: VmConfig, ram_fd: int, save_fd: int, load_fd: Optional[int], qmp_path: str) -> list[str]:
    """QEMU's command line: the same on both sides of a live update, plus -incoming on the restoring side."""
    size = f"{cfg.memory_mib}M"
    argv = [
        cfg.qemu,
        "-name",
        cfg.name,
        "-machine",
        f"{cfg.machine},memory-backend=ram0",
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
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        *cfg.args,
    ]
    if load_fd is not None:
        argv += ["-add-fd", f"fd={load_fd},set={LOAD_FDSET},opaque=restored-{STATE}", "-incoming", "defer"]
    return argv


def ram_was_copied(migrate_info: dict[str, Any], memory_bytes: int) -> bool:
    """Whether QEMU put the guest RAM into the state instead of leaving it in place: then the state is as
    large as the RAM, and this is no live update (cpr-reboot does not refuse unshared RAM by itself)."""
    return int(migrate_info.get("ram", {}).get("total", 0)) >= memory_bytes


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
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        doc = {}
    doc[key] = figures
    if key == "save":
        doc.pop("restore", None)
    os.makedirs(STATE_DIR, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(path + ".tmp", path)


def new_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def reopen(fd: int, flags: int) -> int:
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def close_all(fds: Sequence[int]) -> None:
    varlink.close_all([fd for fd in fds if fd >= 0])  # -1: no fd


def restorable(cfg: VmConfig, ram: int, saved: int) -> bool:
    """Whether this start resumes a guest: a live update brought back its RAM (fd ``ram``) and a saved state
    (``saved``); -1 for what did not come."""
    if os.environ.get("LIVEUPDATE_RESTORED") != "1":
        return False
    if ram < 0 or saved < 0:
        # luod holds this guest's RAM (luo-hook start failed to hand it over): a fresh boot on a new memfd
        # would replace it in luod for good.  Failing keeps it there; the next start tries again.
        raise VmmFailed(
            "a live update carried this VM, but its guest RAM or device state did not arrive (see luo-hook start in"
            " the journal): not booting over it"
        )
    state_bytes = os.fstat(saved).st_size
    if state_bytes == 0:
        return False  # the stop did not save (QEMU was gone, or could not): a fresh boot
    if os.fstat(ram).st_size < cfg.memory_bytes:
        raise VmmFailed(f"the restored guest RAM is smaller than memory_mib={cfg.memory_mib}: not resuming")
    if state_bytes >= cfg.memory_bytes:
        raise VmmFailed(f"the saved state ({state_bytes} bytes) holds a copy of the guest RAM: not a live update")
    return True


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
    cfg = load_config(name)
    passed = listen_fds()
    restored_ram, saved = (passed.pop(n, [-1])[0] for n in (RAM, STATE))
    for fd in [fd for fds in passed.values() for fd in fds]:
        os.close(fd)
    resume = restorable(cfg, restored_ram, saved)
    if resume:
        ram = restored_ram
    else:
        close_all([restored_ram, saved])
        ram, saved = new_memfd(f"{RAM}:{name}", cfg.memory_bytes), -1
    state = new_memfd(f"{STATE}:{name}", 0)  # a fresh one for the next save (a restored one may be frozen)
    save_fd = reopen(state, os.O_WRONLY)
    load_fd = reopen(saved, os.O_RDONLY) if resume else -1
    sock = qmp_path(name)
    argv = qemu_argv(cfg, ram, save_fd, load_fd if resume else None, sock)
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=[fd for fd in (ram, save_fd, load_fd) if fd >= 0])
    t_spawned = time.time()
    # While QEMU starts (should this fail, the unit fails and systemd stops QEMU with it):
    with varlink.Client(luod_socket(), timeout=30) as luod:
        luod.call("Store", {"names": [RAM, STATE]}, [ram, state])
    # The restored fds are in the unit's fd store, where a later restart would find them again: only this
    # start may use them.
    notify([(f"FDSTOREREMOVE=1\nFDNAME={n}", []) for n in (RAM, STATE)])
    with Qmp.connect(sock, START_TIMEOUT_SEC, alive=lambda: qemu.poll() is None) as qmp:
        t_qmp = time.time()
        version = qmp.command("query-version")
        if resume:
            state_bytes = os.fstat(saved).st_size
            qmp.command("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
            qmp.command("migrate-set-parameters", mode="cpr-reboot")
            qmp.command("migrate-incoming", uri=f"file:/dev/fdset/{LOAD_FDSET}")
            qmp.wait_migration(START_TIMEOUT_SEC)
            while qmp.command("query-status").get("status") != "running":  # the guest runs again by itself
                time.sleep(0.001)
            t_running = time.time()
            record(
                name,
                "restore",
                {
                    "process_started": process_start_time(),
                    "started": t_start,
                    "qemu_spawned": t_spawned,
                    "qmp_ready": t_qmp,
                    "running": t_running,
                    "state_bytes": state_bytes,
                },
            )
            status = f"guest resumed from {state_bytes} bytes of device state in {(t_running - t_start) * 1000:.0f} ms"
        else:
            reason = cpr_support(qmp.command("query-migrate-parameters"), version)
            set_inhibitor(unit, reason)
            if reason:
                log(f"{unit} cannot be live-updated: {reason}", priority=4)
            status = f"guest booted with {cfg.memory_mib} MiB of RAM"
    close_all([ram, state, save_fd, load_fd, saved])
    notify([(f"READY=1\nMAINPID={qemu.pid}\nSTATUS={status}", [])])
    return status


def live_update_under_way() -> bool:
    """luod is armed, or systemd has a kexec job that luod will notice at the first preserve."""
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
            luod.call("Remove", {"names": [RAM, STATE]})
    except LuoError as e:
        log(f"could not remove the memfds of {unit} from luod: {e}", priority=4)


def save(cfg: VmConfig, qmp: Qmp, pid: int) -> str:
    t_pause = time.time()
    qmp.command("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    qmp.command("migrate-set-parameters", mode="cpr-reboot")
    qmp.command("migrate", uri=f"file:/dev/fdset/{SAVE_FDSET}")
    info = qmp.wait_migration(SAVE_TIMEOUT_SEC)  # the guest is paused from here on
    t_saved = time.time()
    if ram_was_copied(info, cfg.memory_bytes):
        raise VmmFailed(f"QEMU copied the guest RAM into the state ({info['ram']['total']} bytes): not a live update")
    qmp.command("quit")
    wait_exit(pid, 10)
    t_exited = time.time()
    figures = {
        "paused": t_pause,
        "saved": t_saved,
        "exited": t_exited,
        "ram_bytes": cfg.memory_bytes,
        "ram_copied_bytes": int(info["ram"]["total"]),
        "qemu": qmp.greeting.get("QMP", {}).get("version", {}).get("qemu", {}),
    }
    record(cfg.name, "save", figures)
    return (
        f"saved the device state for the live update in {(t_saved - t_pause) * 1000:.0f} ms "
        f"(QEMU's own RAM copied: {figures['ram_copied_bytes']} bytes; guest RAM kept in place: "
        f"{cfg.memory_bytes} bytes); QEMU gone after {(t_exited - t_pause) * 1000:.0f} ms"
    )


def stop(unit: str) -> str:
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
                return save(cfg, qmp, pid)
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
