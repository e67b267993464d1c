"""The per-unit and per-boot commands import only what they need: luo-hook runs at every start and stop of
an opted-in unit, the generator at every boot and daemon-reload.  How long they take is bench/run.py's
business; this checks the modules, which cannot flake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from luo_systemd.generator import hook_command
from tests.harness import TOP, python_path

NEVER = ("asyncio", "dbus_next", "ctypes", "hashlib", "ssl", "dataclasses", "subprocess", "sysconfig")
NOT_FOR_THE_HOOK = ("typing", "json", "re", "socket", "enum", "array", "luo_systemd.policy")
# luo_systemd.records says why for the generator's:
NOT_FOR_THE_GENERATOR = ("typing", "json", "re", "socket", "collections", "enum", "functools")

# Runs a command as its script would, then prints the modules it loaded, one a line (stdout is free: the
# commands log to stderr or /dev/kmsg).  The probe itself imports nothing.
PROBE = """
import sys
before = set(sys.modules)
sys.argv = sys.argv[1:]
with open(sys.argv[0]) as f:
    code = compile(f.read(), sys.argv[0], "exec")
try:
    exec(code, {"__name__": "__main__", "__file__": sys.argv[0]})
except SystemExit:
    pass
sys.stdout.write("\\n".join(sorted(set(sys.modules) - before)))
"""


def loaded(argv: list[str], env: dict[str, str]) -> set[str]:
    # -S: site's imports (a venv's .pth files) are no part of the command.
    env = dict(env, PYTHONPATH=python_path())
    out = subprocess.run(
        [sys.executable, "-S", "-c", PROBE, *argv], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return set(out.stdout.split())


@pytest.fixture
def hook_script() -> str:
    """The file the generator's drop-ins run (``python3 -I -S .../hook.py VERB UNIT``)."""
    return hook_command().split()[-1]


@pytest.mark.parametrize(
    ("verb", "extra_env"),
    [
        ("start", {}),  # an ordinary start
        ("start", {"LIVEUPDATE_RESTORED": "1"}),  # after a live update: talks to luod
        ("started", {"LIVEUPDATE_RESTORED": "1"}),
        ("stop", {}),
    ],
)
def test_hook_imports_only_the_light_client(hook_script: str, verb: str, extra_env: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LIVEUPDATE_RESTORED"}
    env.update(extra_env, LUOD_SOCKET="/nonexistent/luod.sock")  # luod unreachable: the hook logs, exits 0
    modules = loaded([hook_script, verb, "demo.service"], env)
    assert not {m.split(".")[0] for m in modules} & {*NEVER, *NOT_FOR_THE_HOOK}, sorted(modules)
    talks = verb != "start" or extra_env
    assert ("luo_systemd.varlink" in modules) == bool(talks), sorted(modules)


def test_the_vm_restore_imports_only_the_light_clients() -> None:
    """luo-qemu start after a live update runs in the blackout, before QEMU: no configuration parser, no
    subprocess, none of the modules luo-hook avoids (luod unreachable here: it fails after its imports).  The
    script is the packages' /usr/bin/luo-qemu."""
    env = dict(os.environ, LIVEUPDATE_RESTORED="1", LUOD_SOCKET="/nonexistent/luod.sock")
    modules = loaded([str(TOP / "packaging" / "luo-qemu"), "start", "luo-qemu@demo.service"], env)
    assert "luo_systemd.qmp" in modules and "luo_systemd.varlink" in modules, sorted(modules)
    heavy = {*NEVER, *NOT_FOR_THE_HOOK, "tomllib", "tomli", "select", "luo_systemd.vmconfig", "luo_systemd.config"}
    assert not {m.split(".")[0] for m in modules} & heavy and not set(modules) & heavy, sorted(modules)


def test_generator_imports_no_agent_machinery(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "demo.service").write_text("[Service]\nExecStart=/bin/true\n[X-LiveUpdate]\n")
    out = tmp_path / "out"
    env = dict(os.environ, SYSTEMD_UNIT_PATH=str(units))
    modules = loaded([str(TOP / "generators" / "luo-systemd-generator"), str(out), str(out), str(out)], env)
    assert (out / "demo.service.d" / "50-liveupdate.conf").exists(), "the generator ran"
    assert not {m.split(".")[0] for m in modules} & {*NEVER, *NOT_FOR_THE_GENERATOR}, sorted(modules)
