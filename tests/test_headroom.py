"""Memory headroom: what a preserve pins (holes filled) against MemAvailable, with a real sparse memfd."""

from __future__ import annotations

import os
from pathlib import Path

from luo_systemd import headroom
from luo_systemd.kexec_preflight import memfd_costs, memory_check

GiB, MiB = 1 << 30, 1 << 20
MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:    {kib} kB\n"


def test_a_sparse_memfd_pins_its_whole_size() -> None:
    fd = os.memfd_create("sparse", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, GiB + 1)
        os.pwrite(fd, b"x" * 4096, 0)
        [(unit, pinned, resident)] = memfd_costs([("vm.service", fd), ("vm.service", os.dup(fd))])
        assert (unit, pinned) == ("vm.service", GiB + headroom.PAGE_SIZE), "rounded up to a page, holes filled"
        assert 4096 <= resident < 64 * 1024, "only the written page is resident"
    finally:
        os.close(fd)


def test_refusal_names_the_heaviest_units() -> None:
    costs = [("a.service", 3 * GiB, 0), ("b.service", GiB, GiB), ("c.service", 2 * GiB, MiB), ("d.service", MiB, 0)]
    h = headroom.headroom(costs, available=4 * GiB, margin=256 * MiB)
    assert [u.unit for u in h.units] == ["a.service", "c.service", "b.service", "d.service"]
    assert h.to_fill == 5 * GiB
    assert headroom.refusal(h) == (
        "not enough memory: the preserve pins 6.0 GiB of memfds, 5.0 GiB of it holes to fill, but only 4.0 GiB "
        "is available and 256.0 MiB is kept as margin (heaviest: a.service 3.0 GiB, c.service 2.0 GiB, "
        "b.service 1.0 GiB)"
    )
    assert headroom.refusal(headroom.headroom(costs, available=6 * GiB, margin=256 * MiB)) is None


def test_the_margin_counts() -> None:
    costs = [("a.service", GiB, 0)]
    assert headroom.refusal(headroom.headroom(costs, GiB + 255 * MiB, 256 * MiB)) is not None
    assert headroom.refusal(headroom.headroom(costs, GiB + 256 * MiB, 256 * MiB)) is None


def test_memory_check_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO.format(kib=512 * 1024))
    fd = os.memfd_create("big", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 2 * GiB)
        check = memory_check(lambda: [("big.service", fd)], 256, str(meminfo))
        [problem] = check()
        assert problem.unit == "" and "heaviest: big.service 2.0 GiB" in problem.message
        meminfo.write_text(MEMINFO.format(kib=3 * 1024 * 1024))
        assert check() == []
    finally:
        os.close(fd)
