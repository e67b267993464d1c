"""Benchmarks: the per-unit hook and the generator against a bare interpreter start, measured in the same run.

    .venv/bin/python bench/run.py [--runs N]

Prints the median wall time of each command and its ratio to ``python3 -I -S -c pass`` (the floor for any
Python program), plus the emulator's memory while it holds a 1 GiB memfd.  Nothing here asserts: the figures
are for people to read and compare between changes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path[:0] = [str(TOP)]


def median_ms(argv: list[str], runs: int, env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def generator_units(directory: Path, count: int) -> None:
    for i in range(count):
        section = "[X-LiveUpdate]\nFileDescriptorNames=cache\n" if i % 4 == 0 else ""
        (directory / f"unit{i}.service").write_text(f"[Service]\nExecStart=/bin/true\n{section}")


def emulator_rss() -> str:
    from tests.harness import Emulator  # noqa: PLC0415 - only for this figure
    from tests.test_emulator import GiB, rss_kib  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        emu = Emulator(Path(tmp))
        try:
            before = rss_kib(emu.proc.pid)
            fd = os.memfd_create("gib", os.MFD_CLOEXEC)
            os.ftruncate(fd, GiB)
            with emu.backend.device() as dev:
                session = dev.create_session(b"bench")
            emu.backend.preserve_fd(session, fd, 1)
            after = rss_kib(emu.proc.pid)
            os.close(fd)
            os.close(session)
        finally:
            emu.stop()
    return f"luo-emu VmRSS {before} KiB idle, {after} KiB holding a 1 GiB memfd (+{after - before} KiB)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "LIVEUPDATE_RESTORED"}
    baseline = median_ms(["/usr/bin/python3", "-I", "-S", "-c", "pass"], args.runs)
    rows = [("python3 -I -S -c pass (baseline)", baseline)]
    rows.append(("python3 -c pass", median_ms(["/usr/bin/python3", "-c", "pass"], args.runs)))
    rows.append(
        (
            "luo-hook start (unit not live-updated)",
            median_ms([str(BIN / "luo-hook"), "start", "x.service"], args.runs, env),
        )
    )
    rows.append(
        (
            "luo-hook stop (luod not running)",
            median_ms([str(BIN / "luo-hook"), "stop", "x.service"], args.runs, dict(env, LUOD_SOCKET="/nonexistent")),
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        units, out = Path(tmp, "units"), Path(tmp, "out")
        units.mkdir()
        out.mkdir()
        generator_units(units, 200)
        gen = [sys.executable, str(TOP / "generators" / "luo-systemd-generator"), str(out), str(out), str(out)]
        rows.append(
            (
                "luo-systemd-generator, 200 units (50 opted in)",
                median_ms(gen, args.runs, dict(os.environ, SYSTEMD_UNIT_PATH=str(units))),
            )
        )
    width = max(len(name) for name, _ in rows)
    print(f"{'command':<{width}}  median ms  x baseline   ({args.runs} runs each)")
    for name, ms in rows:
        print(f"{name:<{width}}  {ms:9.1f}  {ms / baseline:9.2f}")
    print(emulator_rss())
    return 0


if __name__ == "__main__":
    sys.exit(main())
