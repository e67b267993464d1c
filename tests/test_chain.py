"""Live updates in a row leave luod and luo-emu where the first one left them (bench/chain.py runs 20)."""

from __future__ import annotations

from pathlib import Path

from bench.chain import chain


def test_three_live_updates_in_a_row_leak_nothing(tmp_path: Path) -> None:
    rows = chain(3, 1, tmp_path)
    first, last = rows[0], rows[-1]
    assert last["luod_files"] == first["luod_files"], rows
    assert last["emu_files"] == first["emu_files"], rows
    # the unit's 1 MiB memfd and the manifest's records (a few hundred bytes each, their length varies with
    # the timestamp).  The first update's manifest has one record more: at Arm it carried the session vm0
    # already, so the Preserve appended a record; later ones start at the Preserve.
    assert 1 << 20 < first["emu_held_when_preserved"] < (1 << 20) + 4096, rows
    assert abs(last["emu_held_when_preserved"] - rows[1]["emu_held_when_preserved"]) < 100, rows
    assert last["emu_held_after_finish"] == first["emu_held_after_finish"] == 0, rows
