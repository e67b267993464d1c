"""The journal side of luod: MESSAGE_IDs with a catalog entry each, the field journalctl -u matches."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
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


def test_lines_about_a_unit_carry_the_field_journalctl_u_matches(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="luod"):
        journal.event(journal.PRESERVED, "Preserved 1 fd(s) of demo.service", unit="demo.service", fdname="cache")
        journal.event(journal.MANIFEST, "Manifest written")
    about, other = caplog.records
    assert vars(about)["OBJECT_SYSTEMD_UNIT"] == "demo.service" and vars(about)["LUO_FDNAME"] == "cache"
    assert vars(about)["MESSAGE_ID"] == journal.PRESERVED
    assert "OBJECT_SYSTEMD_UNIT" not in vars(other)


def test_the_journal_handler_sends_the_event_fields() -> None:
    """What luod's handler hands to sd_journal_sendv() (journald itself is in the nspawn and qemu tiers)."""
    sent: list[tuple[str, ...]] = []
    handler = journal.JournalHandler("luod")
    handler.sendv = lambda *fields: sent.append(fields)
    logger = logging.getLogger("luod.test-handler")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.log(25, "Preserved 1 fd(s)", extra={"MESSAGE_ID": journal.PRESERVED, **journal.about("demo.service")})
    finally:
        logger.removeHandler(handler)
    fields = dict(f.split("=", 1) for f in sent[0])
    assert fields["MESSAGE"] == "Preserved 1 fd(s)" and fields["PRIORITY"] == "5"  # NOTICE
    assert fields["SYSLOG_IDENTIFIER"] == "luod" and fields["MESSAGE_ID"] == journal.PRESERVED
    assert fields["OBJECT_SYSTEMD_UNIT"] == "demo.service" and fields["CODE_FUNC"]
    assert not [k for k in fields if not k.isupper()], "journald drops lower-case fields"
