"""Logging that journald understands: structured fields and MESSAGE_IDs on the key events.

When stderr is the journal (``$JOURNAL_STREAM`` matches it), records go to journald natively with their
fields; otherwise to stderr with ``<N>`` priority prefixes when run by systemd, plain text else.
``$SYSTEMD_LOG_LEVEL`` (debug, info, notice, warning, err, ...) sets the level.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

# MESSAGE_IDs of the events a user searches for (journalctl MESSAGE_ID=...).
STORED = "0b8e3d1c6c1a4f3b9f2a5e1d7c4b2a10"
PRESERVED = "6f1d2c3b4a5948e7a1b2c3d4e5f60711"
RESTORED = "a3c5e7f9b1d34f6e8a0c2e4f6a8b0c12"
FINISHED = "5d7f9b1d3f5a47c9b1d3f5a7c9e1b313"
REFUSED = "e2a4c6e8f0b24d6f8a1c3e5a7c9eb114"
MANIFEST = "94b6d8fa1c3e4a5c7e9fb1d3f5a7c915"

_LEVELS = {"emerg": 50, "alert": 50, "crit": 50, "err": 40, "warning": 30, "notice": 25, "info": 20, "debug": 10}
_PRIORITY = {50: 2, 40: 3, 30: 4, 25: 5, 20: 6, 10: 7}

log = logging.getLogger("luod")


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return bool(ino) and f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


class PriorityFormatter(logging.Formatter):
    """'<N>message' lines, which journald and systemd's stderr capture turn into priorities."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup(name: str) -> None:
    logging.addLevelName(25, "NOTICE")
    root = logging.getLogger()
    level = _LEVELS.get(os.environ.get("SYSTEMD_LOG_LEVEL", "info"), logging.INFO)
    root.setLevel(level)
    handler: logging.Handler
    if stderr_is_journal():
        from systemd.journal import JournalHandler  # noqa: PLC0415 - only when the journal is there

        handler = JournalHandler(SYSLOG_IDENTIFIER=name)
    elif os.environ.get("INVOCATION_ID"):
        handler = logging.StreamHandler()
        handler.setFormatter(PriorityFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"{name}: %(message)s"))
    root.handlers[:] = [handler]


def event(
    message_id: str,
    message: str,
    *,
    unit: Optional[str] = None,
    fdname: Optional[str] = None,
    level: int = logging.INFO,
) -> None:
    extra = {"MESSAGE_ID": message_id}
    if unit:
        extra["LUO_UNIT"] = unit
    if fdname:
        extra["LUO_FDNAME"] = fdname
    log.log(level, message, extra=extra)
