"""Files written whole or not at all: the small JSON files in /run/luod that liveupdatectl and luod share (the
kernel liveupdatectl loaded, what the last live update carried; read as "absent" when missing), and luod's
metrics textfile."""

from __future__ import annotations

import os

from luo_systemd.varlink import dumps, loads  # json's C half: luod writes the last update before READY=1

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


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
