"""The per-unit and per-boot commands import only what they need: luo-hook runs at every start and stop of
an opted-in unit, the generator at every boot and daemon-reload, and after a live update every opted-in unit
waits for luod's READY=1.  How long they take is bench/run.py's business; this checks the modules, which
cannot flake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from luo_systemd.generator import hook_command
from tests.harness import TOP, Agent, Emulator, UnitTree, luod_command, python_path

NEVER = ("asyncio", "dbus_next", "ctypes", "hashlib", "ssl", "dataclasses", "subprocess", "sysconfig")
NOT_FOR_THE_HOOK = ("typing", "json", "re", "socket", "enum", "array", "luo_systemd.policy")
# luo_systemd.records says why for the generator's:
NOT_FOR_THE_GENERATOR = ("typing", "json", "re", "socket", "collections", "enum", "functools")
# luod up to READY=1 (luo_systemd.agent says why), with a configuration of simple settings
# (luo_systemd.config.simple_settings) such as the shipped one and the harness's.
NOT_BEFORE_READY = (
    *("asyncio", "dbus_next", "subprocess", "hashlib", "logging", "dataclasses", "inspect", "typing", "json"),
    *("re", "socket", "selectors", "signal", "systemd", "luo_systemd.kexec", "luo_systemd.dbus_service"),
    *("tomllib", "tomli", "enum", "collections", "contextlib", "functools", "array", "ctypes"),
)

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


@pytest.mark.parametrize("verb", ["start", "started", "stop"])
def test_hook_imports_only_the_light_client(hook_script: str, verb: str) -> None:
    env = dict(os.environ, LUOD_SOCKET="/nonexistent/luod.sock")  # luod unreachable: the hook logs, exits 0
    modules = loaded([hook_script, verb, "demo.service"], env)
    assert not {m.split(".")[0] for m in modules} & {*NEVER, *NOT_FOR_THE_HOOK}, sorted(modules)
    assert "luo_systemd.varlink" in modules, "each verb talks to luod"


def test_the_vm_restore_imports_only_the_light_clients() -> None:
    """luo-qemu start after a live update runs in the blackout, before QEMU: no configuration parser, no
    subprocess, none of the modules luo-hook avoids (luod unreachable here: it fails after its imports).  The
    script is the packages' /usr/bin/luo-qemu."""
    env = dict(os.environ, LUOD_SOCKET="/nonexistent/luod.sock")  # it asks luod at every start
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


# Put before luod's program as the harness runs it (that of units/luod.service): writes the modules it has
# loaded when it sends READY=1 to $LUOD_MODULES, and when it answers its first Retrieve to $LUOD_MODULES.answer.
READY_PROBE = f"""
import os, sys
sys.path += {python_path().split(":")!r}
from luo_systemd import service_manager
from luo_systemd.broker import Broker
def dump(path):
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
send, retrieve = service_manager.send, Broker.retrieve
def probe(message):
    if message.startswith("READY=1"):
        dump(os.environ["LUOD_MODULES"])
    return send(message)
def first_answer(*args):
    dump(os.environ["LUOD_MODULES"] + ".answer")
    return retrieve(*args)
service_manager.send, Broker.retrieve = probe, first_answer
"""


def test_luod_reaches_ready_without_its_serving_modules(tmp_path: Path, emulator: Emulator, tree: UnitTree) -> None:
    """An empty start, the restore after a live update and the recovery from the fd store."""
    agent = Agent(tmp_path, emulator, None, tree)
    *python, program = agent.command
    agent.command = [*python, READY_PROBE + program]
    agent.fdstore = {}  # kept and handed back, as systemd's fd store

    def ready_modules(start: str) -> set[str]:
        path = tmp_path / f"modules-{start}"
        agent.env = {"LUOD_MODULES": str(path)}
        agent.start()
        modules = set(path.read_text().split())
        assert "luo_systemd.broker" in modules, sorted(modules)
        assert not {m.split(".")[0] for m in modules} & set(NOT_BEFORE_READY), (start, sorted(modules))
        assert not modules & set(NOT_BEFORE_READY), (start, sorted(modules))
        return modules

    try:
        ready_modules("empty")
        agent.opt_in("demo.service")
        fd = os.memfd_create("cache", os.MFD_CLOEXEC)
        try:
            agent.call("Store", {"unit": "demo.service", "names": ["cache"]}, [fd])
        finally:
            os.close(fd)
        agent.stop()
        assert "luo_systemd.state" in ready_modules("recovery") and agent.call("List", {"unit": "demo.service"})[0]
        emulator.load()
        agent.call("Arm")
        assert agent.call("Preserve", {"unit": "demo.service"})[0] == {"preserved": 1}
        emulator.kexec()
        agent.stop()
        agent.lose_fdstore()  # the machine went down with the fd store
        assert "luo_systemd.runfiles" not in ready_modules("restore"), "the last update is written after READY=1"
        (restored,) = agent.call("Retrieve", {"unit": "demo.service"})[1]
        os.close(restored)
        answering = set((tmp_path / "modules-restore.answer").read_text().split())
        assert not answering & {"asyncio", "ctypes"}, "a restored unit's answer waits for no event-loop module"
        assert agent.call("Status")[0]["phase"] == "restored"
        assert json.loads((tmp_path / "last-update.json").read_text())["units"] == {"demo.service": 1}
        assert agent.proc is not None  # and its event loop has loaded (Status waits for it), without OpenSSL:
        assert "libssl" not in Path(f"/proc/{agent.proc.pid}/maps").read_text(), "asyncio without ssl"
    finally:
        agent.cleanup()


def test_the_shipped_configuration_needs_no_toml_parser() -> None:
    """/usr/lib/luod/luod.toml is every setting commented out (luo_systemd.config.simple_settings)."""
    code = (
        "import sys; from luo_systemd import config\n"
        f"assert config.load([{str(TOP / 'packaging' / 'luod.toml')!r}]) == config.Config()\n"
        "print('tomllib' in sys.modules or 'tomli' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=python_path())
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("found", [True, False])
def test_luod_service_finds_the_package_without_site(found: bool) -> None:
    """luod.service runs python3 -I -S and puts the packages' directory on sys.path itself; where the package
    is not there (a pip install: here this run's, into the venv of sys.executable), its program falls back on
    site, which finds it."""
    *python, program = luod_command([str(TOP / "src")] if found else ["/nonexistent"])
    start = "from luo_systemd.agent import main; sys.exit(main())"
    assert python[1:3] == ["-I", "-S"] and program.endswith(start), program
    show = "import luo_systemd.agent; print('site' in sys.modules); print(*sys.path, sep='\\n')"
    out = subprocess.run([*python, program.replace(start, show)], capture_output=True, text=True, check=True)
    with_site, *path = out.stdout.split("\n")[:-1]
    if found:
        assert with_site == "False" and path[-1] == str(TOP / "src"), out.stdout
    else:  # site's directories after ours
        assert with_site == "True" and path.index("/nonexistent") < len(path) - 1, out.stdout
