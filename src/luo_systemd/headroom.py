"""Memory headroom for a live update: what the preserve will pin against what the machine has available.

PRESERVE_FD pins every page of a memfd up to its size and fills the holes of a sparse one (a 1 GiB memfd
with 4 KiB written costs 1 GiB at preserve time).  The pages already written are in use now and not part
of MemAvailable; the holes are new memory the kernel must find in the middle of the blackout.  So the
pre-flight compares the bytes to fill, plus a margin for the shutdown itself, with MemAvailable, and names
the units that weigh most.  Pure functions; the caller gathers the sizes (``fstat``) and /proc/meminfo.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Optional

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
HEAVIEST_SHOWN = 3


@dataclasses.dataclass(frozen=True)
class UnitMemory:
    unit: str
    pinned: int  # bytes the preserve pins: every memfd's size rounded up to pages, holes filled
    resident: int  # bytes of it already allocated


@dataclasses.dataclass(frozen=True)
class Headroom:
    units: tuple[UnitMemory, ...]  # heaviest first
    available: int  # MemAvailable
    margin: int

    @property
    def pinned(self) -> int:
        return sum(u.pinned for u in self.units)

    @property
    def to_fill(self) -> int:
        return sum(u.pinned - u.resident for u in self.units)

    @property
    def fits(self) -> bool:
        return self.to_fill + self.margin <= self.available


def pinned_size(size: int, page: int = PAGE_SIZE) -> int:
    return -(-size // page) * page


def memfd_cost(size: int, blocks: int, page: int = PAGE_SIZE) -> tuple[int, int]:
    """(pinned, resident) bytes of one memfd from its ``st_size`` and ``st_blocks`` (512-byte units)."""
    pinned = pinned_size(size, page)
    return pinned, min(pinned, blocks * 512)


def headroom(costs: Iterable[tuple[str, int, int]], available: int, margin: int) -> Headroom:
    """``costs``: (unit, pinned, resident) per memfd, each file once."""
    per_unit: dict[str, tuple[int, int]] = {}
    for unit, pinned, resident in costs:
        p, r = per_unit.get(unit, (0, 0))
        per_unit[unit] = (p + pinned, r + resident)
    units = sorted((UnitMemory(u, p, r) for u, (p, r) in per_unit.items()), key=lambda m: (-m.pinned, m.unit))
    return Headroom(tuple(units), available, margin)


def refusal(h: Headroom) -> Optional[str]:
    """Why the live update does not fit in memory, or None."""
    if h.fits:
        return None
    heaviest = ", ".join(f"{u.unit} {size_text(u.pinned)}" for u in h.units[:HEAVIEST_SHOWN])
    return (
        f"not enough memory: the preserve pins {size_text(h.pinned)} of memfds, {size_text(h.to_fill)} of it "
        f"holes to fill, but only {size_text(h.available)} is available and {size_text(h.margin)} is kept as "
        f"margin (heaviest: {heaviest})"
    )


def mem_available(meminfo: str) -> int:
    """MemAvailable from the text of /proc/meminfo, in bytes."""
    for line in meminfo.splitlines():
        key, _, value = line.partition(":")
        if key == "MemAvailable":
            return int(value.split()[0]) * 1024
    raise ValueError("no MemAvailable in /proc/meminfo")


def size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def unit_summary(h: Headroom) -> Sequence[dict[str, object]]:
    return [{"unit": u.unit, "pinned": u.pinned, "resident": u.resident} for u in h.units]
