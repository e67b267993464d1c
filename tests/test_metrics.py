"""The metrics textfile: render is a pure function of luod's status; node_exporter scrapes it in test_e2e."""

from __future__ import annotations

import re
from pathlib import Path

from luo_systemd.metrics import Sample, TextfileWriter, render
from luo_systemd.runfiles import LastUpdate

STATUS = {
    "phase": "restored",
    "supported": True,
    "live_update_count": 3,
    "units": [
        {"unit": "a.service", "stored": 2, "preserved": 0, "restored": 1, "sessions": 1, "finished": False},
        {"unit": 'we"ird.service', "stored": 1, "preserved": 0, "restored": 0, "sessions": 0, "finished": True},
    ],
    "problems": [{"unit": "gone.service", "message": "could not be restored: EIO"}],
}
LAST = LastUpdate(3, "7.2.0", 1_000_000_000, {"a.service": 2, "gone.service": 1, 'we"ird.service': 1})


def sample(**kw: object) -> Sample:
    args: dict[str, object] = dict(
        status=STATUS,
        opted_in=4,
        carried_bytes={"a.service": 1 << 40},
        last=LAST,
        finished_usec={'we"ird.service': 1_002_500_000},
        kernel_loaded=True,
        preflight_problems=2,
    )
    args.update(kw)
    return Sample(**args)  # type: ignore[arg-type]


def samples(text: str) -> dict[str, str]:
    return dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))


def test_every_family_has_help_and_type_and_follows_the_naming_rules() -> None:
    text = render(sample())
    families = {m.group(1) for m in re.finditer(r"^([a-z_]+)[{ ]", text, re.M)}
    for name in families:
        assert f"# HELP {name} " in text and f"# TYPE {name} " in text, name
        assert name.startswith("luo_") and (name.endswith("_total") == (f"# TYPE {name} counter" in text))
    assert "luo_unit_last_live_update_blackout_seconds" in families


def test_values() -> None:
    got = samples(render(sample()))
    assert got["luo_live_updates_total"] == "3"
    assert got['luo_phase{phase="restored"}'] == "1" and got['luo_phase{phase="idle"}'] == "0"
    assert got['luo_unit_held_fds{unit="a.service"}'] == "4"
    assert got['luo_unit_carried_bytes{unit="a.service"}'] == str(1 << 40), "exact, not %g"
    assert got['luo_unit_last_live_update_result{unit="a.service",result="pending"}'] == "1"
    assert got['luo_unit_last_live_update_result{unit="gone.service",result="failed"}'] == "1"
    assert got['luo_unit_last_live_update_result{unit="we\\"ird.service",result="restored"}'] == "1"
    assert got['luo_unit_last_live_update_blackout_seconds{unit="we\\"ird.service"}'] == "2.5"
    assert got["luo_preflight_ok"] == "0" and got["luo_preflight_problems"] == "2"
    assert got["luo_units_opted_in"] == "4" and got["luo_kernel_loaded"] == "1"


def test_a_cold_boot_and_a_preflight_that_could_not_run() -> None:
    got = samples(render(sample(last=None, preflight_problems=None, finished_usec={})))
    assert not [k for k in got if "last_live_update" in k]
    assert got["luo_preflight_ok"] == "0" and "luo_preflight_problems" not in got


def test_the_writer_times_only_units_it_saw_pending(tmp_path: Path) -> None:
    writer = TextfileWriter(str(tmp_path / "luo.prom"))
    writer.note_finished(STATUS, LAST)  # a.service pending; we"ird.service finished before luod looked
    done = dict(STATUS, units=[dict(u, finished=True) for u in STATUS["units"]])  # type: ignore[attr-defined]
    writer.note_finished(done, LAST)
    assert set(writer.finished_usec) == {"a.service"}
    assert writer.write("x 1\n") and (tmp_path / "luo.prom").read_text() == "x 1\n"
    assert not TextfileWriter(str(tmp_path / "absent" / "luo.prom")).write("x 1\n"), "no collector, no file"
