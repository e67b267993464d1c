"""``liveupdatectl verify``: did the last live update give every opted-in unit its fds back?

After a live update luod writes what the manifest carried (``last_update_file``, in /run: it belongs to
this boot; ``runfiles.LastUpdate``).  verify compares it with luod's status: a unit has its fds back once its restore
finished (luo-finish@UNIT.service, or the unit itself with Finish=explicit); it is pending until then, failed
if luod could not restore it, discarded if it never came back.  Counters are named like systemd 262's
``KexecsCount``.
"""

from __future__ import annotations

from luo_systemd.errors import ExitCode
from luo_systemd.records import Choice

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Optional

    from luo_systemd.runfiles import LastUpdate


class Outcome(Choice):
    RESTORED = "restored"  # the unit has its fds back and finished its restore
    PENDING = "pending"  # restored by luod, the unit has not finished (not started yet?)
    FAILED = "failed"  # luod could not restore it
    DISCARDED = "discarded"  # luod no longer holds it (OnNoReturn=discard, or discarded by hand)


class Verdict(Choice):
    OK = "ok"
    PENDING = "pending"
    FAILED = "failed"
    NONE = "none"  # this boot did not follow a live update

    @property
    def exit_code(self) -> int:
        return {
            Verdict.OK: 0,
            Verdict.PENDING: ExitCode.BUSY,
            Verdict.FAILED: ExitCode.FAILURE,
            Verdict.NONE: ExitCode.NOT_FOUND,
        }[self]


def verify(last: Optional[LastUpdate], status: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict on the last live update from what it carried and luod's ``Status`` now."""
    if last is None:
        return {"verdict": Verdict.NONE.value, "LiveUpdatesCount": 0, "units": [], "problems": []}
    held = {u["unit"]: u for u in status["units"]}
    failed = {p["unit"] for p in status["problems"]}
    units = []
    for unit in sorted(last.units):
        if unit in failed:
            outcome = Outcome.FAILED
        elif unit not in held:
            outcome = Outcome.DISCARDED
        else:
            outcome = Outcome.RESTORED if held[unit]["finished"] else Outcome.PENDING
        units.append({"unit": unit, "carried": last.units[unit], "outcome": outcome.value})
    outcomes = [u["outcome"] for u in units]
    if "" in failed or Outcome.FAILED in outcomes or Outcome.DISCARDED in outcomes:
        verdict = Verdict.FAILED
    elif Outcome.PENDING in outcomes:
        verdict = Verdict.PENDING
    else:
        verdict = Verdict.OK
    return {
        "verdict": verdict.value,
        "LiveUpdatesCount": last.update_count,
        "CarriedUnitsCount": len(units),
        "RestoredUnitsCount": outcomes.count(Outcome.RESTORED),
        "PendingUnitsCount": outcomes.count(Outcome.PENDING),
        "FailedUnitsCount": outcomes.count(Outcome.FAILED) + outcomes.count(Outcome.DISCARDED),
        "CarriedFdsCount": sum(last.units.values()),
        "previous_kernel": last.previous_kernel,
        "written_usec": last.written_usec,
        "units": units,
        "problems": list(status["problems"]),
    }


def format_verdict(v: Mapping[str, Any]) -> str:
    if v["verdict"] == Verdict.NONE.value:
        return "This boot did not follow a live update."
    lines = [
        f"Live update {v['LiveUpdatesCount']} from kernel {v['previous_kernel']}: {v['verdict']}",
        f"  {v['RestoredUnitsCount']}/{v['CarriedUnitsCount']} unit(s) have their fds back "
        f"({v['CarriedFdsCount']} fd(s) and session(s) carried)",
    ]
    lines += [f"  {u['unit']}: {u['outcome']} ({u['carried']} carried)" for u in v["units"]]
    lines += [f"  problem: {p['unit'] + ': ' if p['unit'] else ''}{p['message']}" for p in v["problems"]]
    return "\n".join(lines)
