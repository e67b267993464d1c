"""luod's metrics as a node_exporter textfile (the textfile collector reads ``*.prom`` in one directory).

``render`` is a pure function of what luod knows (its ``Status`` value, the last live update, the
pre-flight); ``TextfileWriter`` adds the one thing a snapshot cannot tell, when each carried unit finished
its restore, and replaces the file whole, so node_exporter never reads half of it.  See luod(8).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from luo_systemd.runfiles import LastUpdate, write_atomically
from luo_systemd.verify import Outcome, verify

PHASES = ("idle", "armed", "restored")


@dataclasses.dataclass(frozen=True)
class Sample:
    status: Mapping[str, Any]  # luod's status without the device probe (broker.summary())
    opted_in: int  # units with an [X-LiveUpdate] section
    carried_bytes: Mapping[str, int]  # unit -> bytes of the memfds the next live update carries
    last: Optional[LastUpdate]  # what the live update behind this boot carried (None: a cold boot)
    finished_usec: Mapping[str, int]  # unit -> when it finished its restore (CLOCK_REALTIME, µs)
    kernel_loaded: bool  # a kernel is loaded for the next kexec
    preflight_problems: Optional[int]  # None: the pre-flight could not run


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    """Integers exactly (byte counts beyond float's 6 digits of %g), others as Python's shortest repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(s: Sample) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, text: str, rows: Sequence[tuple[Mapping[str, str], float]]) -> None:
        out.extend((f"# HELP {name} {text}", f"# TYPE {name} {kind}"))
        for labels, value in rows:
            shown = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{shown}}} {number(value)}" if shown else f"{name} {number(value)}")

    units = s.status["units"]
    metric(
        "luo_phase",
        "gauge",
        "luod's phase: idle, armed (a live update is under way) or restored (units have not finished).",
        [({"phase": p}, s.status["phase"] == p) for p in PHASES],
    )
    metric("luo_units_opted_in", "gauge", "Units with an [X-LiveUpdate] section.", [({}, s.opted_in)])
    metric(
        "luo_unit_held_fds",
        "gauge",
        "Files and sessions luod holds for a unit.",
        [({"unit": u["unit"]}, u["stored"] + u["restored"] + u["sessions"]) for u in units],
    )
    metric(
        "luo_unit_carried_bytes",
        "gauge",
        "Bytes of the memfds the next live update carries for a unit (holes included: what a preserve pins).",
        [({"unit": unit}, size) for unit, size in sorted(s.carried_bytes.items())],
    )
    metric(
        "luo_live_updates_total",
        "counter",
        "Live updates behind this boot (systemd 262 calls its own count KexecsCount).",
        [({}, s.status["live_update_count"])],
    )
    verdict = verify(s.last, s.status)
    metric(
        "luo_unit_last_live_update_result",
        "gauge",
        "Outcome of the live update behind this boot for each unit it carried (1 for the outcome).",
        [({"unit": u["unit"], "result": o.value}, u["outcome"] == o.value) for u in verdict["units"] for o in Outcome],
    )
    if s.last is not None:
        metric(
            "luo_unit_last_live_update_blackout_seconds",
            "gauge",
            "From the last preserve before the kexec to the unit's finished restore in the new kernel.",
            [
                ({"unit": unit}, (s.finished_usec[unit] - s.last.written_usec) / 1e6)
                for unit in sorted(s.last.units)
                if unit in s.finished_usec
            ],
        )
    metric("luo_kernel_loaded", "gauge", "1 if a kernel is loaded for the next kexec.", [({}, s.kernel_loaded)])
    ran = s.preflight_problems is not None
    metric(
        "luo_preflight_ok",
        "gauge",
        "1 if a live update would lose nothing now (liveupdatectl preflight), 0 if not or it could not run; "
        "without a loaded kernel that alone is a problem.",
        [({}, ran and s.preflight_problems == 0)],
    )
    if ran:
        metric(
            "luo_preflight_problems", "gauge", "Problems the pre-flight finds now.", [({}, s.preflight_problems or 0)]
        )
    return "\n".join(out) + "\n"


class TextfileWriter:
    """Writes the textfile when asked; remembers when each unit of the last live update finished."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pending: set[str] = set()  # carried units seen before they finished
        self.finished_usec: dict[str, int] = {}

    def note_finished(self, status: Mapping[str, Any], last: Optional[LastUpdate]) -> None:
        """Called at every change: a unit seen pending and now finished finished now.  (A luod restarted
        after the restore never saw it pending and leaves its blackout out rather than guess.)"""
        if last is None:
            return
        for u in status["units"]:
            if u["unit"] not in last.units:
                continue
            if not u["finished"]:
                self.pending.add(u["unit"])
            elif u["unit"] in self.pending:
                self.pending.discard(u["unit"])
                self.finished_usec[u["unit"]] = time.time_ns() // 1000

    def write(self, text: str) -> bool:
        """False when the directory does not exist (node_exporter's textfile collector is not set up)."""
        if not os.path.isdir(os.path.dirname(self.path)):
            return False
        write_atomically(self.path, text)
        return True
