"""liveupdatectl verify's verdict from what the manifest carried and luod's status afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from luo_systemd.errors import ExitCode
from luo_systemd.manifest import CarriedFd, CarriedUnit, FdKind, Manifest
from luo_systemd.runfiles import last_update_of, read_last_update, write_last_update
from luo_systemd.verify import Verdict, format_verdict, verify

MANIFEST = Manifest(
    3,
    1_700_000_000_000_000,
    "7.2.13-luo",
    (
        CarriedUnit("a.service", "luod/a.service", (CarriedFd("cache", FdKind.MEMFD, 0, token=1),)),
        CarriedUnit("b.service", "luod/b.service", (CarriedFd("x", FdKind.MEMFD, 0, token=1),), (("s", "luod/b/s"),)),
    ),
)


def status(units: dict[str, bool], problems: tuple[dict[str, str], ...] = ()) -> dict[str, Any]:
    return {"units": [{"unit": u, "finished": f} for u, f in units.items()], "problems": list(problems)}


def test_round_trip_and_all_back(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "last-update.json")
    write_last_update(path, last_update_of(MANIFEST))
    last = read_last_update(path)
    assert last == last_update_of(MANIFEST)
    v = verify(last, status({"a.service": True, "b.service": True}))
    assert v["verdict"] == "ok" and Verdict.OK.exit_code == 0
    assert (v["LiveUpdatesCount"], v["CarriedUnitsCount"], v["RestoredUnitsCount"], v["CarriedFdsCount"]) == (
        3,
        2,
        2,
        3,
    )
    assert format_verdict(v).splitlines()[:2] == [
        "Live update 3 from kernel 7.2.13-luo: ok",
        "  2/2 unit(s) have their fds back (3 fd(s) and session(s) carried)",
    ]


def test_pending_failed_discarded_and_none() -> None:
    last = last_update_of(MANIFEST)
    v = verify(last, status({"a.service": True, "b.service": False}))
    assert v["verdict"] == "pending" and v["PendingUnitsCount"] == 1 and Verdict.PENDING.exit_code == ExitCode.BUSY
    v = verify(last, status({"a.service": True}))
    assert v["verdict"] == "failed" and [u["outcome"] for u in v["units"]] == ["restored", "discarded"]
    v = verify(last, status({"a.service": True, "b.service": False}, ({"unit": "b.service", "message": "EIO"},)))
    assert v["verdict"] == "failed" and v["FailedUnitsCount"] == 1
    v = verify(None, status({}))
    assert v["verdict"] == "none" and Verdict.NONE.exit_code == ExitCode.NOT_FOUND
    assert format_verdict(v) == "This boot did not follow a live update."
