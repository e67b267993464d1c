"""Names: systemd's fd-name and unit-name rules, and the LUO session names the agent uses.

stdlib only (the generator and the hooks import it).
"""

from __future__ import annotations

from luo_systemd.errors import InvalidName

FDNAME_MAX = 255
UNIT_NAME_MAX = 255
SESSION_NAME_MAX = 63  # uapi.LIVEUPDATE_SESSION_NAME_LENGTH less the NUL (not imported: the hook needs no ioctls)

MANIFEST_SESSION = "luod"  # the agent's own session; its token 0 is the manifest
SESSION_PREFIX = "luod/"

UNIT_TYPES = ("service", "socket", "scope", "target", "mount", "swap", "path", "timer", "slice", "device", "automount")
# What systemd allows in a unit name's prefix and instance (unit_name_is_valid()); checked without re, which
# costs the generator more than its work.
UNIT_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:-_.\\")


def check_fd_name(name: str) -> str:
    """systemd's fdname_is_valid(): 1-255 printable ASCII characters, no ':'."""
    if not name:
        raise InvalidName("fd name is empty")
    if len(name) > FDNAME_MAX:
        raise InvalidName(f"fd name is longer than {FDNAME_MAX} characters")
    if name.isascii() and name.isprintable() and ":" not in name:  # the same rule, without a loop per character
        return name
    bad = next((c for c in name if not 0x20 <= ord(c) <= 0x7E or c == ":"), None)
    if bad is not None:
        raise InvalidName(f"fd name {name!r} contains {bad!r} (allowed: printable ASCII except ':')")
    return name


def is_unit_name(name: str) -> bool:
    """PREFIX.TYPE or PREFIX@INSTANCE.TYPE (a template has an empty instance)."""
    stem, dot, unit_type = name.rpartition(".")
    prefix, _, instance = stem.partition("@")
    return (
        len(name) <= UNIT_NAME_MAX
        and bool(dot and prefix)
        and unit_type in UNIT_TYPES
        and UNIT_NAME_CHARS.issuperset(prefix)
        and UNIT_NAME_CHARS.issuperset(instance)
    )


def check_unit_name(name: str) -> str:
    if not is_unit_name(name):
        raise InvalidName(f"{name!r} is not a valid unit name")
    return name


def template_of(unit: str) -> str | None:
    """'qemu@vm1.service' -> 'qemu@.service'; None for a unit that is no template instance."""
    prefix, at, rest = unit.partition("@")
    if not at:
        return None
    return f"{prefix}@{rest[rest.rfind('.') :]}"


def check_client_session_name(name: str) -> str:
    """Names a unit gives its own client sessions: like fd names, and no '/'."""
    check_fd_name(name)
    if "/" in name:
        raise InvalidName(f"session name {name!r} contains '/'")
    return name


def _bounded(name: str) -> str:
    """Keeps a session name within 63 bytes, deterministically: long names end in a hash of the whole."""
    raw = name.encode()
    if len(raw) <= SESSION_NAME_MAX:
        return name
    import hashlib  # noqa: PLC0415 - loads OpenSSL: not for the generator, which imports this module

    digest = hashlib.sha256(raw).hexdigest()[:16]
    return raw[: SESSION_NAME_MAX - len(digest) - 1].decode("ascii", "ignore") + "~" + digest


def unit_session_name(unit: str) -> str:
    """The outgoing LUO session that carries a unit's fds: 'luod/UNIT' (hashed past 63 bytes)."""
    return _bounded(SESSION_PREFIX + unit)


def client_session_name(unit: str, name: str) -> str:
    """A client session a unit asked for by name: 'luod/UNIT/NAME' (hashed past 63 bytes)."""
    return _bounded(f"{SESSION_PREFIX}{unit}/{name}")
