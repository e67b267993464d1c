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

# MESSAGE_IDs of the events a user searches for (journalctl MESSAGE_ID=...), made with `systemd-id128 new`;
# catalog/luo-systemd.catalog explains each one (journalctl -x).
STORED = "ea15948d37264175aed0c7b2d9535f0a"
PRESERVED = "21861b15dc5f4affa2d7640099d514f8"
RESTORED = "a66e7f709d264c3b9f61a3f53ae580f3"
FINISHED = "aa7cab18ec4e467895c192864fafb00f"
REFUSED = "9981f867e3174cf3812e188bc18b60eb"
LOST = "002db493dac24aef812b7d304a936c9a"
MANIFEST = "527c2e4193164827afaffdf652f1cc4e"
LEFT_OUT = "4934e7b8cc524d299bd321c22bfe5321"

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


class JournalHandler(logging.Handler):
    """Records to journald's native protocol, with the upper-case ``extra=`` fields (MESSAGE_ID=,
    OBJECT_SYSTEMD_UNIT=, ...) as journal fields.  It calls the C half of python-systemd's journal module
    directly: systemd.journal imports uuid, platform, datetime and traceback, which cost luod's start-up
    (every opted-in unit waits for it after a live update) more than all of its logging."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        from systemd._journal import sendv  # noqa: PLC0415 - only when the journal is there

        self.sendv = sendv
        self.identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = [
                f"MESSAGE={self.format(record)}",
                f"PRIORITY={_PRIORITY.get(record.levelno, 6)}",
                f"SYSLOG_IDENTIFIER={self.identifier}",
                f"LOGGER={record.name}",
                f"CODE_FILE={record.pathname}",
                f"CODE_LINE={record.lineno}",
                f"CODE_FUNC={record.funcName}",
            ]
            fields += [f"{key}={value}" for key, value in vars(record).items() if key.isupper()]
            if record.exc_text:
                fields.append(f"EXCEPTION_TEXT={record.exc_text}")
            self.sendv(*fields)
        except Exception:
            self.handleError(record)


def setup(name: str) -> None:
    logging.addLevelName(25, "NOTICE")
    root = logging.getLogger()
    level = _LEVELS.get(os.environ.get("SYSTEMD_LOG_LEVEL", "info"), logging.INFO)
    root.setLevel(level)
    handler: logging.Handler
    if stderr_is_journal():
        handler = JournalHandler(name)
    elif os.environ.get("INVOCATION_ID"):
        handler = logging.StreamHandler()
        handler.setFormatter(PriorityFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"{name}: %(message)s"))
    root.handlers[:] = [handler]


def about(unit: str) -> dict[str, str]:
    """The field that puts a line of root's into ``journalctl -u UNIT`` (journalctl matches
    OBJECT_SYSTEMD_UNIT=UNIT from senders with _UID=0)."""
    return {"OBJECT_SYSTEMD_UNIT": unit}


def event(
    message_id: str,
    message: str,
    *,
    unit: Optional[str] = None,
    fdname: Optional[str] = None,
    level: int = logging.INFO,
) -> None:
    extra = {"MESSAGE_ID": message_id, **(about(unit) if unit else {})}
    if fdname:
        extra["LUO_FDNAME"] = fdname
    log.log(level, message, extra=extra)
