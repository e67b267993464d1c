"""luod against an attacker: a process running as ``nobody`` in a unit of its own (other.service), against a
real luod, luo-emu and dbus-daemon.  Each test reproduces one defect of issue 11 (see docs/security.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from luo_systemd import errors
from tests.contract.scenarios import memfd
from tests.harness import NOBODY, Agent, DBusDaemon, Emulator, python_path

STORE_CACHE = """
fd = os.memfd_create("cache", os.MFD_CLOEXEC)
os.write(fd, b"demo's secret")
with varlink.Client(sock) as c:
    c.call("Store", {"names": ["cache"]}, [fd])
"""


def fd_count(agent: Agent) -> int:
    assert agent.proc is not None
    return len(os.listdir(f"/proc/{agent.proc.pid}/fd"))


def held_files(agent: Agent) -> list[str]:
    """What luod's fds point to (fds closed while we look are skipped)."""
    assert agent.proc is not None
    out = []
    for n in os.listdir(f"/proc/{agent.proc.pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{agent.proc.pid}/fd/{n}"))
        except FileNotFoundError:
            pass
    return out


def fd_count_falls_to(agent: Agent, limit: int, timeout: float = 5.0) -> int:
    """luod's fd count once it is at most ``limit``, or the last count after ``timeout`` s: each connection is
    its own task, so an attacker's closed socket may be reaped a moment after a fresh connection was answered."""
    deadline = time.monotonic() + timeout
    while (count := fd_count(agent)) > limit and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def alive_and_answering(agent: Agent) -> None:
    assert agent.proc is not None and agent.proc.poll() is None, "luod died"
    status, _ = agent.call("Status")
    assert status["phase"] in ("idle", "armed", "restored")


def settle(agent: Agent) -> None:
    """A round trip on a fresh connection: every earlier connection's data has been handled by now."""
    agent.call("Status")
    agent.call("Status")


# -- identity


ATTACKER = """
import asyncio, sys
os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = {address!r}
from luo_systemd.dbus_client import AgentClient
loop = asyncio.new_event_loop()
client = loop.run_until_complete(AgentClient.connect())
try:  # luod learns this connection's credentials (PID = ours; with ProcessFD, a pidfd of ours)
    print("before:", loop.run_until_complete(client.list_fds()), flush=True)
except errors.AccessDenied:
    print("before: refused", flush=True)  # a bus without ProcessFD: refused already
if os.fork():
    print(os.getpid(), flush=True)
    os._exit(0)  # the connection lives on in the child; our PID is free for the next process
sys.stdin.readline()  # the PID was recycled into demo.service
for name, call in (("list", lambda: client.list_fds()),
                   ("store", lambda: client.store_fds([("cache", os.memfd_create("evil", 0))]))):
    try:
        print(name, "allowed:", loop.run_until_complete(call()), flush=True)
    except errors.LuoError as e:
        print(name, "refused:", type(e).__name__, e, flush=True)
"""


def spawn_with_pid(pid: int, argv: list[str]) -> subprocess.Popen[bytes] | None:
    """Starts argv as process ``pid`` (root may steer the next PID through ns_last_pid); None if lost."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))
    proc = subprocess.Popen(argv)
    if proc.pid == pid:
        return proc
    proc.kill()
    proc.wait()
    return None


@pytest.mark.parametrize("bus", ["host", "pidfd"], indirect=True)
def test_dbus_identity_is_not_lent_by_a_recycled_pid(bus: DBusDaemon, agent: Agent) -> None:
    """A process connects, forks and exits: its PID, reused in demo.service, must not lend demo's unit to
    the child that kept the connection.  On a bus with ProcessFD (dbus 1.16) the attacker is served as
    other.service first, and the pidfd of its exited process then refuses the child."""
    assert agent.bus is not None
    assert agent.run_as("demo.service", STORE_CACHE).returncode == 0
    prologue = "import os, json\nfrom luo_systemd import varlink, errors\n"
    code = prologue + textwrap.dedent(ATTACKER.format(address=agent.bus.address))
    argv = agent.tree.argv("other.service", [sys.executable, "-c", code], uid=NOBODY)
    env = dict(os.environ, PYTHONPATH=python_path())
    for _ in range(5):  # another process on the machine may take the PID first
        attacker = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert attacker.stdin is not None and attacker.stdout is not None
        before = attacker.stdout.readline()
        freed = int(attacker.stdout.readline())
        attacker.wait()  # reaped: the PID is free
        holder = spawn_with_pid(freed, agent.tree.argv("demo.service", ["sleep", "60"]))
        if holder is None:
            attacker.kill()
            attacker.wait()
            continue
        while f"/{agent.tree.root.strip('/')}/app.slice/demo.service" not in Path(f"/proc/{freed}/cgroup").read_text():
            time.sleep(0.01)  # the holder moves itself into demo.service, then execs sleep
        try:
            out, _ = attacker.communicate("go\n", timeout=30)
        finally:
            holder.kill()
            holder.wait()
        assert "list refused: AccessDenied" in out, out
        assert "store refused: AccessDenied" in out, out
        if bus.pidfds:
            assert before == "before: []\n", before  # served as other.service, which holds nothing
            assert "has exited" in out, out  # the pidfd, not the recycled PID, decided
        else:
            assert before == "before: refused\n", before
        listing, _ = agent.call("List", {"unit": "demo.service"})
        assert [f["name"] for f in listing["fds"]] == ["cache"]
        return
    pytest.skip("could not place a process at the freed PID in 5 tries")


@pytest.mark.parametrize(
    ("uid", "parameters", "served"),
    [
        (NOBODY, {}, False),
        (NOBODY, {"unit": "other.service"}, False),  # naming its own unit does not spare the check
        (0, {}, False),  # root acting on its own unit: which one that is must be read
        (0, {"unit": "other.service"}, True),  # root naming the unit: its own decides nothing, is not read
    ],
)
def test_varlink_identity_needs_a_pidfd(agent: Agent, uid: int, parameters: dict[str, str], served: bool) -> None:
    """A caller whose process is gone by the time luod reads its credentials is refused, never looked up by
    PID (the Varlink peer is pinned by SO_PEERPIDFD).  Root naming the unit it acts on needs no unit of
    its own: its uid, which the kernel recorded at connect, is all that is checked."""
    code = f"""
    import socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    if os.fork():
        os._exit(0)
    import time; time.sleep(0.3)  # the connecting process has exited
    varlink.send_message(s, {{"method": "io.liveupdate.Agent.List", "parameters": {parameters!r}}})
    r = varlink.Reader()
    while (m := r.next_message()) is None:
        r.feed(s)
    print(json.dumps(m[0]))
    """
    out = agent.run_as("other.service", code, uid=None if uid == 0 else uid)
    if served:
        assert json.loads(out.stdout) == {"parameters": {"fds": []}}, out.stdout + out.stderr
    else:
        assert "io.liveupdate.Agent.AccessDenied" in out.stdout, out.stdout + out.stderr


# -- the Varlink listener


def run_attacker(agent: Agent, code: str) -> subprocess.Popen[str]:
    """``code`` as nobody in other.service; it prints a line when its attack is in place, then waits for
    a line on stdin before it ends (and its connections with it)."""
    prologue = f"import os, sys, json\nfrom luo_systemd import varlink, errors\nsock = {agent.varlink!r}\n"
    argv = agent.tree.argv("other.service", [sys.executable, "-c", prologue + textwrap.dedent(code)], uid=NOBODY)
    env = dict(os.environ, PYTHONPATH=python_path())
    return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_connection_flood_does_not_kill_the_listener(agent: Agent) -> None:
    """Hundreds of connections from one user get refused past a limit; luod keeps serving everyone."""
    code = """
    import resource, socket, time
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    conns = []
    for _ in range(1200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.5)  # once luod stops accepting, the backlog fills and connect() would wait
        try:
            s.connect(sock)
        except OSError:
            s.close()
            continue
        conns.append(s)
    time.sleep(2)  # luod accepts what it can
    print(len(conns), flush=True)
    sys.stdin.readline()
    """
    attacker = run_attacker(agent, code)
    assert attacker.stdout is not None
    print("attacker connections:", attacker.stdout.readline().strip(), "luod fds:", fd_count(agent))
    try:
        alive_and_answering(agent)  # while the attack lasts
    finally:
        attacker.communicate("done\n", timeout=30)
    alive_and_answering(agent)


def test_fds_without_a_message_are_capped(agent: Agent) -> None:
    """fds sent without a terminating NUL must not pile up in luod."""
    before = fd_count(agent)
    code = """
    import array, socket, time
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock)
    fds = [os.memfd_create("x", 0) for _ in range(200)]
    sent = 0
    try:
        for _ in range(20):
            s.sendmsg([b"{"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
            sent += 1
    except OSError:
        pass
    time.sleep(1)
    print("sent", sent)
    import sys; sys.stdout.flush()
    time.sleep(1)
    """
    proc = subprocess.Popen(
        agent.tree.argv(
            "other.service",
            [sys.executable, "-c", f"import os\nsock = {agent.varlink!r}\n" + textwrap.dedent(code)],
            uid=NOBODY,
        ),
        env=dict(os.environ, PYTHONPATH=python_path()),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    during = fd_count(agent)
    proc.wait(timeout=30)
    assert during - before <= 300, f"luod held {during - before} more fds while the connection was open"
    alive_and_answering(agent)


def test_deeply_nested_json_leaks_no_fds(agent: Agent) -> None:
    settle(agent)
    before = fd_count(agent)
    fd = memfd("x", b"x")
    for depth in (10_000, 100_000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(agent.varlink)
            s.settimeout(10)
            payload = b'{"method":"io.liveupdate.Agent.Status","parameters":' + b"[" * depth + b"\0"
            socket.send_fds(s, [payload], [fd, fd, fd])
            try:
                s.recv(4096)
            except OSError:
                pass
    os.close(fd)
    settle(agent)
    assert agent.proc is not None
    held = held_files(agent)
    assert not any(h.startswith("/memfd:x ") for h in held), held
    assert fd_count_falls_to(agent, before) <= before
    alive_and_answering(agent)


def test_retrieve_with_a_name_repeated_is_bounded(agent: Agent, emulator: Emulator) -> None:
    assert agent.run_as("demo.service", STORE_CACHE).returncode == 0
    emulator.load()
    agent.call("Arm")
    agent.call("Preserve", {"unit": "demo.service"})
    emulator.live_update()
    agent.stop()
    agent.start()
    settle(agent)
    before = held_files(agent).count("/memfd:cache (deleted)")
    with pytest.raises(errors.LuoError) as e:
        agent.call("Retrieve", {"unit": "demo.service", "names": ["cache"] * 5000})
    assert isinstance(e.value, (errors.LimitExceeded, errors.InvalidRequest)), e.value
    settle(agent)
    assert held_files(agent).count("/memfd:cache (deleted)") == before
    alive_and_answering(agent)


def test_dbus_fds_not_named_by_an_argument_are_closed(agent: Agent) -> None:
    import asyncio  # noqa: PLC0415

    from dbus_next.message import Message  # noqa: PLC0415

    from luo_systemd.dbus_client import AgentClient  # noqa: PLC0415
    from luo_systemd.dbus_service import BUS_NAME, INTERFACE, OBJECT_PATH  # noqa: PLC0415

    assert agent.bus is not None
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = agent.bus.address
    loop = asyncio.new_event_loop()
    try:
        client = loop.run_until_complete(AgentClient.connect())
        loop.run_until_complete(client.list_fds(unit="demo.service"))
        before = fd_count(agent)
        fds = [memfd(f"m{i}", b"x") for i in range(4)]
        msg = Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface=INTERFACE,
            member="StoreFds",
            signature="sa(sh)",
            body=["demo.service", [["one", 0]]],
            unix_fds=fds,  # three of them named by no 'h'
        )
        loop.run_until_complete(client.bus.call(msg))
        loop.run_until_complete(client.list_fds(unit="demo.service"))
        assert agent.proc is not None
        held = held_files(agent)
        assert held.count("/memfd:m0 (deleted)") == 1, "the stored one"
        assert not any(f"/memfd:m{i} " in h for i in (1, 2, 3) for h in held), held
        assert fd_count(agent) - before <= 2  # the stored fd and luod's first state snapshot
        for fd in fds:
            os.close(fd)
        client.disconnect()
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        loop.close()
        del os.environ["DBUS_SYSTEM_BUS_ADDRESS"]


# -- bounds


def test_byte_budget_counts_holes(agent: Agent) -> None:
    code = """
    fd = os.memfd_create("sparse", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4 << 30)  # 4 GiB of holes: preserve would fill them, outside the unit's cgroup
    try:
        varlink.Client(sock).call("Store", {"names": ["big"]}, [fd])
        print("stored")
    except errors.LimitExceeded as e:
        print("refused:", e)
    """
    out = agent.run_as("other.service", code, uid=NOBODY)
    assert "refused:" in out.stdout and "MemoryMax" not in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("count", [1000, pytest.param(3000, marks=pytest.mark.slow)])
def test_many_fds_store_and_restore(agent_unstarted: Agent, emulator: Emulator, count: int) -> None:
    """Near and past 1,024 fds: store works up to FileDescriptorMax=, and calls keep working after a
    restore that leaves luod with fds numbered >= 1024 (no select())."""
    agent = agent_unstarted
    agent.opt_in("demo.service", f"[X-LiveUpdate]\nFileDescriptorMax={count}\n")
    agent.start()
    code = f"""
    fds = [os.memfd_create(f"m{{i}}", os.MFD_CLOEXEC) for i in range({count})]
    for fd in fds:
        os.write(fd, b"x")
    with varlink.Client(sock) as c:
        for i in range(0, {count}, 64):
            c.call("Store", {{"names": [f"m{{j}}" for j in range(i, min(i + 64, {count}))]}}, fds[i : i + 64])
        print(len(c.call("List")[0]["fds"]))
    """
    out = agent.run_as("demo.service", code)
    assert out.stdout.strip() == str(count), out.stdout + out.stderr
    emulator.load()
    agent.call("Arm")
    assert agent.call("Preserve", {"unit": "demo.service"})[0] == {"preserved": count}
    emulator.live_update()
    agent.stop()
    agent.start()
    listing, _ = agent.call("List", {"unit": "demo.service"})
    assert len(listing["fds"]) == count
    reply, fds = agent.call("Retrieve", {"unit": "demo.service", "names": ["m0", f"m{count - 1}"]})
    assert reply == {"names": ["m0", f"m{count - 1}"]}
    for fd in fds:
        assert os.pread(fd, 1, 0) == b"x"
        os.close(fd)
    out = agent.run_as("demo.service", 'print(varlink.Client(sock).call("Finish")[0])')
    assert "'finished': True" in out.stdout, out.stdout + out.stderr


def test_preserve_authorizes_before_any_work(agent_unstarted: Agent, tmp_path: Path) -> None:
    """Preserve from a stranger must not make luod fork systemctl."""
    calls = tmp_path / "systemctl-calls"
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    agent = agent_unstarted
    with open(agent.config, "a") as f:
        f.write(f'systemctl = ["{fake}"]\n')
    agent.start()
    code = """
    for _ in range(20):
        try:
            varlink.Client(sock).call("Preserve", {"unit": "demo.service"})
        except errors.AccessDenied:
            pass
    print("done")
    """
    out = agent.run_as("other.service", code, uid=NOBODY)
    assert "done" in out.stdout, out.stderr
    assert not calls.exists() or calls.read_text().count("list-jobs") == 0


def test_store_refuses_what_preserve_would_refuse(agent: Agent) -> None:
    code = """
    fd = os.memfd_create("cache", os.MFD_CLOEXEC)
    os.write(fd, b"data")
    for label, flags in (("o_path", os.O_PATH), ("read_only", os.O_RDONLY)):
        other = os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
        try:
            varlink.Client(sock).call("Store", {"names": [label]}, [other])
            print(label, "stored")
        except errors.InvalidFd as e:
            print(label, "refused:", e)
    """
    out = agent.run_as("other.service", code, uid=NOBODY)
    # The kernel preserves a read-only reopen (tests/contract/test_rules.py); an O_PATH fd it cannot see.
    assert "o_path refused" in out.stdout and "read_only stored" in out.stdout, out.stdout + out.stderr


def test_what_a_unit_stores_twice_survives_an_agent_crash(agent_unstarted: Agent) -> None:
    """systemd keeps one copy of an open file in a fd store and drops a second push of it.  A unit that
    stores an open file luod keeps already (a dup of what it stored, a session luod made for it) must not
    leave luod's state naming an fd its store dropped: a SIGKILLed luod then recovers what it held."""
    agent_unstarted.fdstore = {}  # kept and handed back, with systemd's rule (tests/harness.py NotifySink)
    agent_unstarted.start()
    code = """
    c = varlink.Client(sock)
    fd = os.memfd_create("cache", os.MFD_CLOEXEC)
    os.write(fd, b"data")
    c.call("Store", {"names": ["a"]}, [fd])
    c.call("Store", {"names": ["b"]}, [os.dup(fd)])
    c.call("Store", {"names": ["a"]}, [fd])
    _, session = c.call("CreateSession", {"name": "s"})
    try:
        c.call("Store", {"names": ["s"]}, session)
        print("session stored")
    except errors.InvalidFd as e:
        print("session refused:", e)
    """
    out = agent_unstarted.run_as("other.service", code, uid=NOBODY)
    assert "session refused: Refusing to store 's' of other.service: the agent holds LUO session" in out.stdout, (
        out.stdout + out.stderr
    )
    agent_unstarted.stop(signal.SIGKILL)
    agent_unstarted.start()
    listing, _ = agent_unstarted.call("List", {"unit": "other.service"})
    assert sorted(f["name"] for f in listing["fds"]) == ["a", "b"], agent_unstarted.log.read_text()


# -- disclosure and input validation


def test_status_shows_other_units_only_to_root(agent: Agent) -> None:
    assert agent.run_as("demo.service", STORE_CACHE).returncode == 0
    out = agent.run_as("other.service", 'print(json.dumps(varlink.Client(sock).call("Status")[0]))', uid=NOBODY)
    assert out.returncode == 0, out.stderr
    assert "demo.service" not in out.stdout, out.stdout
    status, _ = agent.call("Status")
    assert [u["unit"] for u in status["units"]] == ["demo.service"]


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("CreateSession", {"unit": "demo.service", "name": None}),
        ("Arm", {"force": "false"}),
        ("Retrieve", {"unit": "demo.service", "names": "cache"}),
        ("Store", {"unit": "demo.service", "names": [1]}),
    ],
)
def test_wrongly_typed_parameters_are_refused(agent: Agent, method: str, params: dict[str, object]) -> None:
    with pytest.raises(errors.InvalidRequest):
        agent.call(method, params)
    alive_and_answering(agent)


def test_longest_unit_names_round_trip(agent_unstarted: Agent, emulator: Emulator) -> None:
    """The longest unit names that can opt in (a drop-in directory UNIT.d fits NAME_MAX) round-trip."""
    agent = agent_unstarted
    unit = "u" * (253 - len(".service")) + ".service"  # 255 with ".d": the longest that can have drop-ins
    agent.opt_in(unit)
    agent.start()
    fd = memfd("cache", b"long")
    agent.call("Store", {"unit": unit, "names": ["cache"]}, [fd])
    os.close(fd)
    emulator.load()
    agent.call("Arm")
    agent.call("Preserve", {"unit": unit})
    emulator.live_update()
    agent.stop()
    agent.start()
    _, fds = agent.call("Retrieve", {"unit": unit})
    assert len(fds) == 1 and os.pread(fds[0], 4, 0) == b"long"
    os.close(fds[0])
    status, _ = agent.call("Status")
    assert status["problems"] == [], "restored whole, its environment file included"


def test_emulator_survives_a_malformed_control_payload(emulator: Emulator) -> None:
    from luo_systemd.liveupdate import EmuControl  # noqa: PLC0415

    for payload in (b"{", b"[]", b'{"cmdline": 5}', b"\xff"):
        with pytest.raises(OSError, match="Invalid argument"):  # EINVAL, as the transport reports errnos
            emulator.transport.control(EmuControl.KEXEC, payload)
    assert emulator.proc.poll() is None
    assert "boot" in emulator.status()


@pytest.mark.parametrize(
    "manifest",
    [
        b'{"format": "io.liveupdate.manifest", "version": 1, "units": ' + b"[" * 100_000,
        json.dumps(
            {
                "format": "io.liveupdate.manifest",
                "version": 1,
                "update_count": 1,
                "written_usec": 0,
                "kernel": "x",
                "units": [{"unit": "../../../etc/evil.service", "session": "", "fds": [], "client_sessions": []}],
            }
        ).encode(),
    ],
    ids=["nested", "path-in-unit-name"],
)
def test_a_hostile_manifest_is_refused_and_luod_starts(
    agent_unstarted: Agent, emulator: Emulator, manifest: bytes
) -> None:
    """The manifest is untrusted input: refused by name, nothing written outside luod's directories."""
    with emulator.backend.device() as dev:
        luod = dev.create_session(b"luod")
    emulator.backend.preserve_fd(luod, memfd("manifest", manifest), 0)
    emulator.live_update()
    agent_unstarted.start()
    status, _ = agent_unstarted.call("Status")
    assert len(status["problems"]) == 1 and "Refusing the manifest" in status["problems"][0]["message"], status
    assert not Path("/etc/evil.service").exists()


def test_a_busy_device_does_not_stall_other_callers(agent: Agent, emulator: Emulator) -> None:
    """EBUSY is waited out without blocking the event loop: others are answered meanwhile."""
    import threading  # noqa: PLC0415

    with emulator.backend.device():  # someone else holds /dev/liveupdate
        waiting = threading.Thread(target=agent.call, args=("Preflight",))
        waiting.start()
        time.sleep(0.2)  # Preflight is in its backoff now
        started = time.monotonic()
        agent.call("List", {"unit": "demo.service"})
        answered = time.monotonic() - started
        waiting.join(10)
    assert answered < 0.5, f"List waited {answered:.2f}s behind a Preflight waiting for the device"
