"""luod's configuration: TOML, from /usr/lib/luod/luod.toml (package defaults), /etc/luod/luod.toml, and
drop-ins in luod.toml.d/ (later files override earlier ones, key by key).  See luod(8)."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable
from typing import Any

from luo_systemd.errors import InvalidRequest
from luo_systemd.liveupdate import DEFAULT_EMULATOR_SOCKET

if sys.version_info >= (3, 11):
    import tomllib
else:  # RHEL 9 and Debian 11 have Python 3.9
    import tomli as tomllib

CONFIG_DIRS = ("/usr/lib/luod", "/run/luod", "/etc/luod")
BACKENDS = ("kernel", "emulator")


@dataclasses.dataclass(frozen=True)
class Config:
    backend: str = "kernel"  # never falls back to the emulator by itself
    emulator_socket: str = DEFAULT_EMULATOR_SOCKET
    varlink_socket: str = "/run/luod/liveupdate.sock"  # used when not socket-activated
    policy_dir: str = "/run/systemd/generator"  # where the generator writes the units' [X-LiveUpdate]
    env_dir: str = "/run/luod/env"
    max_fds_total: int = 4096
    busy_retries: int = 5
    dbus: bool = True  # serve io.liveupdate.Agent1 on the system bus
    systemctl: list[str] = dataclasses.field(default_factory=lambda: ["systemctl"])  # asks PID 1 about kexec jobs
    inhibit_dir: str = "/run/luod/inhibit"  # UNIT files: why that unit cannot be live-updated now (pre-flight)
    running_kernel_image: str = ""  # the running kernel's image, for its LUO format; "" = /boot/vmlinuz-RELEASE
    next_kernel_file: str = "/run/luod/next-kernel.json"  # what liveupdatectl loaded (the kernel cannot tell)
    last_update_file: str = "/run/luod/last-update.json"  # what the last live update carried, for verify
    memory_margin_mib: int = 256  # kept free on top of the memory a preserve pins
    block_shutdown: bool = True  # hold a logind shutdown block while a loaded kernel fails the pre-flight
    # node_exporter's textfile collector (Debian's directory); written only if the directory exists, "" = off
    metrics_file: str = "/var/lib/prometheus/node-exporter/luo-systemd.prom"


def config_files(dirs: Iterable[str] = CONFIG_DIRS) -> list[str]:
    """luod.toml of each directory, then all luod.toml.d/*.toml sorted by file name across directories."""
    files = [os.path.join(d, "luod.toml") for d in dirs if os.path.isfile(os.path.join(d, "luod.toml"))]
    dropins: dict[str, str] = {}
    for d in dirs:
        sub = os.path.join(d, "luod.toml.d")
        if os.path.isdir(sub):
            for name in os.listdir(sub):
                if name.endswith(".toml"):
                    dropins[name] = os.path.join(sub, name)  # a later directory masks an earlier one
    return files + [dropins[n] for n in sorted(dropins)]


def load(files: Iterable[str]) -> Config:
    values: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for path in files:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidRequest(f"{path}: {e}") from None
        for key, value in doc.get("agent", {}).items():
            field = fields.get(key)
            if field is None:
                raise InvalidRequest(f"{path}: unknown setting agent.{key}")
            expected = list if field.default is dataclasses.MISSING else type(field.default)
            if type(value) is not expected:
                raise InvalidRequest(f"{path}: agent.{key} must be a {expected.__name__}")
            values[key] = value
    config = Config(**values)
    if config.backend not in BACKENDS:
        raise InvalidRequest(f"agent.backend must be one of {', '.join(BACKENDS)}, not {config.backend!r}")
    return config
