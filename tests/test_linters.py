"""Linters run as tests: ruff (lint and format) on the tree, mypy --strict on the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def run(*argv: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=TOP, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_check() -> None:
    run("ruff", "check", ".")


def test_ruff_format() -> None:
    run("ruff", "format", "--check", ".")


def test_mypy_strict() -> None:
    run("mypy")
