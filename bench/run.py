"""The blackout path's benchmark: every figure as a ratio measured in the same run (bench/vm.py: a VM's).

    .venv/bin/python bench/run.py [--pairs 15] [--fds 100,1000,10000]

Per-unit and per-boot commands (luo-hook in every verb, the generator, luod exec -> READY=1) are timed in
alternating pairs with ``python3 -I -S -c pass`` (the floor for any Python program); each figure is the median
of the per-pair ratios.  Preserve and restore through luod (10 memfds per unit) are timed against the same
create_session/preserve_fd and retrieve_session/retrieve_fd/finish calls made directly on the emulator, at each
fd count, in alternating rounds (the median of the per-round ratios); the restore also less an empty start of
luod (timed to its first call answered, in each round).  luod's files are on a tmpfs, as /run is.  Last,
memory: luod idle and holding the most fds, luo-emu holding 1 MiB and 1 GiB.  Nothing here asserts: the
figures are for people to compare between changes.  Needs root (cgroups, like the tests).
"""

from __future__ import annotations

import argparse
import compileall
import functools
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP)]

from tests.harness import Agent, Emulator, NotifySink, UnitTree  # noqa: E402

from luo_systemd.generator import hook_command  # noqa: E402

BASELINE = ["/usr/bin/python3", "-I", "-S", "-c", "pass"]
FDS_PER_UNIT = 10
MiB = 1 << 20
BENCH_READY_TIMEOUT = 600.0
# Rounds of preserve and restore against the raw operations, up to 1,000 fds and above (~10 s a round at
# 10,000 fds): single rounds' ratios at 10,000 ranged 1.46-2.25 here, within one run.
ROUNDS, ROUNDS_LARGE = 7, 5
# At 100 fds a round is ~0.1 s and the raw restore ~10 ms, within the jitter of the two luod starts the row
# subtracts: single rounds ranged 1.1-3.4x here, and medians of 7 rounds 1.6-2.5x over six runs.
ROUNDS_SMALL = 31


def wall_ms(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return (time.perf_counter() - start) * 1000


def run(argv: list[str], env: Optional[dict[str, str]] = None) -> None:
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def paired(action: Callable[[], object], pairs: int) -> tuple[float, float]:
    """Median ms of ``action`` and the median of its per-pair ratio to the bare interpreter."""
    times, ratios = [], []
    for _ in range(pairs):
        base = wall_ms(functools.partial(run, BASELINE))
        ms = wall_ms(action)
        times.append(ms)
        ratios.append(ms / base)
    return statistics.median(times), statistics.median(ratios)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def memfds(count: int, size: int = 4096) -> list[int]:
    fds = []
    for i in range(count):
        fd = os.memfd_create(f"m{i}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        fds.append(fd)
    return fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class Bed:
    """An emulator and a real luod with ``max_fds`` allowed, in a private cgroup tree."""

    def __init__(self, directory: Path, max_fds: int = 4096) -> None:
        self.emulator = Emulator(directory)
        self.tree = UnitTree(f"luo-bench-{os.getpid()}-{directory.name}")  # one per bed: two run at once
        self.agent = Agent(directory, self.emulator, None, self.tree)
        with self.agent.config.open("a") as f:
            f.write(f"max_fds_total = {max_fds}\n")

    def units(self, count: int) -> list[str]:
        names = [f"u{i}.service" for i in range(count)]
        for name in names:
            self.agent.opt_in(name, f"[X-LiveUpdate]\nFileDescriptorMax={FDS_PER_UNIT}\n")
        return names

    def store(self, units: list[str]) -> None:
        for unit in units:
            fds = memfds(FDS_PER_UNIT)
            self.agent.call("Store", {"unit": unit, "names": [f"f{i}" for i in range(FDS_PER_UNIT)]}, fds)
            close_all(fds)

    def preserve(self, units: list[str]) -> None:
        """Arm and Preserve; a kernel must be loaded (``emulator.load``: liveupdatectl prepare's work, not this)."""
        self.agent.call("Arm")
        for unit in units:
            self.agent.call("Preserve", {"unit": unit})

    def timed_start(self, retrieve: Optional[str] = None) -> float:
        """ms from luod's spawn (fork and exec, as the bare interpreter's ``run``) to READY=1, waiting as long
        as it takes (the tests' harness gives up after READY_TIMEOUT; restoring 10,000 fds may take longer).
        ``retrieve``: to the answer of a first call, that unit's Retrieve, which waits for what luod loads
        after READY=1 (the Varlink service) and after a kexec for the unit's memfds, as a restored unit's
        luo-hook start does.  Not timed: the harness's move into luod.service's cgroup before the spawn, the
        service manager's work for any unit.  After ~50 ms without one, a cgroup move took 5-14 ms here
        (back to back, 0.1 ms: the kernel's cgroup rwsem waiting out an RCU grace period), which the bare
        interpreter's run never paid and which swamped the 100-fd restore rows."""
        self.agent.start(wait=False)
        if not self.agent.notify.ready.wait(BENCH_READY_TIMEOUT):
            raise RuntimeError(f"luod did not become ready in {BENCH_READY_TIMEOUT}s; see {self.agent.log}")
        if retrieve:
            close_all(self.agent.call("Retrieve", {"unit": retrieve})[1])
        return (time.perf_counter() - self.agent.spawned_at) * 1000

    def restart(self) -> None:
        self.emulator.kexec()
        self.agent.stop()
        self.agent.start()

    def restore(self, units: list[str]) -> None:
        for unit in units:
            close_all(self.agent.call("Retrieve", {"unit": unit})[1])
            self.agent.call("Finish", {"unit": unit})

    def close(self) -> None:
        self.agent.cleanup()
        self.tree.cleanup()
        self.emulator.stop()


def hook_figures(directory: Path, pairs: int) -> list[tuple[str, float, float]]:
    hook = hook_command().split()  # as the generator's drop-ins run it
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    rows: list[tuple[str, float, float]] = []
    bed = Bed(directory)
    try:
        bed.agent.opt_in("x.service", "[X-LiveUpdate]\n")
        bed.agent.start()
        luod = dict(env, LUOD_SOCKET=bed.agent.varlink)
        rows.append(
            (
                "luo-hook stop, luod running, nothing to do",
                *paired(functools.partial(run, [*hook, "stop", "x.service"], luod), pairs),
            )
        )
        rows.append(
            (
                "luo-hook started (luo-finish@), luod running, nothing to finish",
                *paired(functools.partial(run, [*hook, "started", "x.service"], luod), pairs),
            )
        )
        rows.append(
            (
                "luo-hook start, luod running, nothing restored",
                *paired(functools.partial(run, [*hook, "start", "x.service"], luod), pairs),
            )
        )
        fds = memfds(4)
        bed.agent.call("Store", {"unit": "x.service", "names": ["a", "b", "c", "d"]}, fds)
        close_all(fds)
        bed.emulator.load()
        bed.preserve(["x.service"])
        bed.restart()
        sink = NotifySink(directory / "hook-notify.sock")
        restored = dict(luod, NOTIFY_SOCKET=str(sink.path))
        try:
            rows.append(
                (
                    "luo-hook start, 4 restored memfds",
                    *paired(functools.partial(run, [*hook, "start", "x.service"], restored), pairs),
                )
            )
        finally:
            sink.close()
    finally:
        bed.close()
    return rows


def generator_figures(directory: Path, pairs: int) -> list[tuple[str, float, float]]:
    """The generator as systemd runs it: its shebang's flags, into a fresh directory on a tmpfs each time
    (/run/systemd/generator is one, and systemd empties it before every run)."""
    flags = Path(TOP / "generators" / "luo-systemd-generator").read_text().splitlines()[0].split()[1:]
    rows = []
    with tempfile.TemporaryDirectory(prefix="luo-bench-", dir="/dev/shm") as run_dir:
        for count in (100, 1000, 3000):
            units = directory / f"units{count}"
            units.mkdir()
            for i in range(count):
                section = "[X-LiveUpdate]\nFileDescriptorNames=cache\n" if i % 10 == 0 else ""
                text = f"[Unit]\nDescription=unit {i}\n\n[Service]\nExecStart=/bin/true\n{section}"
                (units / f"unit{i}.service").write_text(text)
            gen = [sys.executable, *flags, str(TOP / "generators" / "luo-systemd-generator")]
            env = dict(os.environ, SYSTEMD_UNIT_PATH=str(units))

            def generate(gen: list[str] = gen, env: dict[str, str] = env) -> None:
                out = tempfile.mkdtemp(dir=run_dir)
                run([*gen, out, out, out], env)

            ms, ratio = paired(generate, pairs)
            rows.append((f"generator, {count} units ({count // 10} opted in)", ms, ratio))
    return rows


def timed_start(
    bed: Bed, before: Callable[[], object], pairs: int, unit: str
) -> tuple[tuple[float, float], tuple[float, float]]:
    """luod exec -> READY=1 and exec -> ``unit``'s Retrieve answered (``before`` runs untimed ahead of each
    start), each paired with the bare interpreter: (ms, ratio) of both."""
    ready: list[tuple[float, float]] = []
    serving: list[tuple[float, float]] = []
    for _ in range(pairs):
        for times, retrieve in ((ready, None), (serving, unit)):
            before()
            bed.agent.stop()
            base = wall_ms(functools.partial(run, BASELINE))
            ms = bed.timed_start(retrieve)
            times.append((ms, ms / base))
    return medians(ready), medians(serving)


def medians(figures: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(ms for ms, _ in figures), statistics.median(ratio for _, ratio in figures)


def ready_figures(directory: Path, pairs: int) -> list[tuple[str, float, float]]:
    """luod's start, empty and restoring: to READY=1 (units ordered after luod.service start then) and to a
    unit's Retrieve answered (a restored unit's luo-hook start waits for that): after a kexec, the last unit
    the manifest names."""
    bed = Bed(directory)
    try:
        bed.agent.start()
        ready, serving = timed_start(bed, lambda: None, pairs, "nothing.service")
        rows = [("luod exec -> READY=1, empty", *ready), ("luod exec -> first call answered, empty", *serving)]
        units = bed.units(10)
        bed.store(units)

        restored: list[bool] = []

        def live_update() -> None:
            if restored:  # the previous start's restore: Retrieve and Finish make the fds stored again
                bed.restore(units)
            bed.emulator.load()
            bed.preserve(units)
            bed.emulator.kexec()
            restored.append(True)

        ready, serving = timed_start(bed, live_update, pairs, units[-1])
        bed.restore(units)
        rows.append(("luod exec -> READY=1, restoring 10 units x 10 memfds", *ready))
        rows.append(("luod exec -> last unit's fds answered, restoring 10 units x 10 memfds", *serving))
        return rows
    finally:
        bed.close()


def raw_figures(emulator: Emulator, units: int) -> tuple[float, float]:
    """ms of the device operations alone: preserve (create_session, preserve_fd) and restore after the kexec
    (retrieve_session, retrieve_fd, finish) of ``units`` x 10 memfds."""
    backend = emulator.backend
    fds = memfds(units * FDS_PER_UNIT)
    emulator.load()
    sessions = []
    with backend.device() as dev:
        start = time.perf_counter()
        for u in range(units):
            session = dev.create_session(f"raw{u}".encode())
            for i in range(FDS_PER_UNIT):
                backend.preserve_fd(session, fds[u * FDS_PER_UNIT + i], i + 1)
            sessions.append(session)
        preserve = time.perf_counter() - start
    close_all(fds)
    emulator.kexec()  # a session lives while its fd is open: closed after the kexec
    close_all(sessions)
    with backend.device() as dev:
        start = time.perf_counter()
        for u in range(units):
            session = dev.retrieve_session(f"raw{u}".encode())
            close_all([backend.retrieve_fd(session, i + 1) for i in range(FDS_PER_UNIT)])
            backend.finish(session)
            os.close(session)
        restore = time.perf_counter() - start
    return preserve * 1000, restore * 1000


def scale_figures(directory: Path, fds: int) -> tuple[list[tuple[str, float, float, float, float]], Optional[str]]:
    """Preserve and restore of ``fds`` memfds through luod against the raw device operations, in alternating
    rounds (the median of each, and of the per-round ratios); luod's RSS.  The restore is shown whole and
    less an empty start of luod, which is what grows with the fds.  The empty start is timed to its first
    call answered: the restore's first Retrieve waits for what luod loads after READY=1 too (the
    interpreter, imports and event loop, the same at every count); in each round, in a bed of its own."""
    count = fds // FDS_PER_UNIT
    (directory / "empty").mkdir()
    empty = Bed(directory / "empty")
    bed = Bed(directory, max_fds=fds)
    try:
        bed.agent.start()
        empty.agent.start()
        # Status waits for luod's event loop, which loads after its first answers: idle is with it loaded, and
        # a live update is armed long after luod's start, not while it still loads asyncio (Arm waits too).
        bed.agent.call("Status")
        assert bed.agent.proc is not None
        idle = rss_kib(bed.agent.proc.pid)
        units = bed.units(count)
        bed.store(units)
        holding = rss_kib(bed.agent.proc.pid)
        rounds: dict[str, list[tuple[float, float]]] = {"preserve": [], "restore": [], "work": []}
        for _ in range(ROUNDS_SMALL if fds <= 100 else ROUNDS if fds <= 1000 else ROUNDS_LARGE):
            raw_preserve, raw_restore = raw_figures(bed.emulator, count)
            bed.emulator.load()  # outside the timing, as in raw_figures
            preserve = wall_ms(lambda: bed.preserve(units))
            bed.emulator.kexec()
            bed.agent.stop()
            restore = bed.timed_start() + wall_ms(lambda: bed.restore(units))  # Finish stores the memfds again
            empty.agent.stop()
            empty_start = empty.timed_start(retrieve="nothing.service")
            rounds["preserve"].append((preserve, raw_preserve))
            rounds["restore"].append((restore, raw_restore))
            rounds["work"].append((restore - empty_start, raw_restore))
            bed.agent.call("Status")  # as above, before the next round's Arm
        rows = []
        for key, name in (
            ("preserve", "preserve (Arm + Preserve)"),
            ("restore", "restore (start, Retrieve, Finish)"),
            ("work", "restore less an empty start"),
        ):
            ms = statistics.median(luod for luod, _ in rounds[key])
            raw = statistics.median(raw for _, raw in rounds[key])
            ratio = statistics.median(luod / raw for luod, raw in rounds[key])
            rows.append((f"{name}, {fds} fds", ms, ms / fds, raw, ratio))
        return rows, f"luod VmRSS {idle} KiB idle, {holding} KiB holding {fds} fds"
    finally:
        bed.close()
        empty.close()


def emulator_memory(directory: Path) -> str:
    emu = Emulator(directory)
    try:
        idle = rss_kib(emu.proc.pid)
        figures = []
        for size in (MiB, 1024 * MiB):
            fd = os.memfd_create("big", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            with emu.backend.device() as dev:
                session = dev.create_session(f"mem{size}".encode())
            emu.backend.preserve_fd(session, fd, 1)
            figures.append(f"{rss_kib(emu.proc.pid) - idle} KiB more holding {size // MiB} MiB")
            close_all([fd, session])
    finally:
        emu.stop()
    return f"luo-emu VmRSS {idle} KiB idle; " + ", ".join(figures)


def table(title: str, rows: list[tuple[str, float, float]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"{title:<{width}}  median ms  x python3 -I -S")
    for name, ms, ratio in rows:
        print(f"{name:<{width}}  {ms:9.1f}  {ratio:9.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pairs", type=int, default=15, help="alternating pairs per command figure")
    parser.add_argument("--fds", default="100,1000,10000", help="fd counts for preserve and restore")
    parser.add_argument("--no-commands", action="store_true", help="only preserve, restore and memory")
    args = parser.parse_args()
    # Byte-compiled, as a package installs it: without, every command compiles its modules again (and
    # PYTHONDONTWRITEBYTECODE keeps it so), which is no part of what runs in production.
    compileall.compile_dir(str(TOP / "src"), quiet=1)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the raw figures hold every memfd at once
    # luod's beds on a tmpfs, as /run is where luod writes (the restore's env files, /run/luod/env) and reads
    # (the generator's drop-ins, /run/systemd/generator): on this machine's ext4 one env file costs 1.3 ms
    # against 0.07 ms, which no production system pays.  The generator's input, unit files, stays on disk.
    disk = tempfile.TemporaryDirectory(prefix="luo-bench-")
    run_dir = tempfile.TemporaryDirectory(prefix="luo-bench-", dir="/dev/shm")
    with disk, run_dir:

        def fresh(name: str, top: str = run_dir.name) -> Path:
            (Path(top) / name).mkdir()
            return Path(top) / name

        if not args.no_commands:
            rows = hook_figures(fresh("hook"), args.pairs)
            rows += generator_figures(fresh("gen", disk.name), args.pairs)
            rows += ready_figures(fresh("ready"), args.pairs)
            table(f"command ({args.pairs} pairs)", rows)
        print(f"\n{'through luod':<46}   total ms  ms per fd     raw ms  x raw device ops", flush=True)
        memory = []
        for fds in (int(n) for n in args.fds.split(",")):  # each line as it comes
            figures, rss = scale_figures(fresh(f"scale{fds}"), fds)
            for name, ms, per_fd, raw, ratio in figures:
                print(f"{name:<46}  {ms:9.1f}  {per_fd:9.3f}  {raw:9.1f}  {ratio:9.2f}", flush=True)
            memory.append(rss)
        print()
        for line in [*memory, emulator_memory(fresh("emu"))]:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
