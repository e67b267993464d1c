"""Fleet engines driving real containers: contrib/ansible's rolling live update over three nspawn containers
(one refuses), and the kured sentinel command of docs/fleet.md.

ansible-playbook (ansible-core from PyPI, a test dependency) reaches each container over SSH without any
network: a socket unit with Accept=yes (one ``sshd -i`` per connection) listens on a Unix socket in the
container's /run, and the ProxyCommand connects to it through /proc/PID1/root.  The
container's systemd starts and stops each sshd like any unit, so a kexec's kill spree finds no process whose
parent lives outside the container.  (Starting ``sshd -i`` with nsenter from the ProxyCommand was tried
first: systemd-shutdown SIGSTOPs every process before its kill spree, nsenter stops itself when its child
stops and is never continued, and the zombie sshd holds up the kexec.)  A thread per container plays the
machine's firmware: when the container goes down, it boots the same disk again and publishes the new PID 1.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import pytest

from tests.nspawn import harness
from tests.nspawn.live_update import GUEST_KERNEL, OLD_KERNEL, LiveUpdateBed, demo_status

TOP = Path(__file__).resolve().parent.parent
OK, WHY = harness.available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not OK, reason=f"skipped because {WHY}")]
CACHE = Path(os.environ.get("LUO_CACHE", "/var/cache/luo-systemd"))
DEMO = "luo-demo-cache.service"
HOSTS = ("luo-1", "luo-2", "luo-3")
REFUSED = "luo-2"  # in the middle: the roll goes on past it

SSH_SOCKET = "/run/ssh.sock"
SSH_UNITS = {
    "/etc/systemd/system/luo-ssh.socket": f"""[Unit]
Description=sshd -i per connection, for the test's ProxyCommand (through /proc/PID1/root: no network)

[Socket]
ListenStream={SSH_SOCKET}
SocketMode=0600
Accept=yes

[Install]
WantedBy=sockets.target
""",
    "/etc/systemd/system/luo-ssh@.service": """[Unit]
Description=sshd -i for one connection of the test's ProxyCommand

[Service]
ExecStart=-/usr/sbin/sshd -i
StandardInput=socket
StandardError=journal
RuntimeDirectory=sshd
RuntimeDirectoryPreserve=yes
""",
}
# ssh's ProxyCommand: the socket of the container named argv[1].  The PID in its file must still be a
# container's PID 1 (NSpid ending in 1), never a host process that reused the number.
PROXY = f"""#!/usr/bin/python3
import os, socket, sys, threading

try:
    with open(f"{{sys.argv[0]}}.d/{{sys.argv[1]}}.leader") as f:
        leader = f.read().strip()
    with open(f"/proc/{{leader}}/status") as f:
        nspid = [line.split() for line in f if line.startswith("NSpid:")][0]
    if len(nspid) < 3 or nspid[-1] != "1":
        raise OSError("not a container's PID 1")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(f"/proc/{{leader}}/root{SSH_SOCKET}")
except (OSError, IndexError) as e:
    sys.exit(f"{{sys.argv[1]}} is down: {{e}}")


def upstream():
    while data := os.read(0, 65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


threading.Thread(target=upstream, daemon=True).start()
while data := sock.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
"""


@pytest.fixture(scope="session")
def sshd_debs() -> Path:
    """openssh-server and what the bookworm root file system lacks for it, from the host's apt (cached)."""
    rootfs = harness.ensure_rootfs("bookworm", quiet=True)
    out = CACHE / "debs" / "openssh-bookworm"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not list(out.glob("openssh-server_*.deb")):
            status = f"Dir::State::status={rootfs}/var/lib/dpkg/status"  # what the tree has already
            plan = subprocess.run(
                ["apt-get", "install", "-s", "--no-install-recommends", "openssh-server", "-o", status],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            names = re.findall(r"^Inst (\S+)", plan, re.M)
            subprocess.run(["apt-get", "download", *names], cwd=out, check=True, capture_output=True)
    return out


class Firmware(threading.Thread):
    """Boots a container again whenever it goes down, and writes its PID 1 for the ProxyCommand."""

    def __init__(self, bed: LiveUpdateBed, leader_file: Path) -> None:
        super().__init__(daemon=True)
        self.bed, self.leader_file = bed, leader_file
        self.stopping = threading.Event()
        self.downtimes: list[tuple[float, float, str]] = []  # (went down, running again, how it went down)
        self.error: Optional[BaseException] = None
        self.publish()

    def publish(self) -> None:
        self.leader_file.write_text(str(self.bed.c.leader))

    def run(self) -> None:
        c = self.bed.c
        try:
            while not self.stopping.wait(0.2):
                if c.running:
                    continue
                down = time.monotonic()
                self.leader_file.unlink()
                c.wait_exit()
                kind = c.shutdown_kind() or "?"
                c.boot()
                c.wait_running()
                self.publish()
                self.downtimes.append((down, time.monotonic(), kind))
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=120)


def ssh_ready(bed: LiveUpdateBed, public_key: str) -> None:
    """openssh-server installed, sshd -i per connection on a Unix socket, our key authorized."""
    c = bed.c
    c.sh("dpkg -i /mnt/sshd/*.deb", check=True, timeout=180)
    for path, text in SSH_UNITS.items():
        c.write_file(path, text)
    c.sh("systemctl disable --now ssh.service && systemctl daemon-reload", check=True)
    c.sh("systemctl enable --now luo-ssh.socket", check=True)
    c.sh("install -d -m 0700 /root/.ssh", check=True)
    c.write_file("/root/.ssh/authorized_keys", public_key, mode=0o600)


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines: host -> {ok, changed, unreachable, failed, ...}."""
    rows = re.findall(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output.split("PLAY RECAP", 1)[-1], re.M)
    return {host: {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)} for host, counts in rows}


@pytest.fixture
def fleet(debs: list[Path], sshd_debs: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    proxy = tmp_path / "proxy"
    proxy.write_text(PROXY)
    proxy.chmod(0o755)
    (tmp_path / "proxy.d").mkdir()
    with ExitStack() as stack:
        beds: dict[str, LiveUpdateBed] = {}
        for host in HOSTS:
            bed = LiveUpdateBed("bookworm", debs, tmp_path / host, binds=((str(sshd_debs), "/mnt/sshd"),))
            beds[host] = stack.enter_context(bed)
            ssh_ready(bed, (tmp_path / "id_ed25519.pub").read_text())
            if host == REFUSED:
                bed.add_sparse_unit()
            demo_status(bed.c)
        firmware = {host: Firmware(bed, tmp_path / "proxy.d" / f"{host}.leader") for host, bed in beds.items()}
        yield {"beds": beds, "firmware": firmware, "key": key, "proxy": proxy, "dir": tmp_path}
        for f in firmware.values():
            f.stop()


def run_playbook(fleet: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    d: Path = fleet["dir"]
    ssh_args = f'-o ProxyCommand="{fleet["proxy"]} %h" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'
    (d / "inventory.ini").write_text(
        "[fleet]\n"
        + "".join(f"{h}\n" for h in HOSTS)
        + "[fleet:vars]\nansible_user=root\nansible_python_interpreter=/usr/bin/python3\n"
        + f"ansible_ssh_private_key_file={fleet['key']}\nansible_ssh_common_args='{ssh_args}'\n"
    )
    env = dict(
        os.environ,
        ANSIBLE_HOME=str(d / "ansible"),
        ANSIBLE_LOCAL_TEMP=str(d / "ansible" / "tmp"),
        ANSIBLE_PIPELINING="1",
        ANSIBLE_SSH_ARGS="-o ControlMaster=no",  # each task a fresh sshd -i, before and after the kexec
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_HOST_KEY_CHECKING="0",
    )
    playbook = [str(Path(sys.executable).with_name("ansible-playbook"))]
    return subprocess.run(
        [*playbook, "-i", str(d / "inventory.ini"), str(TOP / "contrib" / "ansible" / "live-update.yml"), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_ansible_rolls_a_live_update_over_three_containers_and_leaves_the_refused_one_running(
    fleet: dict[str, Any],
) -> None:
    beds: dict[str, LiveUpdateBed] = fleet["beds"]
    before = {host: demo_status(bed.c) for host, bed in beds.items()}
    for f in fleet["firmware"].values():
        f.start()
    proc = run_playbook(fleet, "-e", f"luo_kernel={GUEST_KERNEL}")
    for f in fleet["firmware"].values():
        f.stop()
        assert f.error is None, f.error
    print(proc.stdout[-6000:], proc.stderr[-2000:])
    got = recap(proc.stdout)
    assert proc.returncode == 2, "a host failed: the refused one"
    assert got[REFUSED]["failed"] == 1 and got[REFUSED]["changed"] == 0
    assert "Live update refused, left running" in proc.stdout and "not enough memory" in proc.stdout
    updated = [h for h in HOSTS if h != REFUSED]
    for host in updated:
        assert got[host]["failed"] == 0 and got[host]["unreachable"] == 0 and got[host]["changed"] >= 2, got
        kinds = [kind for *_, kind in fleet["firmware"][host].downtimes]
        assert kinds in (["kexec"], ["?"]), f"went down once, by a kexec (not a reboot): {kinds}"
        c = beds[host].c
        after = json.loads(c.read_file("/run/luo-demo/status.json"))
        assert after["restored"] and after["sha256"] == before[host]["sha256"], "the cache came back, identical"
        verdict = json.loads(c.sh("liveupdatectl --json=short verify", check=True).stdout)
        assert verdict["verdict"] == "ok" and verdict["LiveUpdatesCount"] == 1
    # one at a time (serial: 1): the second went down after the first was back
    first, second = (fleet["firmware"][h].downtimes[0] for h in updated)
    assert second[0] > first[1]
    # the refused host never went down, kept its processes and has no kernel loaded
    refused = beds[REFUSED]
    assert fleet["firmware"][REFUSED].downtimes == []
    assert json.loads(refused.c.read_file("/run/luo-demo/status.json"))["pid"] == before[REFUSED]["pid"]
    assert refused.emulator.status()["kernel"] is None
    assert refused.c.sh("liveupdatectl verify").returncode == 7, "no live update behind this boot"


def sentinel_command() -> list[str]:
    """The --reboot-sentinel-command of docs/fleet.md, split as kured splits it."""
    text = (TOP / "docs" / "fleet.md").read_text()
    found = re.search(r'^--reboot-sentinel-command="(.*)"$', text, re.M)
    assert found, "docs/fleet.md shows the sentinel command"
    return shlex.split(found.group(1))


def test_the_kured_sentinel_command_prepares_or_refuses(debs: list[Path], tmp_path: Path) -> None:
    sentinel = sentinel_command()
    with LiveUpdateBed("bookworm", debs, tmp_path) as bed:
        c = bed.c
        demo_status(c)
        nothing_to_do = c.run(sentinel, timeout=120)
        unloaded = bed.emulator.status()["kernel"]
        # a kernel package was installed: it links /vmlinuz and /initrd.img and asks for a reboot
        c.sh(f"ln -sf {GUEST_KERNEL} /vmlinuz && head -c 4096 /dev/urandom >/initrd.img", check=True)
        c.sh("touch /run/reboot-required", check=True)
        needed = c.run(sentinel, timeout=120)
        loaded = bed.emulator.status()["kernel"]
        c.sh("luo-emu unload", check=True)
        c.sh(f"ln -sf {OLD_KERNEL} /vmlinuz", check=True)  # a kernel of another LUO format
        wrong_format = c.run(sentinel, timeout=120)
        c.sh(f"ln -sf {GUEST_KERNEL} /vmlinuz", check=True)
        bed.add_sparse_unit()
        no_memory = c.run(sentinel, timeout=120)
        still_unloaded = bed.emulator.status()["kernel"]
    assert nothing_to_do.returncode == 1 and unloaded is None
    assert needed.returncode == 0, needed.stderr
    assert isinstance(loaded, dict) and "kho=on" in loaded["cmdline"] and "liveupdate=on" in loaded["cmdline"]
    assert wrong_format.returncode == 3 and "luo-v4" in wrong_format.stderr, wrong_format.stderr
    assert no_memory.returncode == 3 and "not enough memory" in no_memory.stderr, no_memory.stderr
    assert still_unloaded is None, "kured sees 'no reboot needed' and nothing is left loaded"
