"""luod's configuration: TOML, from /usr/lib/luod/luod.toml (package defaults), /etc/luod/luod.toml, and
drop-ins in luod.toml.d/ (later files override earlier ones, key by key).  See luod(8)."""

from __future__ import annotations

import os
import sys

from luo_systemd.errors import InvalidRequest
from luo_systemd.liveupdate import DEFAULT_EMULATOR_SOCKET
from luo_systemd.records import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, Optional

CONFIG_DIRS = ("/usr/lib/luod", "/run/luod", "/etc/luod")
BACKENDS = ("kernel", "emulator")


class Config(NamedTuple):  # not a dataclass: luod reads it before READY=1 (see luo_systemd.records)
    backend: str = "kernel"  # never falls back to the emulator by itself
    emulator_socket: str = DEFAULT_EMULATOR_SOCKET
    varlink_socket: str = "/run/luod/liveupdate.sock"  # used when not socket-activated
    policy_dir: str = "/run/systemd/generator"  # where the generator writes the units' [X-LiveUpdate]
    env_dir: str = "/run/luod/env"
    max_fds_total: int = 4096
    busy_retries: int = 5
    dbus: bool = True  # serve io.liveupdate.Agent1 on the system bus
    systemctl: tuple[str, ...] = ("systemctl",)  # asks PID 1 about kexec jobs (a TOML array)
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


BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _toml_text(text: str) -> bool:
    """No character TOML refuses in a comment or a basic string (control characters but tab)."""
    return all(c == "\t" or " " <= c != "\x7f" for c in text)


def _plain_string(value: str) -> bool:
    """A TOML basic string without escapes: no quote, backslash or control character between its quotes."""
    inner = value[1:-1]
    return len(value) >= 2 and value[0] == value[-1] == '"' and not {'"', "\\"} & set(inner) and _toml_text(inner)


def simple_settings(data: bytes) -> Optional[dict[str, Any]]:
    """The settings of a file that is, line by line, only blank lines, comments, at most one ``[agent]``
    header before any setting, and ``key = value`` with a bare key and a value that is a basic string
    without escapes, a decimal integer or a boolean; None for anything else, which is left to tomllib.
    luod reads its configuration at every start, before READY=1, and tomllib with its imports (re,
    datetime, string, and the regular expressions it compiles) costs that start more than all the rest:
    the shipped /usr/lib/luod/luod.toml (every setting commented out) and the few lines an administrator
    writes to /etc/luod need none of it.  What this reads, tomllib reads the same (tests/test_core.py)."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    if "\r" in text.replace("\r\n", "\n"):  # a lone CR, which TOML refuses
        return None
    settings: dict[str, Any] = {}
    header = False
    for raw in text.split("\n"):
        line = raw.removesuffix("\r").strip(" \t")
        if not line or line.startswith("#"):
            if not _toml_text(line):
                return None
            continue
        if line == "[agent]":
            if header:  # a table defined twice: tomllib refuses it
                return None
            header = True
            continue
        key, equals, value = line.partition("=")
        key, value = key.rstrip(" \t"), value.lstrip(" \t")
        # A key before [agent] is outside the table, a key set twice refused: tomllib's to judge.
        if not (header and equals and key and BARE_KEY.issuperset(key)) or key in settings:
            return None
        if value in ("true", "false"):
            settings[key] = value == "true"
        elif value.isascii() and value.isdigit() and (value == "0" or value[0] != "0"):
            settings[key] = int(value)
        elif _plain_string(value):
            settings[key] = value[1:-1]
        else:
            return None
    return settings


def parse(path: str) -> dict[str, Any]:
    """The settings of one file, by key."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InvalidRequest(f"{path}: {e}") from None
    settings = simple_settings(data)
    if settings is not None:
        return settings
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415 - only for what simple_settings leaves to it
    else:  # RHEL 9 and Debian 11 have Python 3.9
        import tomli as tomllib  # noqa: PLC0415

    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidRequest(f"{path}: {e}") from None
    agent: dict[str, Any] = doc.get("agent", {})
    return agent


def load(files: Iterable[str]) -> Config:
    values: dict[str, Any] = {}
    defaults = Config._field_defaults
    for path in files:
        for key, value in parse(path).items():
            if key not in defaults:
                raise InvalidRequest(f"{path}: unknown setting agent.{key}")
            # The one array (systemctl) is kept as a tuple: a Config cannot change behind its readers' backs.
            expected = list if type(defaults[key]) is tuple else type(defaults[key])
            if type(value) is not expected:
                raise InvalidRequest(f"{path}: agent.{key} must be a {expected.__name__}")
            values[key] = tuple(value) if expected is list else value
    config = Config(**values)
    if config.backend not in BACKENDS:
        raise InvalidRequest(f"agent.backend must be one of {', '.join(BACKENDS)}, not {config.backend!r}")
    return config
