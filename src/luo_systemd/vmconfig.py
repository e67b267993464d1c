"""luo-qemu's configuration: /etc/luo-qemu/NAME.toml, checked key by key (see luo-qemu(8)).  Read at a cold
start; the restore after a live update uses the command line the running QEMU was started with (``vm-args``).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, NamedTuple

from luo_systemd.errors import InvalidRequest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CONFIG_DIR = "/etc/luo-qemu"
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


class VmConfig(NamedTuple):  # as policy.Policy
    name: str
    machine: str  # versioned, e.g. pc-q35-10.0
    memory_mib: int
    args: tuple[str, ...] = ()  # everything else QEMU needs: drives, devices, serial, accel
    qemu: str = DEFAULT_QEMU
    powerdown_timeout_sec: float = DEFAULT_POWERDOWN_SEC  # an ordinary stop: ACPI power-down, then quit

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib << 20


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
    if not isinstance(args, list) or not all(isinstance(a, str) and "\0" not in a for a in args):
        raise InvalidRequest(f"{where}: args must be a list of strings (without NUL characters)")
    for i, arg in enumerate(args):
        if arg in RESERVED_OPTIONS:
            raise InvalidRequest(f"{where}: args may not contain {arg}: luo-qemu sets it (machine, memory_mib)")
        if i > 0 and args[i - 1] in ("-object", "-device") and arg.startswith(RESERVED_VALUES):
            raise InvalidRequest(
                f"{where}: args may not add {args[i - 1]} {arg.split(',')[0]}: guest RAM is luo-qemu's memory "
                "backend, and a loader would write into guest RAM before the restore"
            )
    qemu = doc.get("qemu", DEFAULT_QEMU)
    if not isinstance(qemu, str) or not os.path.isabs(qemu) or "\0" in qemu:
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
