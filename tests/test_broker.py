"""The broker in-process on the emulator: the policies that need a clock (OnNoReturn=, ReturnTimeoutSec=)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import pytest

from luo_systemd.api import Caller
from luo_systemd.broker import Broker, BrokerConfig
from luo_systemd.ownedfd import OwnedFd
from luo_systemd.policy import Policy, parse_policy
from luo_systemd.state import NoFdStore
from tests.contract.scenarios import digest, memfd
from tests.harness import Emulator, restore

ROOT = Caller(uid=0, pid=os.getpid(), unit=None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def broker_on(emulator: Emulator, policies: dict[str, str], clock: Clock, env_dir: Path) -> Broker:
    def policy_of(unit: str) -> Optional[Policy]:
        return parse_policy([policies[unit]]) if unit in policies else None

    return Broker(emulator.backend, policy_of, NoFdStore(), BrokerConfig(env_dir=str(env_dir)), clock=clock)


@pytest.mark.parametrize("on_no_return", ["keep", "discard"])
def test_a_unit_that_does_not_come_back(emulator: Emulator, tmp_path: Path, on_no_return: str) -> None:
    policies = {"vm.service": f"[X-LiveUpdate]\nOnNoReturn={on_no_return}\nReturnTimeoutSec=60\n"}
    clock = Clock()
    before = broker_on(emulator, policies, clock, tmp_path)
    before.store(ROOT, "vm.service", [("ram", OwnedFd(memfd("ram", b"guest memory")))])  # the broker takes it
    emulator.load()
    before.arm(ROOT, force=True)  # force: the agent under test is no '@' process
    assert before.preserve(ROOT, "vm.service") == 1
    emulator.live_update()

    after = broker_on(emulator, policies, clock, tmp_path)
    assert restore(after) is not None
    assert (tmp_path / "vm.service").read_text() == "LIVEUPDATE_RESTORED=1\nLIVEUPDATE_COUNT=1\n"
    assert after.next_expiry() == 60
    clock.now += 59
    assert after.expire_orphans() == [] and after.phase.value == "restored"
    clock.now += 2
    assert after.expire_orphans() == ["vm.service"]
    assert after.phase.value == "idle" and not (tmp_path / "vm.service").exists()
    if on_no_return == "keep":
        kept = after.list_fds(ROOT, "vm.service")
        assert [(f.name, f.state) for f in kept] == [("ram", "stored")], "kept for the next update"
        ram = after.units["vm.service"].stored["ram"].held.fd
        assert digest(ram) == hashlib.sha256(b"guest memory").hexdigest()
    else:
        assert "vm.service" not in after.units, "discarded"
