"""The pure core: names, policy parsing, the manifest format."""

from __future__ import annotations

import copy
import json
import pickle
import re
import sys
from pathlib import Path
from typing import Optional

import pytest

from luo_systemd import config, names
from luo_systemd.api import Problem, refusing
from luo_systemd.broker import judged
from luo_systemd.errors import BadManifest, InvalidName, InvalidRequest
from luo_systemd.manifest import CarriedFd, CarriedUnit, FdKind, Manifest
from luo_systemd.policy import FinishMode, NoReturn, OnPreflightFailure, Policy, PreserveAt, RestoreMode, parse_policy
from luo_systemd.records import NamedTuple
from luo_systemd.uapi import Ioctl

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


@pytest.mark.parametrize("name", ["a", "cache", "x" * 255, "with space", "~!@#$%^&*()"])
def test_valid_fd_names(name: str) -> None:
    assert names.check_fd_name(name) == name


@pytest.mark.parametrize("name", ["", "a:b", "x" * 256, "tab\there", "é"])
def test_invalid_fd_names(name: str) -> None:
    with pytest.raises(InvalidName):
        names.check_fd_name(name)


def test_session_names_fit_and_are_deterministic() -> None:
    assert names.unit_session_name("demo.service") == "luod/demo.service"
    long_unit = "a" * 200 + ".service"
    name = names.unit_session_name(long_unit)
    assert len(name.encode()) <= 63 and name == names.unit_session_name(long_unit)
    assert name != names.unit_session_name("a" * 199 + "b.service")
    assert names.client_session_name("qemu@vm1.service", "iommufd") == "luod/qemu@vm1.service/iommufd"
    assert names.template_of("qemu@vm1.service") == "qemu@.service" and names.template_of("x.service") is None


@pytest.mark.parametrize(
    "name", ["demo.service", "qemu@.service", "qemu@vm1.service", "a.b-c_d:e\\x2d.socket", "x" * 247 + ".service"]
)
def test_valid_unit_names(name: str) -> None:
    assert names.check_unit_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "demo", ".service", "@.service", "a@b@c.service", "demo.unknown", "de mo.service", "demo.service\n",
     "é.service", "x" * 248 + ".service"],
)  # fmt: skip
def test_invalid_unit_names(name: str) -> None:
    with pytest.raises(InvalidName):
        names.check_unit_name(name)


def test_records_are_named_tuples_without_typing_or_collections() -> None:
    """luo_systemd.records builds Policy at run time without typing or collections: defaults, methods,
    immutability, and what collections.namedtuple would give it."""
    policy = Policy(fd_names=("a",))
    assert isinstance(policy, tuple) and policy == Policy(("a",)) and policy.fd_max == 64 and policy.carries("a")
    assert policy._replace(fd_max=1).fd_max == 1 and not Policy(fd_names=("b",)).carries("a")
    assert policy._asdict()["fd_names"] == ("a",) and list(policy._asdict()) == list(Policy._fields)
    assert Policy._make(policy) == policy and copy.deepcopy(policy) == policy == pickle.loads(pickle.dumps(policy))
    assert repr(Policy())[:60] == "Policy(fd_names=(), preserve_at=<PreserveAt.STOP: 'stop'>, f"
    with pytest.raises(AttributeError):
        policy.fd_max = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Policy(fd_maximum=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="without a default follows"):

        class Bad(NamedTuple):
            a: int = 0
            b: int


def test_choices_are_str_enums_without_enum() -> None:
    """luo_systemd.records builds policy's closed sets at run time without enum, as enum.StrEnum would."""
    assert PreserveAt("store") is PreserveAt.STORE and PreserveAt.STORE == "store"
    assert list(PreserveAt) == [PreserveAt.STOP, PreserveAt.STORE]
    assert PreserveAt.STORE.name == "STORE" and PreserveAt.STORE.value == "store" and isinstance(PreserveAt.STORE, str)
    assert copy.deepcopy(PreserveAt.STORE) is PreserveAt.STORE is pickle.loads(pickle.dumps(PreserveAt.STORE))
    with pytest.raises(ValueError, match="'later' is not a valid PreserveAt"):
        PreserveAt("later")


def test_int_choices_are_int_enums_without_enum() -> None:
    """luod's ioctl numbers (uapi.Ioctl, an IntChoice), as enum.IntEnum would have them."""
    create = Ioctl.CREATE_SESSION
    assert Ioctl(0xBA00) is create and create == 0xBA00 and isinstance(create, int) and {create: 1}[0xBA00] == 1
    assert create.name == "CREATE_SESSION" and create.value == 0xBA00 and list(Ioctl)[:2] == [create, Ioctl(0xBA01)]
    assert str(create) == f"{create}" == "47616" and f"{create:#x}" == "0xba00" and repr(create).startswith("<Ioctl.")
    assert copy.deepcopy(create) is create is pickle.loads(pickle.dumps(create))
    with pytest.raises(ValueError, match="1 is not a valid Ioctl"):
        Ioctl(1)


def test_policy_defaults_and_overrides() -> None:
    assert parse_policy(["[Service]\nExecStart=/bin/true\n"]) is None
    default = parse_policy(["[X-LiveUpdate]\n"])
    assert default is not None and default.preserve_at is PreserveAt.STOP and default.finish is FinishMode.AUTO
    policy = parse_policy(
        [
            "[X-LiveUpdate]\nFileDescriptorNames=a b\nOnNoReturn=discard\n",
            "# a drop-in\n[X-LiveUpdate]\nFileDescriptorNames=c\nReturnTimeoutSec=2min\n",
            "[X-LiveUpdate]\nFinish=explicit\nRestore=explicit\n",
        ]
    )
    assert policy is not None and default.restore is RestoreMode.AUTO and policy.restore is RestoreMode.EXPLICIT
    assert policy.fd_names == ("a", "b", "c") and policy.on_no_return is NoReturn.DISCARD
    assert policy.return_timeout_sec == 120 and policy.finish is FinishMode.EXPLICIT
    reset = parse_policy(["[X-LiveUpdate]\nFileDescriptorNames=a\n", "[X-LiveUpdate]\nFileDescriptorNames=\n"])
    assert reset is not None and reset.fd_names == () and reset.carries("anything")
    assert parse_policy([policy.to_section()]) == policy, "the normalized section reads back the same"
    early = parse_policy(["[X-LiveUpdate]\nRestore=early\n"])
    assert early is not None and early.restore is RestoreMode.EARLY and "Restore=early" in early.to_section()


def test_on_preflight_failure_defaults_to_leaving_the_unit_out() -> None:
    default = parse_policy(["[X-LiveUpdate]\n"])
    assert default is not None and default.on_preflight_failure is OnPreflightFailure.LEAVE_OUT
    assert "OnPreflightFailure" not in default.to_section()
    refuse = parse_policy(["[X-LiveUpdate]\nOnPreflightFailure=refuse\n"])
    assert refuse is not None and refuse.on_preflight_failure is OnPreflightFailure.REFUSE
    assert "OnPreflightFailure=refuse" in refuse.to_section() and parse_policy([refuse.to_section()]) == refuse


def test_a_units_problem_refuses_only_if_its_policy_says_so() -> None:
    policies = {
        "cache.service": parse_policy(["[X-LiveUpdate]\n"]),
        "vm.service": parse_policy(["[X-LiveUpdate]\nOnPreflightFailure=refuse\n"]),
    }
    problems = [
        Problem("cache.service", "a file stored twice"),
        Problem("vm.service", "QEMU cannot save its state"),
        Problem("gone.service", "has stored fds but no [X-LiveUpdate] section any more"),
        Problem("", "not enough memory"),
    ]
    got = judged(problems, policies.get)
    assert [p.left_out for p in got] == [True, False, False, False]
    assert [p.unit for p in refusing(got)] == ["vm.service", "gone.service", ""]
    assert got[0].line() == "cache.service: a file stored twice (left out of the live update)"
    assert refusing(judged(problems[:1], policies.get)) == [], "only a unit that may be left out: no veto"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("PreserveAt=later", "expected stop|store"),
        ("Restore=hook", "expected auto|explicit"),
        ("FileDescriptorMax=0", "expected 1..4096"),
        ("ReturnTimeoutSec=soon", "is not a time"),
        ("Unknown=1", "unknown key Unknown="),
        ("FileDescriptorNames=a:b", "contains ':'"),
        ("OnPreflightFailure=ignore", "expected leave-out|refuse"),
    ],
)
def test_policy_errors_name_the_key(line: str, message: str) -> None:
    with pytest.raises((InvalidRequest, InvalidName), match=message):
        parse_policy([f"[X-LiveUpdate]\n{line}\n"])


def manifest() -> Manifest:
    return Manifest(
        update_count=3,
        written_usec=1_700_000_000_000_000,
        kernel="7.2.13",
        units=(
            CarriedUnit("demo.service", "luod/demo.service", (CarriedFd("cache", FdKind.MEMFD, 0, token=1),)),
            CarriedUnit(
                "qemu@vm1.service",
                "",
                (CarriedFd("dev", FdKind.SESSION, 2, session="vm1-dev"),),
                (("iommufd", "luod/qemu@vm1.service/iommufd"),),
            ),
        ),
    )


def test_manifest_round_trip() -> None:
    assert Manifest.decode(manifest().encode()) == manifest()


def test_manifest_records_replace_and_take_back_units() -> None:
    """A session's records, token 0 first: a later record replaces a unit of the same name or takes it back
    (``gone``); the header is the last record's.  A version-1 manifest (one document) is still read."""
    whole = manifest()
    demo = CarriedUnit("demo.service", "luod/demo.service", (CarriedFd("cache", FdKind.MEMFD, 5, token=1),))
    later = whole._replace(written_usec=whole.written_usec + 1, units=(demo,))
    gone = later._replace(units=())
    replayed = Manifest.replay([whole.encode(), later.encode(), gone.encode(("qemu@vm1.service",))])
    assert replayed == later._replace(units=(demo,))
    v1 = json.loads(whole.encode())
    del v1["gone"]
    v1["version"] = 1
    assert Manifest.decode(json.dumps(v1).encode()) == whole
    with pytest.raises(BadManifest, match=r"record 1 \(version 2\) follows a version 1 record"):
        Manifest.replay([json.dumps(v1).encode(), later.encode()])
    with pytest.raises(BadManifest, match="no record"):
        Manifest.replay([])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=3), "version 3 is not understood"),
        (lambda d: d.pop("gone"), "malformed"),
        (lambda d: d.update(format="something else"), "no 'format"),
        (lambda d: d["units"][0]["fds"][0].update(token=-1), "malformed"),
        (lambda d: d.pop("units"), "malformed"),
    ],
)
def test_manifest_refused_when_not_understood(mutate: object, message: str) -> None:
    doc = json.loads(manifest().encode())
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(BadManifest, match=message):
        Manifest.decode(json.dumps(doc).encode())
    with pytest.raises(BadManifest, match="not JSON"):
        Manifest.decode(b"\x00garbage")


SETS_NOTHING = '# luod(8) configuration\n\n[agent]\n#backend = "kernel"\r\n  # indented\t\n'
SIMPLE = '[agent]\nbackend = "emulator"\n\tmax_fds_total=0\r\ndbus = false\n'


@pytest.mark.parametrize(
    ("text", "settings"),
    [
        (SETS_NOTHING, {}),  # what the package ships: comments, blank lines, one [agent]
        ("", {}),
        (SIMPLE, {"backend": "emulator", "max_fds_total": 0, "dbus": False}),
        ('[agent]\nenv_dir = "/run/é\tx #1"\nbusy_retries = 12\n', {"env_dir": "/run/é\tx #1", "busy_retries": 12}),
        # Everything else is tomllib's: what it reads differently, or refuses.
        ("[agent]\n[agent]\n", None),  # a table defined twice: refused
        ("# a comment with a\x01control character\n", None),  # refused
        ("[ agent ]\n", None),  # the same table to TOML, but not this rule's to judge
        ("[other]\n", None),
        ('backend = "emulator"\n[agent]\n', None),  # outside the table
        ("[agent]\nbusy_retries = 1\nbusy_retries = 2\n", None),  # set twice: refused
        ('[agent]\nbackend = "emulator" # a comment\n', None),
        ('[agent]\nbackend = "emu\\u006cator"\n', None),  # an escape
        ('[agent]\nbackend = "a"b"\n', None),  # refused
        ("[agent]\nbackend = 'emulator'\n", None),  # a literal string
        ('[agent]\n"backend" = "emulator"\n', None),  # a quoted key
        ("[agent]\nagent.dbus = true\n", None),  # a dotted key
        ("[agent]\nbusy_retries = 01\n", None),  # refused
        ("[agent]\nbusy_retries = 1_000\n", None),
        ("[agent]\nbusy_retries = +1\n", None),
        ("[agent]\nbusy_retries = \u0661\n", None),  # a digit to str.isdigit, not to TOML: refused
        ("[agent]\ndbus = True\n", None),  # refused
        ("[agent]\ndbus =\n", None),  # refused
        ("[agent]\ndbus\n", None),  # refused
        ('[agent]\nsystemctl = ["systemctl"]\n', None),  # an array
        ('[agent]\nbackend = "x\x7f"\n', None),  # a control character: refused
        ("[agent]\ndbus = true\r", None),  # a lone CR: refused
    ],
)
def test_simple_files_are_read_without_tomllib(text: str, settings: Optional[dict[str, object]]) -> None:
    assert config.simple_settings(text.encode()) == settings
    if settings is not None:  # read as tomllib reads it
        assert tomllib.loads(text).get("agent", {}) == settings


def test_what_tomllib_reads_outcomes_unchanged(tmp_path: Path) -> None:
    """What simple_settings leaves to tomllib is parsed, or refused, as before."""
    twice, control, quoted = tmp_path / "twice.toml", tmp_path / "control.toml", tmp_path / "quoted.toml"
    twice.write_text("[agent]\n[agent]\n")
    control.write_bytes(b"# \x01\n")
    quoted.write_text('[agent]\n"busy_retries" = 3 # quoted\n')
    for path in (twice, control):
        with pytest.raises(InvalidRequest, match=re.escape(str(path))):
            config.load([str(path)])
    assert config.load([str(quoted)]) == config.Config(busy_retries=3)


def test_config_types_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "luod.toml"
    path.write_text('[agent]\nsystemctl = ["systemctl", "--no-ask-password"]\nmax_fds_total = 10\n')
    assert config.load([str(path)]) == config.Config(systemctl=("systemctl", "--no-ask-password"), max_fds_total=10)
    path.write_text('[agent]\nsystemctl = "systemctl"\n')
    with pytest.raises(InvalidRequest, match=r"agent\.systemctl must be a list"):
        config.load([str(path)])
    path.write_text("[agent]\nmax_fds = 10\n")
    with pytest.raises(InvalidRequest, match=r"unknown setting agent\.max_fds"):
        config.load([str(path)])
