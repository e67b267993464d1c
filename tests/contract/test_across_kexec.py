"""The LUO contract across kexecs, on the emulator (the qemu tier runs the same steps across real kexecs)."""

from __future__ import annotations

import pytest

from tests.contract.scenarios import SCENARIOS, Scenario
from tests.harness import Emulator


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_across_kexec(emulator: Emulator, scenario: Scenario) -> None:
    held: list[int] = []
    for i, step in enumerate(scenario.steps):
        if i:
            result = emulator.live_update()
            assert result["how"] == "kexec", result
        held = step(emulator.backend, held)
    assert held == []
    assert emulator.status()["warnings"] == []
