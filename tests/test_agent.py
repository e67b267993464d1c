"""luod as a real process: private system-style dbus-daemon, the emulator, Varlink and D-Bus clients in
processes placed in unit cgroups."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from luo_systemd import errors
from luo_systemd.agent import config_arguments
from luo_systemd.inhibitor import until_change_or_recheck
from tests.contract.scenarios import PAGE, digest, memfd, pattern
from tests.harness import NOBODY, Agent, DBusDaemon, Emulator, UnitTree

STORE_CACHE = """
fd = os.memfd_create("cache", os.MFD_CLOEXEC)
os.write(fd, bytes.fromhex({content!r}))
with varlink.Client(sock) as c:
    c.call("Store", {{"names": ["cache"]}}, [fd])
    print(json.dumps(c.call("List")[0]))
"""


def test_store_preserve_kexec_restore_finish(agent: Agent, emulator: Emulator) -> None:
    content = pattern("demo", 3 * PAGE)
    out = agent.run_as("demo.service", STORE_CACHE.format(content=content.hex()))
    assert out.returncode == 0, out.stderr
    assert '"name": "cache"' in out.stdout and '"state": "stored"' in out.stdout

    with pytest.raises(errors.PreflightFailed, match="no kernel is loaded for the kexec"):
        agent.call("Arm")
    assert agent.call("Preserve", {"unit": "demo.service"})[0] == {"preserved": 0}, "not armed: nothing to do"
    emulator.load()
    problems, _ = agent.call("Arm")
    assert problems == {"problems": []}
    got, _ = agent.call("Preserve", {"unit": "demo.service"})
    assert got == {"preserved": 1}
    emulator.live_update()  # the machine kexecs; the old agent dies with the old kernel
    agent.stop()
    agent.start()

    status, _ = agent.call("Status")
    assert status["phase"] == "restored" and status["live_update_count"] == 1
    env = (agent.env_dir / "demo.service").read_text()
    assert "LIVEUPDATE_RESTORED=1" in env and "LIVEUPDATE_COUNT=1" in env
    reply, fds = agent.call("Retrieve", {"unit": "demo.service"})
    assert reply == {"names": ["cache"]} and len(fds) == 1
    assert digest(fds[0]) == hashlib.sha256(content).hexdigest()
    os.close(fds[0])
    finished, _ = agent.call("Finish", {"unit": "demo.service"})
    assert finished == {"finished": True}
    assert not (agent.env_dir / "demo.service").exists()
    status, _ = agent.call("Status")
    assert status["phase"] == "idle"
    listing, _ = agent.call("List", {"unit": "demo.service"})
    assert [(f["name"], f["state"]) for f in listing["fds"]] == [("cache", "stored")]  # carried forward


def test_the_metrics_textfile_follows_each_change(agent: Agent) -> None:
    """luod rewrites node_exporter's textfile when its state changes (scraped for real in test_e2e)."""
    agent.textfile.parent.mkdir()  # node_exporter's directory appears: luod writes at the next change

    def wait_for(line: str, present: bool = True) -> str:
        deadline = time.monotonic() + 10
        while True:
            text = agent.textfile.read_text() if agent.textfile.exists() else ""
            if (line in text.splitlines()) == present or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

    out = agent.run_as("demo.service", STORE_CACHE.format(content=pattern("demo", 3 * PAGE).hex()))
    assert out.returncode == 0, out.stderr
    text = wait_for('luo_unit_held_fds{unit="demo.service"} 1')
    assert f'luo_unit_carried_bytes{{unit="demo.service"}} {3 * PAGE}' in text.splitlines()
    assert "luo_units_opted_in 2" in text.splitlines() and "luo_live_updates_total 0" in text.splitlines()
    assert not list(agent.textfile.parent.glob("*.tmp")), "replaced whole"
    agent.call("Discard", {"unit": "demo.service"})
    text = wait_for('luo_unit_held_fds{unit="demo.service"} 1', present=False)
    assert "demo.service" not in text


def test_a_unit_reaches_only_its_own_fds(agent: Agent) -> None:
    out = agent.run_as("demo.service", STORE_CACHE.format(content="00"))
    assert out.returncode == 0, out.stderr
    probe = """
    for method, params in (("List", {"unit": "demo.service"}), ("Retrieve", {"unit": "demo.service"}),
                           ("Remove", {"unit": "demo.service", "names": ["cache"]}),
                           ("Finish", {"unit": "demo.service"}), ("Preserve", {"unit": "demo.service"})):
        try:
            varlink.Client(sock).call(method, params)
            print(method, "allowed")
        except errors.AccessDenied as e:
            print(method, "denied:", e)
    """
    out = agent.run_as("other.service", probe, uid=NOBODY)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 5 and all(" denied: " in line for line in lines), out.stdout
    assert "may act only on its own unit, not on demo.service" in lines[0]


def test_control_is_root_only(agent: Agent) -> None:
    probe = """
    for method in ("Arm", "Cancel", "Discard"):
        try:
            varlink.Client(sock).call(method, {"unit": "demo.service"} if method == "Discard" else None)
        except errors.AccessDenied as e:
            print(method, "denied:", e)
    """
    out = agent.run_as("demo.service", probe, uid=NOBODY)
    assert out.stdout.count("denied:") == 3, out.stdout + out.stderr
    assert "is for root only" in out.stdout


def test_a_pipe_is_refused_at_store_time(agent: Agent) -> None:
    probe = """
    r, w = os.pipe()
    try:
        varlink.Client(sock).call("Store", {"names": ["p"]}, [r])
    except errors.InvalidFd as e:
        print("refused:", e)
    print(json.dumps(varlink.Client(sock).call("List")[0]))
    """
    out = agent.run_as("demo.service", probe)
    assert "refused: Refusing to store 'p' of demo.service: a pipe" in out.stdout, out.stdout + out.stderr
    assert '{"fds": []}' in out.stdout


def test_a_manifest_it_does_not_understand_is_refused(agent_unstarted: Agent, emulator: Emulator) -> None:
    """A manifest from another luo-systemd version: refused loudly, never guessed at; the sessions stay."""
    backend = emulator.backend
    with backend.device() as dev:
        luod = dev.create_session(b"luod")
        unit = dev.create_session(b"luod/demo.service")
    manifest = memfd("manifest", json.dumps({"format": "io.liveupdate.manifest", "version": 99}).encode())
    backend.preserve_fd(luod, manifest, 0)
    backend.preserve_fd(unit, memfd("cache", b"precious"), 1)
    emulator.live_update()
    agent_unstarted.start()
    status, _ = agent_unstarted.call("Status")
    assert status["phase"] == "idle" and status["units"] == []
    assert len(status["problems"]) == 1
    assert "manifest version 99 is not understood" in status["problems"][0]["message"]
    assert "Refusing the manifest of the previous kernel" in agent_unstarted.log.read_text()
    with backend.device() as dev:  # the unit's session was not touched: still there for a newer agent
        assert dev.retrieve_session(b"luod/demo.service") >= 0


def test_a_kernel_without_luo_is_reported(tmp_path: Path, bus: DBusDaemon, tree: UnitTree) -> None:
    emu_dir = tmp_path / "emu"
    emu_dir.mkdir()
    emulator = Emulator(emu_dir, without_luo=True)
    agent = Agent(tmp_path, emulator, bus, tree)
    try:
        agent.start()
        status, _ = agent.call("Status")
        assert status["supported"] is False and status["backend"] == "emulator"
        problems, _ = agent.call("Preflight")
        assert any(
            "LUO is not usable" in p["message"] and "no Live Update Orchestrator" in p["message"]
            for p in problems["problems"]
        ), problems
    finally:
        agent.cleanup()
        emulator.stop()


def test_a_bus_that_is_gone_leaves_luod_serving_varlink(tmp_path: Path, emulator: Emulator, tree: UnitTree) -> None:
    """dbus.service stops in the shutdown that a live update is; a luod that reaches the bus only then (a slow
    boot) must carry on without it: its exit would drop every session before the kexec."""
    bus_dir = tmp_path / "bus"
    bus_dir.mkdir()
    gone = DBusDaemon(bus_dir)
    gone.stop()  # as dbus.service in the shutdown: nothing answers at the bus's address
    agent = Agent(tmp_path, emulator, gone, tree)
    agent.opt_in("demo.service")
    try:
        agent.start(wait=False)  # not for the bus: it never joins
        assert agent.notify.ready.wait(30), agent.log.read_text()
        fd = memfd("cache", pattern("kept without a bus", PAGE))
        try:
            agent.call("Store", {"unit": "demo.service", "names": ["cache"]}, [fd])
        finally:
            os.close(fd)
        deadline = time.monotonic() + 10
        while "Not on the system bus" not in agent.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "Not on the system bus" in agent.log.read_text()
        assert agent.proc is not None and agent.proc.poll() is None, agent.log.read_text()
        status, _ = agent.call("Status")
        assert [u["stored"] for u in status["units"]] == [1]
    finally:
        agent.cleanup()


def test_luod_joins_the_bus_once_it_answers(
    tmp_path: Path, emulator: Emulator, bus: DBusDaemon, tree: UnitTree
) -> None:
    """luod is not ordered after dbus.socket, which listens only after sysinit.target: after a live update
    every restored unit waits for luod.  It serves Varlink meanwhile and joins the bus once it answers."""
    hidden = bus.socket.with_name("not-listening-yet")
    bus.socket.rename(hidden)  # the bus's socket is not there yet, as early in a boot
    agent = Agent(tmp_path, emulator, bus, tree)
    try:
        agent.start(wait=False)
        assert agent.notify.ready.wait(30), agent.log.read_text()
        deadline = time.monotonic() + 10
        while "Not on the system bus" not in agent.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "serving Varlink only until it answers" in agent.log.read_text()
        status, _ = agent.call("Status")
        assert status["phase"] == "idle" and not agent.notify.on_bus.is_set()
        hidden.rename(bus.socket)  # dbus.socket listens
        assert agent.notify.on_bus.wait(10), agent.log.read_text()
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.cleanup()


def test_a_busy_device_is_retried_then_reported(agent: Agent, emulator: Emulator) -> None:
    with emulator.backend.device():  # someone else (systemd >= 261, say) holds /dev/liveupdate
        started = time.monotonic()
        problems, _ = agent.call("Preflight")
        waited = time.monotonic() - started
    assert any("another process has /dev/liveupdate open" in p["message"] for p in problems["problems"])
    assert 1.0 < waited < 5.0, f"bounded backoff: {waited:.2f}s"
    problems, _ = agent.call("Preflight")
    assert not any("/dev/liveupdate" in p["message"] for p in problems["problems"])


STORE_TWICE = """
fd = os.memfd_create("cache", os.MFD_CLOEXEC)
os.write(fd, b"one file under two names")
with varlink.Client(sock) as c:
    c.call("Store", {"names": ["a", "b"]}, [fd, fd])  # the kernel preserves a file only once
"""
TWICE = "'b' of demo.service is the same file as 'a' of demo.service: the kernel preserves a file only once"


def dbus_preflight(agent: Agent) -> list[list[object]]:
    """Preflight over D-Bus, as root."""
    assert agent.bus is not None
    code = f"""
    import asyncio
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = {agent.bus.address!r}
    from luo_systemd.dbus_client import AgentClient
    async def main():
        c = await AgentClient.connect()
        print(json.dumps((await c.call("Preflight", "", [])).body[0]))
    asyncio.run(main())
    """
    out = agent.run_as("demo.service", code)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_a_unit_with_a_problem_is_left_out_and_the_others_go_ahead(agent_unstarted: Agent, emulator: Emulator) -> None:
    """demo.service (OnPreflightFailure= left at its default, leave-out) stored one file twice: it is named
    and left out, other.service is carried.  A SIGKILL of luod after the arm does not bring demo back in."""
    agent = agent_unstarted
    agent.fdstore = {}  # luod's own fd store, handed back on restart as systemd does
    agent.start()
    assert agent.run_as("demo.service", STORE_TWICE).returncode == 0
    content = pattern("other", 2 * PAGE)
    assert agent.run_as("other.service", STORE_CACHE.format(content=content.hex())).returncode == 0
    emulator.load()
    left_out = {"unit": "demo.service", "message": TWICE, "left_out": True}
    assert agent.call("Preflight")[0] == {"problems": [left_out]}
    assert dbus_preflight(agent) == [["demo.service", TWICE, True]]
    assert agent.call("Arm")[0] == {"problems": [left_out]}, "Arm goes ahead and names the unit it leaves out"
    agent.stop(signal.SIGKILL)
    agent.start()
    status, _ = agent.call("Status")
    assert status["phase"] == "armed" and status["problems"] == [left_out]
    assert agent.call("Preserve", {"unit": "demo.service"})[0] == {"preserved": 0}
    assert agent.call("Preserve", {"unit": "other.service"})[0] == {"preserved": 1}
    assert "Leaving demo.service out of the live update: " + TWICE in agent.log.read_text()
    kexec = emulator.live_update()
    assert sorted(kexec["carried"]) == ["luod", "luod/other.service"], kexec  # type: ignore[arg-type]
    agent.stop()
    agent.lose_fdstore()  # the machine went down, and luod's fd store with it
    agent.start()
    status, _ = agent.call("Status")
    assert [u["unit"] for u in status["units"]] == ["other.service"] and status["problems"] == []
    reply, fds = agent.call("Retrieve", {"unit": "other.service"})
    assert reply == {"names": ["cache"]} and digest(fds[0]) == hashlib.sha256(content).hexdigest()
    os.close(fds[0])
    assert agent.call("List", {"unit": "demo.service"})[0] == {"fds": []}, "freed at the kexec"


def test_a_unit_that_says_refuse_refuses_the_live_update(agent_unstarted: Agent, emulator: Emulator) -> None:
    agent = agent_unstarted
    agent.opt_in("demo.service", "[X-LiveUpdate]\nOnPreflightFailure=refuse\n")
    agent.start()
    assert agent.run_as("demo.service", STORE_TWICE).returncode == 0
    emulator.load()
    assert agent.call("Preflight")[0] == {"problems": [{"unit": "demo.service", "message": TWICE, "left_out": False}]}
    assert dbus_preflight(agent) == [["demo.service", TWICE, False]]
    with pytest.raises(errors.PreflightFailed, match="demo.service: " + TWICE):
        agent.call("Arm")
    assert agent.call("Status")[0]["phase"] == "idle"
    problems, _ = agent.call("Arm", {"force": True})
    assert problems["problems"][0]["left_out"] is False, "forced: the unit is not left out, it is tried"


@pytest.mark.parametrize(
    "argv",
    [[], ["--config", "a.toml"], ["--config", "a.toml", "--config", "b.toml"], ["--config=a.toml"], ["--conf", "a"]],
)
def test_config_files_from_the_command_line_as_argparse_reads_them(argv: list[str]) -> None:
    """luod takes ``--config FILE`` pairs without argparse (see config_arguments): the same files."""
    import argparse  # noqa: PLC0415 - the reference

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", action="append")
    assert config_arguments(argv) == (parser.parse_args(argv).config if argv else None)


def test_a_config_option_without_a_file_is_refused_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        config_arguments(["--config", "-x"])
    assert stop.value.code == 2 and "expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize("spins", range(5))
def test_a_task_waiting_for_changes_ends_when_cancelled_as_a_change_comes(spins: int) -> None:
    """luod's periodic tasks (the metrics, the shutdown block) loop on "a change or RECHECK_SEC"; at SIGTERM
    they are cancelled.  A cancellation a few loop turns after a change must end the task: with
    asyncio.wait_for, Python 3.11 swallowed it for 0-2 turns (gh-86296), and luod never exited."""

    async def scenario() -> bool:
        changed = asyncio.Event()

        async def periodic() -> None:
            while True:
                changed.clear()
                await until_change_or_recheck(changed)

        task = asyncio.ensure_future(periodic())
        await asyncio.sleep(0.01)
        changed.set()
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        return task in done and task.cancelled()

    assert asyncio.run(scenario())
