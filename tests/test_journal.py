"""The journal side of luod: MESSAGE_IDs with a catalog entry each, the field journalctl -u matches."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from luo_systemd import journal

TOP = Path(__file__).resolve().parent.parent
CATALOG = TOP / "catalog" / "luo-systemd.catalog"
IDS = {k: v for k, v in vars(journal).items() if k.isupper() and isinstance(v, str) and len(v) == 32}


def test_every_message_id_is_explained_in_the_catalog() -> None:
    entries = dict(re.findall(r"^-- ([0-9a-f]{32})\nSubject: (.*)$", CATALOG.read_text(), re.M))
    assert set(entries) == set(IDS.values())
    assert len(set(IDS.values())) == len(IDS), "one ID per event"


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="skipped because journalctl is missing")
def test_journalctl_compiles_the_catalog(tmp_path: Path) -> None:
    """journalctl --update-catalog, as the packages' triggers run it, into a private root."""
    (tmp_path / "usr/lib/systemd/catalog").mkdir(parents=True)
    (tmp_path / "var/lib/systemd/catalog").mkdir(parents=True)
    shutil.copy(CATALOG, tmp_path / "usr/lib/systemd/catalog")
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True, capture_output=True)
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"], check=True, capture_output=True, text=True
    ).stdout
    assert {line.split()[0] for line in listed.splitlines()} == set(IDS.values())
    lost = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--dump-catalog", journal.LOST], check=True, capture_output=True, text=True
    ).stdout
    assert "Subject: Files of @OBJECT_SYSTEMD_UNIT@ were lost in a live update" in lost
    assert "What to do:" in lost


def captured(level: int = journal.DEBUG) -> list[journal.Record]:
    """Records luod's logger hands to its sink from here on (the fixture below puts the sink back)."""
    records: list[journal.Record] = []
    journal.log.sink, journal.log.level = records.append, level
    return records


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    sink, level = journal.log.sink, journal.log.level
    yield
    journal.log.sink, journal.log.level = sink, level


def test_lines_about_a_unit_carry_the_field_journalctl_u_matches() -> None:
    records = captured()
    journal.event(journal.PRESERVED, "Preserved 1 fd(s) of demo.service", unit="demo.service", fdname="cache")
    journal.event(journal.MANIFEST, "Manifest written")
    about, other = records
    assert about.fields["OBJECT_SYSTEMD_UNIT"] == "demo.service" and about.fields["LUO_FDNAME"] == "cache"
    assert about.fields["MESSAGE_ID"] == journal.PRESERVED
    assert "OBJECT_SYSTEMD_UNIT" not in other.fields


def test_lines_below_the_level_are_dropped_and_arguments_formatted() -> None:
    records = captured(journal.WARNING)
    journal.log.info("not shown %s", "at all")
    journal.log.warning("Failed to preserve '%s' of %s: %s", "x", "demo.service", "too big")
    (line,) = records
    assert line.message == "Failed to preserve 'x' of demo.service: too big" and line.level == journal.WARNING
    assert line.code_func == "test_lines_below_the_level_are_dropped_and_arguments_formatted"


def test_the_journal_sink_sends_the_event_fields() -> None:
    """What luod's sink hands to sd_journal_sendv() (journald itself is in the nspawn and qemu tiers)."""
    sent: list[tuple[str, ...]] = []
    sink = journal.JournalSink("luod")
    sink.sendv = lambda *fields: sent.append(fields)
    journal.log.sink, journal.log.level = sink, journal.DEBUG
    extra = {"MESSAGE_ID": journal.PRESERVED, **journal.about("demo.service")}
    journal.log.log(journal.NOTICE, "Preserved %d fd(s)", 1, extra=extra)
    fields = dict(f.split("=", 1) for f in sent[0])
    assert fields["MESSAGE"] == "Preserved 1 fd(s)" and fields["PRIORITY"] == "5"  # NOTICE
    assert fields["SYSLOG_IDENTIFIER"] == "luod" and fields["MESSAGE_ID"] == journal.PRESERVED
    assert fields["OBJECT_SYSTEMD_UNIT"] == "demo.service" and fields["CODE_FUNC"]
    assert not [k for k in fields if not k.isupper()], "journald drops lower-case fields"


def test_an_internal_error_carries_its_traceback() -> None:
    records = captured()
    try:
        raise KeyError("boom")
    except KeyError:
        journal.log.exception("Internal error in %s", "Store")
    (line,) = records
    assert line.message == "Internal error in Store" and line.level == journal.ERROR
    assert line.exception.startswith("Traceback") and "KeyError: 'boom'" in line.exception


def test_logging_records_reach_the_same_sink() -> None:
    """asyncio's and dbus-next's records, once luod has routed logging (after READY=1)."""
    records = captured(journal.INFO)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        journal.route_logging()
        logging.getLogger("asyncio").debug("below luod's level")
        logging.getLogger("asyncio").error("Task exception was never retrieved", extra={"MESSAGE_ID": "x"})
    finally:
        root.handlers[:], root.level = handlers, level
    (line,) = records
    assert line.message == "Task exception was never retrieved" and line.logger == "asyncio"
    assert line.level == journal.ERROR and line.fields == {"MESSAGE_ID": "x"}
