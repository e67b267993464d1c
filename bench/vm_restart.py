"""A bare cpr-reboot restart of a QEMU guest, for bench/vm.py: runs inside its container, as root.

    python3 vm_restart.py NAME ROUNDS

Boots the guest of /etc/luo-qemu/NAME.toml with luo-qemu's own command line and QMP steps (luo_systemd.vm), but
no systemd unit, no luod and no kexec: this process holds the guest-RAM memfd.  Then ROUNDS times: the save
luo-qemu's stop does (cpr-reboot into a state memfd, quit), and at once a new QEMU on the same RAM that loads
the state, as luo-qemu's restore does.  Prints one JSON object per round: ``save_quit`` (paused -> QEMU gone),
``restart`` (QEMU gone -> guest running in the new QEMU), ``total``, in seconds; last, how often the guest
booted (its serial port), which must be once.
"""

from __future__ import annotations

import json
import os
import sys
import time

from luo_systemd import vm
from luo_systemd.qmp import Qmp
from luo_systemd.vmconfig import load_config

BOOT_SEC = 3.0  # the guest fills its 16 MiB region at boot; the demo's probe waits for it the same way


def start_qemu(launch: vm.Launch, ram: int, state: int, saved: int) -> tuple[int, Qmp]:
    save_fd = vm.reopen(state, os.O_WRONLY)
    load_fd = vm.reopen(saved, os.O_RDONLY) if saved >= 0 else None
    listener, client = vm.qmp_listener(vm.qmp_path(launch.name))
    fds = [ram, save_fd, listener.fileno(), *([load_fd] if load_fd is not None else [])]
    try:
        pid = vm.spawn(vm.qemu_argv(launch, ram, save_fd, load_fd, listener.fileno()), fds)
    finally:
        listener.close()
        vm.close_all([save_fd, load_fd if load_fd is not None else -1])
    qmp = Qmp(client, vm.LOAD if load_fd is not None else ())
    if load_fd is not None:
        for command, _ in vm.LOAD:
            qmp.reply(command)
        qmp.event(("RESUME",))
    return pid, qmp


def main() -> int:
    name, rounds = sys.argv[1], int(sys.argv[2])
    launch = vm.Launch.of(load_config(name))
    serial = next(a.split("path=")[1].split(",")[0] for a in launch.args if "path=" in a)
    if os.path.exists(serial):
        os.unlink(serial)  # a new guest each run: its boots are counted from here
    os.makedirs(os.path.dirname(vm.qmp_path(name)), exist_ok=True)
    ram = vm.new_memfd(f"{vm.RAM}:{name}", launch.memory_bytes)
    state = vm.new_memfd(f"{vm.STATE}:{name}", 0)
    pid, qmp = start_qemu(launch, ram, state, -1)
    time.sleep(BOOT_SEC)
    for _ in range(rounds):
        t_pause = time.time()
        vm.save(name, launch.memory_bytes, qmp, pid)
        t_exited = time.time()
        qmp.close()
        os.waitpid(pid, 0)
        saved, state = state, vm.new_memfd(f"{vm.STATE}:{name}", 0)
        pid, qmp = start_qemu(launch, ram, state, saved)
        t_running = time.time()
        os.close(saved)
        print(
            json.dumps({"save_quit": t_exited - t_pause, "restart": t_running - t_exited, "total": t_running - t_pause})
        )
        time.sleep(0.5)
    qmp.command("quit")
    os.waitpid(pid, 0)
    with open(serial) as f:
        print(json.dumps({"boots": f.read().count("luo-vm-guest: booted")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
