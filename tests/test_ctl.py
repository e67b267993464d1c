"""liveupdatectl against a real luod (private bus, emulator): verbs, --json, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest

from luo_systemd import ctl
from luo_systemd.errors import ExitCode
from tests.harness import Agent, Emulator

STORE = """
fd = os.memfd_create("cache", os.MFD_CLOEXEC)
with varlink.Client(sock) as c:
    c.call("Store", {"names": ["cache"]}, [fd])
"""


def run(agent: Agent, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = ctl.main(["--config", str(agent.config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_and_list(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run_as("demo.service", STORE).returncode == 0
    code, out, _ = run(agent, capsys, "--json=short", "status")
    status = json.loads(out)
    assert code == 0 and {"phase", "supported", "backend", "live_update_count", "units"} <= set(status)
    assert status["phase"] == "idle" and status["backend"] == "emulator" and status["kexec_loaded"] is False
    assert [u["unit"] for u in status["units"]] == ["demo.service"]
    code, out, _ = run(agent, capsys, "status")
    assert code == 0 and "Phase: idle" in out and "demo.service: 1 stored" in out
    code, out, _ = run(agent, capsys, "list")
    assert code == 0 and out.splitlines()[1].split() == ["demo.service", "cache", "memfd", "stored", "0"]
    code, out, _ = run(agent, capsys, "--json=pretty", "list", "demo.service")
    assert json.loads(out)[0]["name"] == "cache"


def test_preflight_and_dry_run(agent: Agent, emulator: Emulator, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(agent, capsys, "preflight")
    assert code == ExitCode.PREFLIGHT and "no kernel is loaded for the kexec" in out
    code, out, _ = run(agent, capsys, "kexec", "--dry-run", "--kernel", "/proc/self/exe")
    assert code == 0 and "load /proc/self/exe" in out and "kho=on liveupdate=on" in out
    assert "liveupdate.target" in out
    assert json.loads(run(agent, capsys, "--json=short", "status")[1])["kexec_loaded"] is False, "nothing done"
    emulator.load()
    code, out, _ = run(agent, capsys, "preflight")
    assert (code, out.strip()) == (0, "Pre-flight check passed.")


def test_errors_are_one_line_with_exit_codes(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(agent, capsys, "cancel")
    assert code == ExitCode.BUSY and err == "liveupdatectl: No live update is under way\n" and out == ""
    code, _, err = run(agent, capsys, "discard", "nothing.service")
    assert code == ExitCode.NOT_FOUND and "holds nothing for nothing.service" in err
    code, _, err = run(agent, capsys, "finish", "not a unit")
    assert code == ExitCode.INVALID and "is not a valid unit name" in err
    code, _, err = ctl.main(["--config", "/nonexistent.toml", "status"]), *capsys.readouterr()
    assert code == ExitCode.INVALID and "/nonexistent.toml" in err and "Traceback" not in err


def test_discard_and_finish(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    assert agent.run_as("demo.service", STORE).returncode == 0
    code, out, _ = run(agent, capsys, "finish", "demo.service")
    assert code == 0 and "had nothing to finish" in out
    assert run(agent, capsys, "discard", "demo.service")[0] == 0
    assert json.loads(run(agent, capsys, "--json=short", "status")[1])["units"] == []


def test_a_unit_left_out_is_named_and_does_not_fail_the_preflight(
    agent: Agent, emulator: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    store_twice = STORE.replace('["cache"]}, [fd]', '["a", "b"]}, [fd, fd]')
    assert agent.run_as("demo.service", store_twice).returncode == 0
    emulator.load()
    code, out, _ = run(agent, capsys, "preflight")
    assert code == 0, out
    assert "demo.service: 'b' of demo.service is the same file as 'a'" in out
    assert "(left out of the live update)" in out and "the units above are left out" in out
    code, out, _ = run(agent, capsys, "--json=short", "preflight")
    assert code == 0 and [p["left_out"] for p in json.loads(out)["problems"]] == [True]
    agent.call("Arm")
    code, out, _ = run(agent, capsys, "status")
    assert code == 0 and "Phase: armed" in out and "(left out of the live update)" in out.split("Problems:")[1]
