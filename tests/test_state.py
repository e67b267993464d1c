"""luod's state log (state.py): what it holds after every cut a crash can make, what it refuses, and that a
change writes what changed; the same for the manifest's records in LUO.  The broker in-process on the
emulator, its fd store a dict (as systemd keeps it); every step boundary of a real luod is
tests/test_crash.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest

from luo_systemd import state
from luo_systemd.api import Caller
from luo_systemd.broker import Broker, BrokerConfig
from luo_systemd.errors import BadManifest, KernelError, LimitExceeded
from luo_systemd.ownedfd import OwnedFd
from luo_systemd.policy import Policy, parse_policy
from luo_systemd.state import RECORD_HEADER, STATE_KEY_PREFIX, decode, read_all, replay
from tests.contract.scenarios import memfd
from tests.harness import Emulator, close_held, restore

ROOT = Caller(uid=0, pid=os.getpid(), unit=None)
POLICY = parse_policy(["[X-LiveUpdate]\nFileDescriptorMax=64\n"])
AT_STORE = parse_policy(["[X-LiveUpdate]\nPreserveAt=store\n"])  # every Store writes the manifest


class DictFdStore:
    """What systemd's fd store does with FDSTORE=1 and FDSTOREREMOVE=1, and what was written to it."""

    def __init__(self) -> None:
        self.fds: dict[str, list[int]] = {}

    def keep(self, key: str, *fds: int) -> None:
        self.fds.setdefault(key, []).extend(os.dup(fd) for fd in fds)

    def drop(self, key: str) -> None:
        for fd in self.fds.pop(key):
            os.close(fd)

    def log(self) -> tuple[str, bytes]:
        """The newest log: its key and its bytes."""
        keys = [k for k in self.fds if k.startswith(STATE_KEY_PREFIX)]
        assert len(keys) == 1, keys  # a log leaves the store once its successor is in it
        return keys[0], read_all(self.fds[keys[0]][0], state.LOG_MAX)

    def handed_back(self) -> dict[str, list[int]]:
        """Copies of what it keeps, as systemd hands its fd store to a restarted service."""
        return {k: [os.dup(fd) for fd in fds] for k, fds in self.fds.items()}

    def close(self) -> None:
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)


@pytest.fixture
def fdstore() -> Iterator[DictFdStore]:
    store = DictFdStore()
    yield store
    store.close()


def broker(emulator: Emulator, store: DictFdStore, env_dir: Path, policy: Policy = POLICY) -> Broker:
    def policy_of(unit: str) -> Optional[Policy]:
        return policy

    return Broker(emulator.backend, policy_of, store, BrokerConfig(env_dir=str(env_dir)))


def store_one(b: Broker, unit: str, name: str, content: bytes = b"x") -> None:
    fd = OwnedFd(memfd(name, content))
    try:
        b.store(ROOT, unit, [(name, fd)])  # the broker takes it
    finally:
        fd.close()  # a refused call leaves it to us


def held(doc: dict[str, object]) -> dict[str, list[str]]:
    """unit -> stored fd names, of a replayed log."""
    units = doc["units"]
    assert isinstance(units, list)
    return {u["unit"]: [e["name"] for e in u["stored"]] for u in units}


def records(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every record of a log."""
    out, offset = [], 0
    while offset < len(data):
        length, _ = RECORD_HEADER.unpack_from(data, offset)
        out.append((offset, offset + RECORD_HEADER.size + length))
        offset = out[-1][1]
    return out


def test_every_torn_tail_reads_as_the_change_before(emulator: Emulator, fdstore: DictFdStore, tmp_path: Path) -> None:
    """A SIGKILL inside the append leaves a prefix of the record: at every byte of it, the log reads as the
    state before that change (never acknowledged), and with all of it, as the state after."""
    b = broker(emulator, fdstore, tmp_path)
    store_one(b, "a.service", "one")
    store_one(b, "b.service", "two")
    _, before = fdstore.log()
    store_one(b, "a.service", "three")
    _, after = fdstore.log()
    assert after.startswith(before) and len(records(after)) == len(records(before)) + 1, "appended in place"
    assert held(replay(after)) == {"a.service": ["one", "three"], "b.service": ["two"]}
    for cut in range(len(before), len(after)):
        assert held(replay(after[:cut])) == {"a.service": ["one"], "b.service": ["two"]}, cut


def test_a_damaged_record_is_refused_not_replayed(emulator: Emulator, fdstore: DictFdStore, tmp_path: Path) -> None:
    b = broker(emulator, fdstore, tmp_path)
    store_one(b, "a.service", "one")
    store_one(b, "a.service", "two")
    _, data = fdstore.log()
    start, end = records(data)[-1]
    damaged = bytearray(data)
    damaged[end - 3] ^= 0x20  # inside the last record's JSON: whole, but not what was written
    with pytest.raises(BadManifest, match=f"record at byte {start} fails its checksum"):
        replay(bytes(damaged))
    with pytest.raises(BadManifest, match="no complete record"):
        replay(data[: records(data)[0][1] - 1])  # a log is in the store only once its snapshot is whole
    not_first = data[start:end]
    with pytest.raises(BadManifest, match="not a snapshot where it must be"):
        replay(not_first)


def test_a_change_writes_what_changed(emulator: Emulator, fdstore: DictFdStore, tmp_path: Path) -> None:
    """The record of a change to one unit is as large with 200 units held as with 2."""
    sizes = {}
    for count in (2, 200):
        b = broker(emulator, fdstore, tmp_path)
        for i in range(count):
            store_one(b, f"u{i}.service", "f")
        _, before = fdstore.log()
        store_one(b, "u0.service", "g")
        _, after = fdstore.log()
        sizes[count] = len(after) - len(before)
        for i in range(count):
            b.discard(ROOT, f"u{i}.service")
        fdstore.close()
        fdstore.fds.clear()
    assert 0 < sizes[200] <= sizes[2] + 8, sizes  # the unit's name and the key's number may grow by digits


def test_compaction_starts_a_new_log_and_recovery_reads_it(
    emulator: Emulator, fdstore: DictFdStore, tmp_path: Path
) -> None:
    """Appends past the snapshot's size (and the floor) start a new log; the old one leaves the fd store
    after the new one entered it; a luod started on the fd store finds what was acknowledged."""
    b = broker(emulator, fdstore, tmp_path)
    keys = set()
    for i in range(600):
        store_one(b, "a.service", f"f{i % 40}", f"{i}".encode())
        key, data = fdstore.log()
        keys.add(key)
        assert len(data) <= 2 * max(len(data[: records(data)[0][1]]), state.COMPACT_FLOOR) + 4096
    assert len(keys) > 2, "compacted more than once"
    kept = DictFdStore()  # luod restarted: systemd keeps its fd store and hands luod copies
    kept.fds = fdstore.handed_back()
    again = broker(emulator, kept, tmp_path)
    assert again.recover(kept.handed_back())
    assert kept.log()[0] not in keys, "recovery starts a new log"
    listing = again.list_fds(ROOT, "a.service")
    assert sorted(f.name for f in listing) == sorted(f"f{i}" for i in range(40))
    restored = again.units["a.service"].stored["f39"].held.fd
    assert os.pread(restored, 8, 0) == b"599"
    kept.close()


def test_a_failed_append_is_never_followed(
    emulator: Emulator, fdstore: DictFdStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that fails half-way (the memory cgroup full) leaves a torn tail; no record may follow it,
    so the next change starts a new log."""
    b = broker(emulator, fdstore, tmp_path)
    store_one(b, "a.service", "one")
    old_key, _ = fdstore.log()
    real_pwrite = os.pwrite

    def half_then_fail(fd: int, data: bytes, offset: int) -> int:
        if len(data) > 8:
            return real_pwrite(fd, bytes(data)[: len(data) // 2], offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", half_then_fail)
    with pytest.raises(OSError):
        store_one(b, "a.service", "two")
    monkeypatch.undo()
    _, torn = fdstore.log()
    assert held(replay(torn)) == {"a.service": ["one"]}, "the refused call is not in the log"
    store_one(b, "a.service", "three")
    new_key, data = fdstore.log()
    assert new_key != old_key and {"one", "three"} <= set(held(replay(data))["a.service"])
    got = decode(data, fdstore.fds)
    assert {"one", "three"} <= set(got.units["a.service"].stored), "every fd the new log names is in the store"


def outgoing_files(emulator: Emulator) -> int:
    outgoing = emulator.status()["outgoing"]
    assert isinstance(outgoing, dict)
    return int(outgoing["files"])


def test_the_manifest_is_records_and_restores_whole(emulator: Emulator, fdstore: DictFdStore, tmp_path: Path) -> None:
    """Each Store of a PreserveAt=store unit appends a record to the session luod; once the records
    outnumber twice the units plus 64, the session is written whole again.  After the kexec the records
    read back as the last state of every unit."""
    b = broker(emulator, fdstore, tmp_path, AT_STORE)
    for unit in ("a.service", "b.service", "c.service"):
        store_one(b, unit, "mem", unit.encode())
    most = 0
    for i in range(200):
        store_one(b, "a.service", "mem", f"a{i}".encode())
        most = max(most, outgoing_files(emulator))
    # The three units' memfds, and the manifest's records: never more than 2 * 3 + 64 + 1 of them.
    assert 3 + 2 <= most <= 3 + 2 * 3 + 64 + 1, most
    b.discard(ROOT, "c.service")  # a record naming it gone
    emulator.live_update()
    after = broker(emulator, DictFdStore(), tmp_path / "after", AT_STORE)
    manifest = restore(after)
    assert manifest is not None and sorted(u.unit for u in manifest.units) == ["a.service", "b.service"]
    got = dict(after.retrieve(ROOT, "a.service", [], 10))
    assert os.pread(got["mem"], 8, 0) == b"a199"
    os.close(got["mem"])


def test_an_fd_the_fd_store_lost_costs_only_itself(emulator: Emulator, fdstore: DictFdStore, tmp_path: Path) -> None:
    """systemd drops a push it cannot keep (past FileDescriptorStoreMax=), silently.  A restarted luod whose
    log names an fd the fd store lacks recovers everything else, and reports the loss as the unit's problem
    (liveupdatectl verify fails that unit), once."""
    b = broker(emulator, fdstore, tmp_path)
    store_one(b, "a.service", "x", b"X")
    store_one(b, "b.service", "y", b"Y")
    store_one(b, "b.service", "z", b"Z")
    lost = b.units["b.service"].stored["y"].held.key
    fdstore.drop(lost)
    close_held(b)

    def restarted() -> Broker:
        again = broker(emulator, fdstore, tmp_path / "again")
        assert again.recover(fdstore.handed_back())
        return again

    again = restarted()
    contents = {(u, n): os.pread(e.held.fd, 1, 0) for u, s in again.units.items() for n, e in s.stored.items()}
    assert contents == {("a.service", "x"): b"X", ("b.service", "z"): b"Z"}
    assert [(p.unit, lost in p.message) for p in again.problems] == [("b.service", True)]
    store_one(again, "c.service", "w")  # a change: the log no longer names the lost fd
    close_held(again)
    again = restarted()
    assert sorted(again.units["b.service"].stored) == ["z"] and len(again.problems) == 1
    close_held(again)


def test_the_last_preserve_the_arm_awaits_writes_the_manifest_whole(
    emulator: Emulator, fdstore: DictFdStore, tmp_path: Path
) -> None:
    """Units preserved as they stop: each Preserve appends a record, and the last one the arm expected (every
    unit with stored fds) writes the manifest whole, one record for the next boot to read.  A Preserve after
    it appends again (a whole manifest per Preserve would grow with the units)."""
    b = broker(emulator, fdstore, tmp_path)
    units = ("a.service", "b.service", "c.service")
    for unit in units:
        store_one(b, unit, "mem", unit.encode())
    b.arm(ROOT, force=True)  # force: the agent under test is no '@' process
    b.preserve(ROOT, "a.service")
    b.preserve(ROOT, "b.service")
    assert outgoing_files(emulator) == 2 + 2, "two memfds, a record per Preserve"
    b.preserve(ROOT, "c.service")
    assert outgoing_files(emulator) == 3 + 1, "the last awaited Preserve: one whole record"
    b.preserve(ROOT, "a.service")  # a unit that stops again
    assert outgoing_files(emulator) == 3 + 2
    emulator.live_update()
    after = broker(emulator, DictFdStore(), tmp_path / "after")
    manifest = restore(after)
    assert manifest is not None and sorted(u.unit for u in manifest.units) == list(units)
    for unit in units:
        (name, fd), *_ = after.retrieve(ROOT, unit, [], 10)
        assert (name, os.pread(fd, 16, 0)) == ("mem", unit.encode())
        os.close(fd)
    close_held(after)


def test_restored_memfds_are_one_push_and_a_release_splits_it(
    emulator: Emulator, fdstore: DictFdStore, tmp_path: Path
) -> None:
    """A unit's restored memfds enter the fd store in one push, under one name; a restarted luod tells them
    apart by inode.  Releasing one (Remove) gives the others keys of their own (new open files: systemd
    keeps an open file once) before the name leaves the fd store, and a restart finds each by its content."""
    b = broker(emulator, fdstore, tmp_path, AT_STORE)
    for name in ("a", "b", "c"):
        store_one(b, "x.service", name, name.upper().encode())
    emulator.live_update()
    after_store = DictFdStore()
    after = broker(emulator, after_store, tmp_path / "after", AT_STORE)
    restore(after)
    (group,) = [key for key, fds in after_store.fds.items() if len(fds) == 3]
    assert after.finish(ROOT, "x.service")

    def contents_after_a_restart() -> dict[str, bytes]:
        kept = DictFdStore()  # luod restarted: systemd keeps its fd store and hands luod copies
        kept.fds = after_store.handed_back()
        again = broker(emulator, kept, tmp_path / "again", AT_STORE)
        assert again.recover(kept.handed_back())
        got = {n: os.pread(e.held.fd, 1, 0) for n, e in again.units["x.service"].stored.items()}
        close_held(again)
        kept.close()
        return got

    assert contents_after_a_restart() == {"a": b"A", "b": b"B", "c": b"C"}
    after.remove(ROOT, "x.service", ["b"])
    assert group not in after_store.fds and all(len(fds) == 1 for fds in after_store.fds.values())
    assert contents_after_a_restart() == {"a": b"A", "c": b"C"}
    close_held(after)
    after_store.close()


def test_a_failed_manifest_record_leaves_no_manifest_until_written_whole(
    emulator: Emulator, fdstore: DictFdStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record that cannot be preserved must not leave a manifest that is wrong about the unit: the session
    is closed, and the next change writes the whole manifest, other units included."""
    b = broker(emulator, fdstore, tmp_path, AT_STORE)
    store_one(b, "a.service", "mem", b"A")
    store_one(b, "b.service", "mem", b"B")
    real = b.backend.preserve_fd

    def refuse_the_manifest(session: int, fd: int, token: int) -> None:
        if session == (b.manifest_session.fd if b.manifest_session else None):
            raise KernelError(f"Failed to preserve token {token}", 12, "out of memory")
        real(session, fd, token)

    monkeypatch.setattr(b.backend, "preserve_fd", refuse_the_manifest)
    with pytest.raises(KernelError):
        store_one(b, "a.service", "mem", b"A2")
    assert b.manifest_session is None
    monkeypatch.undo()
    b.remove(ROOT, "a.service", ["mem"])  # a change of a.service alone
    emulator.live_update()
    manifest = restore(broker(emulator, DictFdStore(), tmp_path / "after", AT_STORE))
    assert manifest is not None and [u.unit for u in manifest.units] == ["b.service"]


def test_the_limit_in_all_is_counted_through_every_change(
    emulator: Emulator, fdstore: DictFdStore, tmp_path: Path
) -> None:
    """max_fds_total is kept by a count of what changed (a Store does not sum every unit's fds): it stays
    right through a replaced name, Remove, Discard, a refused Store, a recovery and a Finish."""

    def limited(store: DictFdStore, env_dir: Path) -> Broker:
        return Broker(emulator.backend, lambda unit: POLICY, store, BrokerConfig(max_fds_total=4, env_dir=str(env_dir)))

    def refused(b: Broker, unit: str, name: str) -> None:
        with pytest.raises(LimitExceeded, match="at most 4 fds in all"):
            store_one(b, unit, name)

    b = limited(fdstore, tmp_path)
    store_one(b, "a.service", "f0")
    store_one(b, "a.service", "f1")
    store_one(b, "b.service", "g0")
    store_one(b, "a.service", "f0")  # replaced: still three
    store_one(b, "b.service", "g1")
    refused(b, "c.service", "h0")
    refused(b, "c.service", "h0")  # a refusal counts nothing
    b.remove(ROOT, "a.service", ["f1"])
    store_one(b, "c.service", "h0")
    refused(b, "c.service", "h1")
    b.discard(ROOT, "c.service")
    store_one(b, "d.service", "k0")
    refused(b, "e.service", "m0")

    kept = DictFdStore()  # luod restarted on its fd store: the count is rebuilt from the recovered state
    kept.fds = fdstore.handed_back()
    again = limited(kept, tmp_path)
    assert again.recover(kept.handed_back())
    refused(again, "e.service", "m0")
    again.remove(ROOT, "d.service", ["k0"])
    store_one(again, "e.service", "m0")

    emulator.load()
    again.arm(ROOT, force=True)  # force: the agent under test is no '@' process
    for unit in ("a.service", "b.service", "e.service"):
        again.preserve(ROOT, unit)
    emulator.kexec()
    after = limited(DictFdStore(), tmp_path / "after")
    assert restore(after) is not None
    store_one(after, "x.service", "n0")  # restored fds are stored again only when their unit finishes
    after.remove(ROOT, "x.service", ["n0"])
    for unit in ("a.service", "b.service", "e.service"):
        assert after.finish(ROOT, unit)
    refused(after, "x.service", "n0")
    kept.close()
