"""luo-hook stop|start|started UNIT: the commands the generator adds to opted-in units.  See luo-hook(8).

- ``stop`` (ExecStop=, after the unit's own): asks luod to preserve the unit's fds if a live update is
  under way; the agent decides, so the hook needs no state.
- ``start`` (ExecStartPre=, only in a boot that may follow a live update): gets the unit's restored fds
  from luod, if any, and pushes them into the unit's own fd store (FDSTORE=1), so the main process receives
  them in LISTEN_FDS/LISTEN_FDNAMES.  It asks whatever its environment says: the unit is ordered after
  luod's socket only, so it may start before luod has written its environment file.
- ``started`` (luo-finish@UNIT.service, which runs once the unit has started, in a boot after a live update
  and only while luod has the unit's environment file): finishes the unit's restore (unless the unit
  finishes explicitly).

Thin and idempotent, stdlib only (no asyncio, no D-Bus: it runs on the blackout path for every unit), and it
never holds up a start or a shutdown: when there is nothing to do or luod is unreachable, it logs one line
and exits 0.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing itself costs ~15 ms to import: too much for every unit start
if TYPE_CHECKING:
    from collections.abc import Sequence

    from luo_systemd.varlink import Client

# Imports beyond os and sys happen only where needed: luo_systemd.varlink and service_manager, which keep to
# the C halves of json and socket (tests/test_imports.py checks).

SOCKET = os.environ.get("LUOD_SOCKET", "/run/luod/liveupdate.sock")
TIMEOUTS = {"stop": 120.0, "start": 30.0, "started": 30.0}  # preserving fills holes: big memfds take time


def log(message: str, priority: int = 6) -> None:
    # stderr of an Exec*= command goes to the journal; '<N>' sets the priority.
    print(f"<{priority}>luo-hook: {message}", file=sys.stderr, flush=True)


def client(timeout: float) -> Client:
    from luo_systemd.varlink import Client  # noqa: PLC0415

    return Client(SOCKET, timeout=timeout)


def push_to_fd_store(fds: Sequence[tuple[str, int]]) -> None:
    from luo_systemd.service_manager import notify  # noqa: PLC0415

    notify([(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", [fd]) for name, fd in fds])


def stop(unit: str) -> str:
    with client(TIMEOUTS["stop"]) as luod:
        preserved = luod.call("Preserve", {"unit": unit})[0]["preserved"]
    if preserved:
        return f"preserved {preserved} fd(s) of {unit}"
    return f"nothing preserved for {unit}: no live update under way, or the unit is left out of it"


def start(unit: str) -> str:
    with client(TIMEOUTS["start"]) as luod:
        reply, fds = luod.call("Retrieve", {"unit": unit})
    if not fds:
        return f"nothing was restored for {unit}"
    try:
        named = list(zip(reply["names"], fds))
        push_to_fd_store(named)
    finally:
        for fd in fds:
            os.close(fd)
    return f"handed {len(named)} restored fd(s) to {unit}: {' '.join(n for n, _ in named)}"


def started(unit: str) -> str:
    with client(TIMEOUTS["started"]) as luod:
        finished = luod.call("Finish", {"unit": unit})[0]["finished"]
    return f"finished the live update of {unit}" if finished else f"{unit} had nothing to finish"


VERBS = {"stop": stop, "start": start, "started": started}


def main(argv: Sequence[str] = ()) -> int:
    args = list(argv or sys.argv)[1:]
    if len(args) != 2 or args[0] not in VERBS:
        print("usage: luo-hook stop|start|started UNIT", file=sys.stderr)
        return 2
    verb, unit = args
    try:
        log(VERBS[verb](unit))
    except Exception as e:  # LuoError, OSError: never hold up a start or a shutdown; the unit goes on
        log(f"{verb} {unit}: {e}", priority=3)
    return 0


if __name__ == "__main__":
    # The generator's drop-ins run this file as "python3 -I -S .../luo_systemd/hook.py VERB UNIT": without
    # site, the directory that holds the package is on sys.path only once we put it there (last: it never
    # shadows the standard library).
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
