"""The pre-flight checks about where a live update goes: the loaded kernel and the memory it will need.

- The loaded kernel must be there, loaded with ``kho=on liveupdate=on``, and speak the running kernel's LUO
  format (``kernel_format``): a different ``luo-vN`` makes the new kernel panic, a different ``memfd-vN``
  loses every session.  An image whose format cannot be read counts as different.
- The memfds the update will carry must fit (``headroom``).

Each check is built once by luod and called by the broker's pre-flight; the decisions are pure functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Callable

from luo_systemd import headroom
from luo_systemd.api import Problem
from luo_systemd.errors import UnreadableImage
from luo_systemd.kernel_format import ImageFormats, format_mismatches
from luo_systemd.kexec import LoadedState, Loader, cmdline_problems

Check = Callable[[], "list[Problem]"]


def loaded_kernel_problems(state: LoadedState, running: Callable[[], ImageFormats]) -> list[str]:
    if not state.loaded:
        return ["no kernel is loaded for the kexec (liveupdatectl prepare loads one)"]
    out = cmdline_problems(state.cmdline) if state.cmdline is not None else []
    if state.formats is None:
        return [*out, f"the loaded kernel's LUO format is unknown: {state.unknown_why}"]
    try:
        now = running()
    except UnreadableImage as e:
        return [*out, f"the running kernel's LUO format is unknown: {e} (see agent.running_kernel_image)"]
    return out + [
        f"{m}: the new kernel would not understand what this one hands over"
        for m in format_mismatches(now, state.formats)
    ]


def loaded_kernel_check(loader: Loader) -> Check:
    def check() -> list[Problem]:
        try:
            state = loader.state()
        except OSError as e:
            return [Problem("", f"cannot tell whether a kernel is loaded: {e.strerror or e}")]
        return [Problem("", p) for p in loaded_kernel_problems(state, loader.running_formats)]

    return check


def memfd_costs(memfds: Iterable[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(unit, pinned, resident) for each memfd, a file held twice counted once."""
    seen: set[tuple[int, int]] = set()
    out = []
    for unit, fd in memfds:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append((unit, *headroom.memfd_cost(st.st_size, st.st_blocks)))
    return out


def memory_check(
    memfds: Callable[[], Iterable[tuple[str, int]]], margin_mib: int, meminfo: str = "/proc/meminfo"
) -> Check:
    def check() -> list[Problem]:
        with open(meminfo) as f:
            available = headroom.mem_available(f.read())
        why = headroom.refusal(headroom.headroom(memfd_costs(memfds()), available, margin_mib << 20))
        return [Problem("", why)] if why else []

    return check
