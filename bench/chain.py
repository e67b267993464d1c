"""Twenty emulated live updates in a row: luod's fds and RSS, and what luo-emu holds, after each one.

    .venv/bin/python bench/chain.py [--updates 20] [--mib 8]

A unit stores a memfd (and a client session) once; every update preserves, kexecs, restores and finishes
it, checking the content each time.  Printed per update: luod's fd count (and of those, the ones not
sockets) and RSS; luo-emu's files and RSS, and the memfd bytes it holds while preserved and after the
finish; at the end the change from the first update to the last.  tests/test_chain.py asserts the same
on three updates.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP)]

from tests.harness import Agent, DBusDaemon, Emulator, UnitTree  # noqa: E402


def process_figures(pid: int) -> dict[str, int]:
    """After the last call's connection is gone: the fewest fds seen in 0.2 s (luod closes a connection,
    and the pidfd of its peer, only once it has read the EOF)."""
    samples = []
    for _ in range(10):
        samples.append(sample(pid))
        time.sleep(0.02)
    return min(samples, key=lambda s: s["fds"])


def sample(pid: int) -> dict[str, int]:
    fds = os.listdir(f"/proc/{pid}/fd")
    held = files = 0
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        files += not stat.S_ISSOCK(st.st_mode)  # connections come and go with the calls
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:
            held += st.st_size
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"fds": len(fds), "files": files, "rss_kib": rss, "memfd_bytes": held}


def chain(updates: int, mib: int, directory: Path) -> list[dict[str, int]]:
    emulator = Emulator(directory)
    bus = DBusDaemon(directory)
    tree = UnitTree(f"luo-chain-{os.getpid()}")
    agent = Agent(directory, emulator, bus, tree)
    agent.opt_in("demo.service")
    rows = []
    try:
        agent.start()
        content = os.urandom(mib << 20)
        fd = os.memfd_create("cache", os.MFD_CLOEXEC)
        os.write(fd, content)
        agent.call("Store", {"unit": "demo.service", "names": ["cache"]}, [fd])
        os.close(fd)
        os.close(agent.call("CreateSession", {"unit": "demo.service", "name": "vm0"})[1][0])
        for n in range(1, updates + 1):
            emulator.load()
            agent.call("Arm")
            assert agent.call("Preserve", {"unit": "demo.service"})[0] == {"preserved": 1}
            preserved = process_figures(emulator.proc.pid)  # the emulator holds the unit's memory now
            emulator.kexec()
            agent.stop()
            agent.start()
            _, fds = agent.call("Retrieve", {"unit": "demo.service", "names": ["cache"]})
            assert hashlib.sha256(os.pread(fds[0], mib << 20, 0)).digest() == hashlib.sha256(content).digest()
            os.close(fds[0])
            agent.call("Finish", {"unit": "demo.service"})
            assert agent.call("Status")[0]["live_update_count"] == n
            assert agent.proc is not None
            luod, emu = process_figures(agent.proc.pid), process_figures(emulator.proc.pid)
            rows.append(
                {
                    "update": n,
                    "luod_fds": luod["fds"],
                    "luod_files": luod["files"],
                    "luod_rss_kib": luod["rss_kib"],
                    "emu_files": emu["files"],
                    "emu_rss_kib": emu["rss_kib"],
                    "emu_held_when_preserved": preserved["memfd_bytes"],
                    "emu_held_after_finish": emu["memfd_bytes"],
                }
            )
        return rows
    finally:
        agent.cleanup()
        bus.stop()
        tree.cleanup()
        emulator.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--mib", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="luo-chain-") as d:
        rows = chain(args.updates, args.mib, Path(d))
    for row in rows:
        print(" ".join(f"{k}={v}" for k, v in row.items()))
    first, last = rows[0], rows[-1]
    print("change from update 1 to", last["update"], {k: last[k] - first[k] for k in first if k != "update"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
