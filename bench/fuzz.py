"""Fuzzes a real luod (on luo-emu and a private bus) with Hypothesis: the Varlink framing, every Varlink
method's parameters and the D-Bus methods, as a caller in a unit (root) would send them.

    .venv/bin/python bench/fuzz.py [--cases 10000] [--seed N]

After every case: luod is alive, and every reply was a result or a named error (io.liveupdate.Agent.*,
org.varlink.service.*; io.liveupdate.Agent1.Error.*, org.freedesktop.DBus.Error.*), never an internal
error.  At the end luod's fd count and RSS are printed next to their values after the warm-up, and the run
fails if the fds grew.  tests/test_fuzz.py runs a small sample of the same cases.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

TOP = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TOP)]

from tests.harness import Agent, DBusDaemon, Emulator, UnitTree  # noqa: E402

from luo_systemd import varlink  # noqa: E402
from luo_systemd.dbus_service import BUS_NAME, INTERFACE, OBJECT_PATH  # noqa: E402

METHODS = [
    "Store",
    "Remove",
    "List",
    "Retrieve",
    "Finish",
    "Preserve",
    "CreateSession",
    "RetrieveSession",
    "Status",
    "Preflight",
    "Arm",
    "Cancel",
    "Discard",
]
DBUS_METHODS = {
    "StoreFds": "sa(sh)",
    "RemoveFds": "sas",
    "ListFds": "s",
    "RetrieveFds": "sas",
    "Finish": "s",
    "Preserve": "s",
    "CreateSession": "ss",
    "RetrieveSession": "ss",
    "ListUnits": "",
    "Preflight": "",
    "Arm": "b",
    "Cancel": "",
    "Discard": "s",
}
GOOD_ERRORS = ("io.liveupdate.Agent.", "org.varlink.service.")
UNITS = ["", "demo.service", "other.service", "stranger.service", "a/b.service", "x" * 300]

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=40)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
names = st.lists(st.sampled_from(["cache", "a", "b", "", "a:b", "x" * 300, "é"]) | st.text(max_size=20), max_size=8)
parameters = st.fixed_dictionaries(
    {},
    optional={
        "unit": st.sampled_from(UNITS) | json_value,
        "names": names | json_value,
        "name": st.sampled_from(["vm0", "", "a/b"]) | json_value,
        "force": st.booleans() | json_value,
    },
)
fd_kinds = st.lists(st.sampled_from(["memfd", "pipe", "opath", "readonly", "sparse"]), max_size=4)


@dataclass
class Figures:
    cases: int = 0
    failures: list[str] = field(default_factory=list)


def make_fds(kinds: list[str]) -> list[int]:
    out = []
    for kind in kinds:
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            out.append(r)
            continue
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.write(fd, b"fuzz")
        if kind == "sparse":
            os.ftruncate(fd, 8 << 30)
        if kind in ("opath", "readonly"):
            other = os.open(f"/proc/self/fd/{fd}", (os.O_PATH if kind == "opath" else os.O_RDONLY) | os.O_CLOEXEC)
            os.close(fd)
            fd = other
        out.append(fd)
    return out


def varlink_call(path: str, payload: bytes, fds: list[int]) -> dict[str, Any] | None:
    """Sends raw bytes (with fds); the reply, or None if luod closed the connection (a framing error)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        socket.send_fds(s, [payload], fds) if fds else s.sendall(payload)
        reader = varlink.Reader(varlink.MAX_REPLY)
        try:
            while (msg := reader.next_message()) is None:
                if not reader.feed(s):
                    return None
        except OSError:
            return None
        finally:
            reader.close()
        doc, reply_fds = msg
        reply_fds.close()
        return doc


class Fuzzer:
    def __init__(self, directory: Path) -> None:
        self.emulator = Emulator(directory)
        self.bus = DBusDaemon(directory)
        self.tree = UnitTree(f"luo-fuzz-{os.getpid()}")
        self.agent = Agent(directory, self.emulator, self.bus, self.tree)
        self.agent.opt_in("demo.service")
        self.agent.opt_in("other.service", "[X-LiveUpdate]\nPreserveAt=store\nFileDescriptorMax=8\n")
        self.agent.start()
        self.figures = Figures()
        self.loop = asyncio.new_event_loop()
        from luo_systemd.dbus_client import AgentClient  # noqa: PLC0415

        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus.address
        self.dbus = self.loop.run_until_complete(AgentClient.connect())

    def close(self) -> None:
        self.dbus.disconnect()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()
        self.agent.cleanup()
        self.bus.stop()
        self.tree.cleanup()
        self.emulator.stop()

    @property
    def pid(self) -> int:
        assert self.agent.proc is not None
        return self.agent.proc.pid

    def fds(self) -> int:
        """luod's fds once the last connection is gone: the fewest seen in 0.2 s (luod closes a connection,
        and its peer's pidfd, only once it has read the EOF)."""
        counts = []
        for _ in range(10):
            counts.append(len(os.listdir(f"/proc/{self.pid}/fd")))
            time.sleep(0.02)
        return min(counts)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def check(self, what: str, reply: dict[str, Any] | None) -> None:
        self.figures.cases += 1
        if self.agent.proc is None or self.agent.proc.poll() is not None:
            raise AssertionError(f"luod died after {what}")
        if reply is None:
            return  # luod refused the framing and closed the connection: allowed
        error = reply.get("error")
        message = str((reply.get("parameters") or {}).get("message", ""))
        if error is not None and (not str(error).startswith(GOOD_ERRORS) or "internal error" in message):
            self.figures.failures.append(f"{what}: {error} {message}")
        if error is None and "parameters" not in reply:
            self.figures.failures.append(f"{what}: neither a result nor an error: {reply}")

    def varlink_method(self, method: str, params: dict[str, Any], kinds: list[str], oneway: bool) -> None:
        doc: dict[str, Any] = {"method": f"{varlink.INTERFACE}.{method}", "parameters": params}
        fds = make_fds(kinds)
        try:
            payload = json.dumps(doc).encode() + b"\0"
            self.check(f"{method}({params!r}, {kinds})", varlink_call(self.agent.varlink, payload, fds))
        finally:
            varlink.close_all(fds)

    def varlink_frame(self, payload: bytes, kinds: list[str]) -> None:
        fds = make_fds(kinds)
        try:
            self.check(f"frame {payload[:60]!r}", varlink_call(self.agent.varlink, payload + b"\0", fds))
        finally:
            varlink.close_all(fds)

    def dbus_method(self, member: str, body: list[Any], kinds: list[str]) -> None:
        from dbus_next.constants import MessageType  # noqa: PLC0415
        from dbus_next.message import Message  # noqa: PLC0415

        signature = DBUS_METHODS[member]
        fds = make_fds(kinds)
        try:
            msg = Message(
                destination=BUS_NAME,
                path=OBJECT_PATH,
                interface=INTERFACE,
                member=member,
                signature=signature,
                body=body,
                unix_fds=fds,
            )
            reply = self.loop.run_until_complete(asyncio.wait_for(self.dbus.bus.call(msg), 10))
        except Exception as e:  # dbus-next refusing to marshal the body is the fuzzer's own problem
            if type(e).__name__ in ("SignatureBodyMismatchError", "InvalidSignatureError", "InvalidMemberNameError"):
                return
            raise
        finally:
            varlink.close_all(fds)
        assert reply is not None
        for fd in reply.unix_fds:
            os.close(fd)
        doc = None
        if reply.message_type is MessageType.ERROR:
            ok = str(reply.error_name).startswith(("io.liveupdate.Agent1.Error.", "org.freedesktop.DBus.Error."))
            text = str(reply.body[0]) if reply.body else ""
            doc = {"error": "io.liveupdate.Agent.X" if ok else reply.error_name, "parameters": {"message": text}}
        else:
            doc = {"parameters": {}}
        self.check(f"D-Bus {member}{body!r}", doc)


def dbus_text(max_size: int) -> st.SearchStrategy[str]:
    """Strings a D-Bus message can carry at all (no NUL: the bus daemon drops a sender that sends one)."""
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=max_size)


def dbus_bodies() -> st.SearchStrategy[tuple[str, list[Any]]]:
    unit = st.sampled_from(UNITS) | dbus_text(30)
    text_list = st.lists(dbus_text(20) | st.sampled_from(["cache", "a"]), max_size=20)
    by_signature = {
        "sa(sh)": st.tuples(unit, st.lists(st.tuples(dbus_text(20), st.integers(0, 5)), max_size=6)),
        "sas": st.tuples(unit, text_list),
        "s": st.tuples(unit),
        "ss": st.tuples(unit, dbus_text(70)),
        "": st.just(()),
        "b": st.tuples(st.booleans()),
    }
    return st.sampled_from(sorted(DBUS_METHODS)).flatmap(
        lambda m: by_signature[DBUS_METHODS[m]].map(
            lambda body: (m, [list(x) if isinstance(x, tuple) else x for x in body])
        )
    )


def run(cases: int, directory: Path, random_seed: int | None = None) -> tuple[Figures, dict[str, int]]:
    fuzzer = Fuzzer(directory)
    try:
        case = st.one_of(
            st.tuples(st.just("method"), st.sampled_from(METHODS), parameters, fd_kinds, st.booleans()),
            st.tuples(
                st.just("frame"), st.binary(max_size=200) | json_value.map(lambda v: json.dumps(v).encode()), fd_kinds
            ),
            st.tuples(st.just("nested"), st.integers(1, 100_000), fd_kinds),
            st.tuples(st.just("dbus"), dbus_bodies(), fd_kinds),
        )

        def one(c: tuple[Any, ...]) -> None:
            if c[0] == "method":
                fuzzer.varlink_method(c[1], c[2], c[3], c[4])
            elif c[0] == "frame":
                fuzzer.varlink_frame(c[1].replace(b"\0", b" "), c[2])
            elif c[0] == "nested":
                fuzzer.varlink_frame(b'{"method":"io.liveupdate.Agent.Status","parameters":' + b"[" * c[1], c[2])
            else:
                fuzzer.dbus_method(c[1][0], c[1][1], c[2])

        warmup = settings(max_examples=min(200, cases), deadline=None, database=None)
        given(case)(warmup(lambda c: one(c)))()  # noqa: PLW0108 - settings() marks the function it decorates  # first allocations (snapshots, caches) before the baseline
        baseline = {"fds": fuzzer.fds(), "rss_kib": fuzzer.rss_kib(), "seconds": time.monotonic()}
        fuzzer.figures = Figures()
        # Hypothesis skips an example it has already run, so one pass can end short of ``cases``: passes
        # continue (each seeded anew) until that many distinct-per-pass cases have run.
        rounds = 0
        while fuzzer.figures.cases < cases:
            main = settings(
                max_examples=cases - fuzzer.figures.cases,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            test = given(case)(main(lambda c: one(c)))  # noqa: PLW0108
            (seed(random_seed + rounds)(test) if random_seed is not None else test)()
            rounds += 1
        figures = {
            "fds_before": baseline["fds"],
            "fds_after": fuzzer.fds(),
            "rss_kib_before": baseline["rss_kib"],
            "rss_kib_after": fuzzer.rss_kib(),
            "seconds": int(time.monotonic() - baseline["seconds"]),
        }
        return fuzzer.figures, figures
    finally:
        fuzzer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="luo-fuzz-") as d:
        figures, resources = run(args.cases, Path(d), args.seed)
    print(f"cases {figures.cases}, failures {len(figures.failures)}")
    for failure in figures.failures[:20]:
        print("  ", failure)
    print(" ".join(f"{k}={v}" for k, v in resources.items()))
    return 1 if figures.failures or resources["fds_after"] > resources["fds_before"] else 0


if __name__ == "__main__":
    sys.exit(main())
