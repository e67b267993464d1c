"""Conventions of the project's shell scripts that a warm machine never shows: every apt-get on the host
waits for a concurrent dpkg lock instead of failing (another apt run, unattended-upgrades, a parallel test)."""

from __future__ import annotations

import re
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for d in ("scripts", "tests/qemu", "tests/nspawn", "packaging") for p in (TOP / d).rglob("*.sh"))
# apt-get where a command starts (not in a message, not after `chroot DIR`): line start, after ; & | { or $(,
# after then/do/else, with any VAR=value prefixes.  A bare "(" is left out: messages say "(apt-get install X)".
APT_GET = re.compile(r"(?:^|[;&|{]|\$\(|\bthen\b|\bdo\b|\belse\b)\s*(?:\w+=\S*\s+)*apt-get\b(.*)")
LOCK = "-o DPkg::Lock::Timeout="


def apt_get_calls(text: str) -> list[str]:
    calls = []
    for line in text.splitlines():
        code = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
        calls += [m.group(1) for m in APT_GET.finditer(code)]
    return calls


def test_the_rule_finds_calls() -> None:
    text = (
        "apt-get update\nx && DEBIAN_FRONTEND=noninteractive apt-get install y\n"
        'chroot "$R" apt-get clean\necho "apt-get z"\ndie "X is missing (apt-get install X)"\n'
    )
    assert apt_get_calls(text) == [" update", " install y"]


def test_every_host_apt_get_waits_for_the_dpkg_lock() -> None:
    assert SCRIPTS, "no scripts found"
    missing = []
    for script in SCRIPTS:
        text = script.read_text()
        # sid-apt.sh passes its options as one array, which carries the timeout.
        array_ok = re.search(r"APT_OPTS=\((?:[^)]*)" + re.escape(LOCK), text) is not None
        for rest in apt_get_calls(text):
            if LOCK in rest or (array_ok and '"${APT_OPTS[@]}"' in rest):
                continue
            missing.append(f"{script.relative_to(TOP)}: apt-get{rest}")
    assert not missing, "apt-get without " + LOCK + "600:\n" + "\n".join(missing)
