"""A small sample of bench/fuzz.py's cases against a real luod (the bench command runs >= 10,000)."""

from __future__ import annotations

from pathlib import Path

from bench.fuzz import run


def test_a_fuzzed_luod_stays_up_answers_by_name_and_leaks_no_fds(tmp_path: Path) -> None:
    figures, resources = run(300, tmp_path, random_seed=11)
    assert figures.cases >= 250
    assert figures.failures == []
    assert resources["fds_after"] <= resources["fds_before"], resources
