"""The man pages build without a warning, and document what the code has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from luo_systemd import errors, journal
from luo_systemd.varlink_service import VarlinkService

TOP = Path(__file__).resolve().parent.parent
PAGES = sorted((TOP / "docs" / "man").glob("*.rst"))


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_man_page_builds_strictly(page: Path, tmp_path: Path) -> None:
    rst2man = Path(sys.executable).parent / "rst2man"
    out = tmp_path / page.stem
    proc = subprocess.run([str(rst2man), "--strict", str(page), str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert out.read_text().startswith('.\\" Man page generated from reStructuredText')


def test_luod_page_lists_every_error_method_and_message_id() -> None:
    text = (TOP / "docs" / "man" / "luod.8.rst").read_text()
    missing = [cls.name for cls in errors.all_error_classes() if cls.name not in text]
    missing += [m for m in VarlinkService.methods if f"``{m}``" not in text]
    missing += [
        v for k, v in vars(journal).items() if k.isupper() and isinstance(v, str) and len(v) == 32 and v not in text
    ]
    assert missing == []
