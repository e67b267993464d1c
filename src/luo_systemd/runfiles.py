"""Files written whole or not at all: the small JSON files in /run/luod that liveupdatectl and luod share (the
kernel liveupdatectl loaded, what the last live update carried; read as "absent" when missing), and luod's
metrics textfile."""

from __future__ import annotations

import os

from luo_systemd.records import NamedTuple
from luo_systemd.varlink import dumps, loads  # json's C half: json imports re

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Optional

    from luo_systemd.manifest import Manifest


def write_atomically(path: str, text: str) -> None:
    """Readers see the old file or the new one, never a part (the temporary name ends in .tmp, which
    node_exporter's textfile collector ignores)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, doc: Any) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    write_atomically(path, dumps(doc))


def read_json(path: str) -> Any:
    """The document, or None if there is no file."""
    try:
        with open(path, "rb") as f:
            return loads(f.read())
    except FileNotFoundError:
        return None


# What the last live update carried, for ``liveupdatectl verify`` and the metrics: luod writes it at the end of
# the restore, which every restored unit's Finish waits for (so here, not in luo_systemd.verify: its import
# cost more than the write).
class LastUpdate(NamedTuple):  # not a dataclass: see luo_systemd.records
    update_count: int  # the manifest's: live updates behind this boot ("count" in the file)
    previous_kernel: str
    written_usec: int
    units: Mapping[str, int]  # unit -> fds and sessions carried


def last_update_of(manifest: Manifest) -> LastUpdate:
    return LastUpdate(
        manifest.update_count,
        manifest.kernel,
        manifest.written_usec,
        {u.unit: len(u.fds) + len(u.client_sessions) for u in manifest.units},
    )


def write_last_update(path: str, last: LastUpdate) -> None:
    doc = last._asdict()
    doc["count"] = doc.pop("update_count")  # as luod always wrote it (tuple has a method named count)
    write_json(path, doc)


def read_last_update(path: str) -> Optional[LastUpdate]:
    doc = read_json(path)
    if doc is None:
        return None
    return LastUpdate(int(doc["count"]), str(doc["previous_kernel"]), int(doc["written_usec"]), dict(doc["units"]))
