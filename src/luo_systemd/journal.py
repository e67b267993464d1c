"""Logging that journald understands: structured fields and MESSAGE_IDs on the key events.

When stderr is the journal (``$JOURNAL_STREAM`` matches it), records go to journald natively with their
fields; otherwise to stderr with ``<N>`` priority prefixes when run by systemd, plain text else.
``$SYSTEMD_LOG_LEVEL`` (debug, info, notice, warning, err, ...) sets the level.

luod logs through ``log`` here, not through the ``logging`` package: logging and its imports (traceback,
re, threading, string, weakref) cost luod's start-up, which every opted-in unit waits for after a live
update, more than logging does for luod.  The records of the libraries luod uses after READY=1 (asyncio,
dbus-next) reach the same output through ``route_logging``.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

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

# The levels of the logging package (its records map onto them one to one), and syslog's priorities.
DEBUG, INFO, NOTICE, WARNING, ERROR, CRITICAL = 10, 20, 25, 30, 40, 50
_LEVELS = {"emerg": 50, "alert": 50, "crit": 50, "err": 40, "warning": 30, "notice": 25, "info": 20, "debug": 10}
_PRIORITY = {50: 2, 40: 3, 30: 4, 25: 5, 20: 6, 10: 7}


def priority(level: int) -> int:
    return _PRIORITY.get(level, 6)


class Record:
    """One line to log: its text, level, upper-case journal fields and the code that logged it."""

    __slots__ = ("code_file", "code_func", "code_line", "exception", "fields", "level", "logger", "message")

    def __init__(
        self,
        message: str,
        level: int,
        fields: dict[str, object],
        logger: str,
        code: tuple[str, int, str],
        exception: str = "",  # a traceback: log.exception's, or a logging record's exc_text
    ) -> None:
        self.message = message
        self.level = level
        self.fields = fields
        self.logger = logger
        self.code_file, self.code_line, self.code_func = code
        self.exception = exception


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return bool(ino) and f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


class JournalSink:
    """Records to journald's native protocol, with the upper-case fields (MESSAGE_ID=,
    OBJECT_SYSTEMD_UNIT=, ...) as journal fields.  It calls the C half of python-systemd's journal module
    directly: systemd.journal imports uuid, platform, datetime and traceback, which cost luod's start-up
    (every opted-in unit waits for it after a live update) more than all of its logging."""

    def __init__(self, identifier: str) -> None:
        from systemd._journal import sendv  # noqa: PLC0415 - only when the journal is there

        self.sendv = sendv
        self.identifier = identifier

    def __call__(self, record: Record) -> None:
        message = f"{record.message}\n{record.exception}" if record.exception else record.message
        fields = [
            f"MESSAGE={message}",
            f"PRIORITY={priority(record.level)}",
            f"SYSLOG_IDENTIFIER={self.identifier}",
            f"LOGGER={record.logger}",
            f"CODE_FILE={record.code_file}",
            f"CODE_LINE={record.code_line}",
            f"CODE_FUNC={record.code_func}",
        ]
        fields += [f"{key}={value}" for key, value in record.fields.items()]
        if record.exception:
            fields.append(f"EXCEPTION_TEXT={record.exception}")
        try:
            self.sendv(*fields)
        except Exception as e:  # a line that cannot be logged must not end luod
            print(f"{self.identifier}: cannot log to the journal ({e}): {message}", file=sys.stderr, flush=True)


class StderrSink:
    """Lines on stderr: '<N>message' under systemd (journald and systemd's stderr capture turn the prefix
    into a priority), 'NAME: message' else."""

    def __init__(self, name: str, priorities: bool) -> None:
        self.name = name
        self.priorities = priorities

    def __call__(self, record: Record) -> None:
        text = f"{record.message}\n{record.exception}" if record.exception else record.message
        prefix = f"<{priority(record.level)}>" if self.priorities else f"{self.name}: "
        print(prefix + text, file=sys.stderr, flush=True)


class Logger:
    """What luod's modules log through: the methods of a logging.Logger they use, ``extra=`` included
    (upper-case keys become journal fields).  Nothing below ``level`` is formatted."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.level = INFO
        self.sink: Callable[[Record], None] = StderrSink(name, priorities=False)

    def log(self, level: int, message: str, *args: object, extra: Optional[dict[str, str]] = None) -> None:
        self._emit(level, message, args, extra)

    def debug(self, message: str, *args: object, extra: Optional[dict[str, str]] = None) -> None:
        self._emit(DEBUG, message, args, extra)

    def info(self, message: str, *args: object, extra: Optional[dict[str, str]] = None) -> None:
        self._emit(INFO, message, args, extra)

    def warning(self, message: str, *args: object, extra: Optional[dict[str, str]] = None) -> None:
        self._emit(WARNING, message, args, extra)

    def error(self, message: str, *args: object, extra: Optional[dict[str, str]] = None) -> None:
        self._emit(ERROR, message, args, extra)

    def critical(self, message: str, *args: object, extra: Optional[dict[str, str]] = None) -> None:
        self._emit(CRITICAL, message, args, extra)

    def exception(self, message: str, *args: object) -> None:
        """An ERROR with the traceback of the exception being handled."""
        import traceback  # noqa: PLC0415 - only on an internal error

        self._emit(ERROR, message, args, None, traceback.format_exc().rstrip("\n"))

    def _emit(
        self, level: int, message: str, args: tuple[object, ...], extra: Optional[dict[str, str]], exception: str = ""
    ) -> None:
        if level < self.level:
            return
        caller = sys._getframe(2)  # the code that logged (through one of the methods above)
        code = (caller.f_code.co_filename, caller.f_lineno, caller.f_code.co_name)
        fields: dict[str, object] = {k: v for k, v in (extra or {}).items() if k.isupper()}
        self.sink(Record(message % args if args else message, level, fields, self.name, code, exception))


log = Logger("luod")


def setup(name: str) -> None:
    log.level = _LEVELS.get(os.environ.get("SYSTEMD_LOG_LEVEL", "info"), INFO)
    if stderr_is_journal():
        log.sink = JournalSink(name)
    else:
        log.sink = StderrSink(name, priorities=bool(os.environ.get("INVOCATION_ID")))


def route_logging() -> None:
    """The logging package's records (asyncio's, dbus-next's) to luod's output, at luod's level.  Called
    once asyncio is imported, after READY=1."""
    import logging  # noqa: PLC0415 - after READY=1 (see the module's doc)

    formatter = logging.Formatter()

    class ToSink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            exception = formatter.formatException(record.exc_info) if record.exc_info else ""
            fields = {k: v for k, v in vars(record).items() if k.isupper()}
            code = (record.pathname, record.lineno, record.funcName)
            log.sink(Record(message, record.levelno, fields, record.name, code, exception))

    handler = ToSink()
    logging.addLevelName(NOTICE, "NOTICE")
    root = logging.getLogger()
    root.setLevel(log.level)
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
    level: int = INFO,
) -> None:
    extra = {"MESSAGE_ID": message_id, **(about(unit) if unit else {})}
    if fdname:
        extra["LUO_FDNAME"] = fdname
    log.log(level, message, extra=extra)
