"""Small JSON files in /run/luod that liveupdatectl and luod share (the kernel liveupdatectl loaded, what the
last live update carried): written whole or not at all, read as "absent" when missing."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, doc: Any) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    """The document, or None if there is no file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
