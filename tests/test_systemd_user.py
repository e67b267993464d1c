"""Units, generator, hooks and luod under a real systemd manager (``systemd --user`` for root, in a private
mount namespace): a service's memfd crosses an emulated live update and comes back by name in
LISTEN_FDNAMES; and a SIGKILLed luod loses nothing (its own systemd fd store carries its state)."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Emulator, python_path, with_package_dirs
from tests.sdmanager import UserManager, available

TOP = Path(__file__).resolve().parent.parent
DEMO = "luo-demo-cache.service"
FINISHER = f"luo-finish@{DEMO}.service"
FAIL = "/run/luo-demo/fail-the-start"

pytestmark = pytest.mark.skipif(not available()[0], reason=f"skipped because {available()[1]}")


def setup_dirs(tmp: Path) -> tuple[Path, Path]:
    units = tmp / "units"
    units.mkdir(parents=True)
    for name in ("luod.service", "luod.socket"):
        text = (TOP / "units" / name).read_text()
        # A user manager in this private namespace cannot set up mount namespaces (no /run/systemd/inaccessible
        # without PID 1, no /dev/kmsg or /proc/kallsyms to mask): those lines go; the nspawn tests run them all.
        mounts = ("Protect", "TemporaryFileSystem=", "PrivateMounts=", "ReadWritePaths=")
        text = "\n".join(line for line in text.splitlines() if not line.startswith(mounts))
        if name == "luod.service":  # luod runs with -I -S: this run's package directories
            text = with_package_dirs(text)
        (units / name).write_text(text + "\n")
    demo = (TOP / "demo" / "luo-demo-cache.service").read_text()
    demo = demo.replace(
        "ExecStart=/usr/local/bin/luo-demo-cache",
        f"Environment=DEMO_CACHE_MB=8\nExecStart={TOP / 'demo' / 'luo-demo-cache'}\n"
        # A start that fails after the service is up (READY=1), while FAIL exists: its restore stays open.
        f"ExecStartPost=/bin/sh -c '! test -e {FAIL}'",
    )
    (units / "luo-demo-cache.service").write_text(demo)
    generators = tmp / "generators"
    generators.mkdir()
    wrapper = generators / "luo-systemd-generator"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {TOP / "generators" / "luo-systemd-generator"} "$@"\n')
    wrapper.chmod(0o755)
    return units, generators


class Machine:
    """One "boot": a user manager with luod and the demo, on a shared emulator."""

    def __init__(self, tmp: Path, emulator: Emulator, boot: int) -> None:
        units, generators = setup_dirs(tmp / f"boot{boot}")
        self.manager = UserManager(
            tmp / f"boot{boot}" / "manager",
            unit_dirs=[units],
            generator_dirs=[generators],
            environment={"PYTHONPATH": python_path()},
        )
        self.emulator = emulator

    def start(self, agent: bool = True) -> None:
        """``agent=False``: luod.socket only; luod starts with the first unit that wants it."""
        m = self.manager
        m.start()
        config = textwrap.dedent(f"""\
            [agent]
            backend = "emulator"
            emulator_socket = "{self.emulator.socket}"
            policy_dir = "/run/user/0/systemd/generator"
            dbus = false
            metrics_file = ""
            """)
        m.run(["sh", "-c", "mkdir -p /run/luod && cat > /run/luod/luod.toml"], input=config, check=True)
        m.systemctl("start", "luod.socket", *(["luod.service"] if agent else []))

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        code = (
            "import json, sys; from luo_systemd import varlink\n"
            "c = varlink.Client('/run/luod/liveupdate.sock', timeout=30)\n"
            f"print(json.dumps(c.call({method!r}, {params!r})[0]))"
        )
        out = self.manager.run([sys.executable, "-c", code], check=True)
        return dict(json.loads(out.stdout))

    def demo(self) -> dict[str, Any]:
        self.manager.systemctl("start", "luo-demo-cache.service")
        return dict(json.loads(self.manager.run(["cat", "/run/luo-demo/status.json"], check=True).stdout))


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[tuple[Emulator, list[Machine]]]:
    emu_dir = tmp_path / "emu"
    emu_dir.mkdir()
    emulator = Emulator(emu_dir)
    made: list[Machine] = []
    try:
        yield emulator, made
    finally:
        for m in made:
            if m.manager.running:
                m.manager.stop()
        assert "Traceback" not in emulator.stop()


def test_live_update_under_systemd(tmp_path: Path, machines: tuple[Emulator, list[Machine]]) -> None:
    emulator, made = machines
    first = Machine(tmp_path, emulator, 1)
    made.append(first)
    first.start()
    dropin = first.manager.run(
        ["cat", "/run/user/0/systemd/generator/luo-demo-cache.service.d/50-liveupdate.conf"], check=True
    ).stdout
    assert "ExecStartPre=-" in dropin and "NotifyAccess=exec" in dropin
    assert "Wants=luo-finish@%n.service" in dropin and "ExecStartPost=" not in dropin
    before = first.demo()
    assert before["restored"] is False and before["live_update"] is False
    # A user manager cannot tell whether a live update came before: luo-hook start asks luod, and
    # luo-finish@ is pulled in, but runs nothing: luod has no environment file for the demo.
    assert first.manager.wait_for_entry("nothing was restored for luo-demo-cache.service", timeout=10)
    assert first.manager.show(FINISHER, "ConditionResult", "ExecMainPID") == {
        "ConditionResult": "no",
        "ExecMainPID": "0",
    }

    # An agent crash loses nothing: systemd restarts it and hands its fd store back.
    os.kill(first.manager.main_pid("luod.service"), signal.SIGKILL)
    first.manager.systemctl("start", "luod.service")  # waits for the restart's READY=1
    assert [f["name"] for f in first.call("List", {"unit": "luo-demo-cache.service"})["fds"]] == ["cache"]
    assert first.manager.wait_for_entry(
        "Recovered the agent's state from its fd store", unit="luod.service", timeout=10
    )

    emulator.load()
    assert first.call("Arm") == {"problems": []}
    first.manager.systemctl("stop", "luo-demo-cache.service")  # its ExecStop= hook preserves
    assert [(f["name"], f["state"]) for f in first.call("List", {"unit": "luo-demo-cache.service"})["fds"]] == [
        ("cache", "preserved")
    ]
    carried = emulator.live_update()
    assert sorted(carried["carried"]) == ["luod", "luod/luo-demo-cache.service"]  # type: ignore[arg-type]
    first.manager.stop()  # the old kernel's world is gone

    second = Machine(tmp_path, emulator, 2)
    made.append(second)
    second.start(agent=False)  # as after a kexec: the demo starts beside luod (After=luod.socket)
    assert second.manager.show("luod.service", "ActiveState") == {"ActiveState": "inactive"}
    # A start that fails does not finish the live update: luo-finish@ fails with it, unrun.
    second.manager.run(["sh", "-c", f"mkdir -p {os.path.dirname(FAIL)} && touch {FAIL}"], check=True)
    assert second.manager.systemctl("start", DEMO, check=False).returncode != 0
    unrun = {"ActiveState": "inactive", "ExecMainPID": "0"}
    assert second.manager.show(FINISHER, "ActiveState", "ExecMainPID") == unrun
    pending = second.call("Status")
    assert pending["phase"] == "restored" and [u["finished"] for u in pending["units"]] == [False], pending
    second.manager.run(["rm", FAIL], check=True)
    after = second.demo()  # Restart= would do the same: the restored memfd is still luod's to hand over
    assert after["restored"] is True, "the main process got the memfd in LISTEN_FDNAMES=cache"
    assert after["live_update"] is True and after["live_update_count"] == 1, "LIVEUPDATE_RESTORED=1, COUNT=1"
    assert after["sha256"] == before["sha256"]
    assert after["counter_at_start"] > before["counter_at_start"]
    # luo-finish@ finished the demo's live update, after the demo's start job (not within it).
    assert second.manager.wait_for_entry("finished the live update of luo-demo-cache.service", unit=FINISHER)
    finisher = second.manager.show(FINISHER, "Result", "ExecMainStatus", "ExecMainStartTimestampMonotonic")
    assert (finisher["Result"], finisher["ExecMainStatus"]) == ("success", "0"), finisher
    started = second.manager.show(DEMO, "ActiveEnterTimestampMonotonic")["ActiveEnterTimestampMonotonic"]
    assert 0 < int(started) < int(finisher["ExecMainStartTimestampMonotonic"]), (started, finisher)
    status = second.call("Status")
    assert status["phase"] == "idle" and status["live_update_count"] == 1, status
    hook_lines = [line for line in second.manager.journal(DEMO) if "luo-hook" in line]
    assert any("handed 1 restored fd(s) to luo-demo-cache.service: cache" in line for line in hook_lines), hook_lines

    # The demo stored its restored memfd again (the same open file luod handed it): an agent crash after the
    # restore loses nothing either.  systemd keeps one copy of an open file in a fd store and suppresses a
    # second push of it (service_add_fd_store), so luod must not push a file it holds again under a new key.
    os.kill(second.manager.main_pid("luod.service"), signal.SIGKILL)
    second.manager.systemctl("start", "luod.service")
    assert [(f["name"], f["state"]) for f in second.call("List", {"unit": DEMO})["fds"]] == [("cache", "stored")]
