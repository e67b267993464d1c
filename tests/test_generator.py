"""luo-systemd-generator: golden files, and systemd-analyze verify of what it writes.

tests/generator/input/ holds unit files (opted in, malformed, masked, not opted in, opted in by a drop-in);
expected-VERSION/ what the generator must write for that systemd version.  After an intended change of the
output, ``LUO_UPDATE_GOLDEN=1 scripts/test.sh tests/test_generator.py`` rewrites them: review the diff.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from luo_systemd import generator

TOP = Path(__file__).resolve().parent.parent
CASES = TOP / "tests" / "generator"
INPUT = ["tests/generator/input/etc", "tests/generator/input"]  # relative: the fragment path is in the output


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("version", [252, 257, 262])
def test_golden(version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TOP)
    result = generator.plan(generator.collect_units(INPUT), version)
    expected = tree(CASES / f"expected-{version}")
    if os.environ.get("LUO_UPDATE_GOLDEN"):
        for rel, content in result.files.items():
            (CASES / f"expected-{version}" / rel).parent.mkdir(parents=True, exist_ok=True)
            (CASES / f"expected-{version}" / rel).write_text(content)
        pytest.skip("golden files rewritten")
    assert result.files == expected
    assert result.problems == (
        "bad.service: ignoring its [X-LiveUpdate] section (tests/generator/input/bad.service): "
        "PreserveAt='sometimes': expected stop|store",
    )


def test_main_writes_the_plan(tmp_path: Path) -> None:
    env = dict(os.environ, SYSTEMD_UNIT_PATH=":".join(INPUT))
    subprocess.run(
        [sys.executable, "generators/luo-systemd-generator", str(tmp_path), str(tmp_path), str(tmp_path)],
        cwd=TOP,
        env=env,
        check=True,
    )
    expected = generator.plan(
        generator.collect_units(INPUT),
        generator.systemd_version(),
        generator.hook_command(),
        generator.kexec_handover_boot(env),
    )
    assert tree(tmp_path) == expected.files


def boot_params(root: Path, types: list[str]) -> str:
    """A /sys/kernel/boot_params with one setup_data entry of each type, as x86 kernels list them."""
    for i, kind in enumerate(types):
        (root / "setup_data" / str(i)).mkdir(parents=True)
        (root / "setup_data" / str(i) / "type").write_text(kind + "\n")
    root.mkdir(exist_ok=True)
    (root / "version").write_text("0x020f\n")
    return str(root)


def test_kexec_handover_boot_from_the_setup_data(tmp_path: Path) -> None:
    kho, rng, none = tmp_path / "kho", tmp_path / "rng", tmp_path / "none"
    assert generator.kexec_handover_boot({}, boot_params(kho, ["0x9", "0xa"]))  # RNG seed and KHO (kexec)
    assert not generator.kexec_handover_boot({}, boot_params(rng, ["0x9"]))  # a boot loader's RNG seed only
    assert not generator.kexec_handover_boot({}, boot_params(none, []))
    # Cannot tell: wait for luod.
    assert generator.kexec_handover_boot({}, str(tmp_path / "absent"))  # not x86
    assert generator.kexec_handover_boot({"SYSTEMD_VIRTUALIZATION": "container:systemd-nspawn"}, str(none))
    assert generator.kexec_handover_boot({"container": "systemd-nspawn"}, str(none))
    assert generator.kexec_handover_boot({"SYSTEMD_SCOPE": "user"}, str(none))
    assert not generator.kexec_handover_boot({"SYSTEMD_VIRTUALIZATION": "vm:qemu"}, str(none))


def test_only_a_boot_after_a_live_update_runs_the_restore_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restore=auto: the unit never waits for luod's READY=1, only for its socket; luo-hook start asks luod
    what was restored (the call waits in the socket) in a boot that may follow a live update, and no
    process runs before the start in any other boot.  Finish=auto: luo-finish@ is pulled in, outside the
    unit's start (no ExecStartPost=), in that boot only."""
    monkeypatch.chdir(TOP)
    units = generator.collect_units(INPUT)
    after_kexec = generator.plan(units, 262, handed_over=True).files["demo.service.d/50-liveupdate.conf"]
    cold = generator.plan(units, 262, handed_over=False).files["demo.service.d/50-liveupdate.conf"]
    for dropin in (after_kexec, cold):
        lines = dropin.splitlines()
        assert "After=luod.socket" in lines and "Wants=luod.service" in lines, dropin
        assert "After=luod.service" not in lines, dropin
        assert not [line for line in lines if line.startswith("ExecStartPost=")], dropin
    hook, wants = "ExecStartPre=-/usr/bin/luo-hook start %n\n", "Wants=luo-finish@%n.service\n"
    finisher = after_kexec[after_kexec.index("# Finishes") : after_kexec.index(wants) + len(wants)]  # and its comment
    assert hook in after_kexec and finisher in after_kexec
    assert cold == after_kexec.replace(hook, "").replace(finisher, ""), "the same drop-in less the hooks"


def test_the_finisher_runs_the_hook_once_the_unit_started(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TOP)
    unit = generator.plan(generator.collect_units(INPUT), 262).files["luo-finish@.service"].splitlines()
    assert {"Requires=%i", "After=%i", "ConditionPathExists=/run/luod/env/%i", "Type=oneshot"} <= set(unit)
    assert "ExecStart=-/usr/bin/luo-hook started %i" in unit
    assert not [line for line in unit if line.startswith(("User=", "DynamicUser="))], "root may finish any unit"


@pytest.mark.parametrize(
    ("name", "section", "finisher", "post"),
    [
        ("a.service", "Finish=explicit", False, False),  # the service calls Finish itself
        ("a" * 228 + ".service", "", True, False),  # luo-finish@ + 236 characters + .service: 255
        ("a" * 229 + ".service", "", False, True),  # one more is not a unit name: the unit finishes itself
        ("t" * 230 + "@.service", "", True, False),  # a template: its instances' names are not known here
    ],
    ids=["explicit", "longest", "too-long", "template"],
)
def test_who_finishes_a_unit(tmp_path: Path, name: str, section: str, finisher: bool, post: bool) -> None:
    (tmp_path / name).write_text(f"[Service]\nExecStart=/bin/true\n[X-LiveUpdate]\n{section}\n")
    dropin = generator.plan(generator.collect_units([str(tmp_path)]), 262).files[f"{name}.d/50-liveupdate.conf"]
    lines = dropin.splitlines()
    assert ("Wants=luo-finish@%n.service" in lines) is finisher, dropin
    assert ("ExecStartPost=-/usr/bin/luo-hook started %n" in lines) is post, dropin


@pytest.mark.parametrize(("restore", "waits_after_kexec"), [("explicit", True), ("early", False)])
def test_a_unit_that_asks_luod_itself(tmp_path: Path, restore: str, waits_after_kexec: bool) -> None:
    """Restore=explicit: the service asks when LIVEUPDATE_RESTORED=1 is in its environment, so after a live
    update it waits for luod's READY=1 (luod writes the file before).  Restore=early: it asks at every start
    (luo-qemu@.service), so only luod's socket must be there.  Neither has a hook before the start."""
    units_dir = tmp_path / "units"
    units_dir.mkdir()
    (units_dir / "vm.service").write_text(f"[Service]\nExecStart=/bin/true\n[X-LiveUpdate]\nRestore={restore}\n")
    units = generator.collect_units([str(units_dir)])
    for handed_over in (True, False):
        dropin = generator.plan(units, 262, handed_over=handed_over).files["vm.service.d/50-liveupdate.conf"]
        lines = dropin.splitlines()
        assert "After=luod.socket" in lines and "Wants=luod.service" in lines, dropin
        assert ("After=luod.service" in lines) == (handed_over and waits_after_kexec), dropin
        assert f"Restore={restore}" in lines
        assert not [line for line in lines if line.startswith("ExecStartPre=")], dropin


def test_systemd_version_is_found() -> None:
    assert generator.systemd_version() >= 252


def test_unit_path_follows_systemd() -> None:
    assert generator.unit_path({})[0] == "/etc/systemd/system"
    assert generator.unit_path({"SYSTEMD_SCOPE": "user"})[0] == "/etc/systemd/user"
    assert generator.unit_path({"SYSTEMD_UNIT_PATH": "/a:/b"}) == ["/a", "/b"]
    assert generator.unit_path({"SYSTEMD_UNIT_PATH": "/a:"})[:2] == ["/a", "/etc/systemd/system"]


def test_units_and_generated_dropins_verify(tmp_path: Path) -> None:
    """systemd-analyze verify --man=no prints nothing for our units and the drop-ins the generator writes."""
    units = tmp_path / "units"
    units.mkdir()
    for name in ("luod.service", "luod.socket", "liveupdate.target"):
        (units / name).write_text((TOP / "units" / name).read_text())
    for name in ("demo.service", "qemu@.service", "vendor.service"):
        (units / name).write_text(
            (CASES / "input" / name)
            .read_text()
            .replace("/usr/bin/qemu-system-x86_64", "/bin/true")
            .replace("/usr/bin/vendord", "/bin/true")
        )
    (units / "vendor.service.d").mkdir()
    (units / "vendor.service.d" / "liveupdate.conf").write_text(
        (CASES / "input/vendor.service.d/liveupdate.conf").read_text()
    )
    result = generator.plan(
        generator.collect_units([str(units)]), generator.systemd_version(), generator.hook_command()
    )
    generator.write_plan(str(units), result)
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:")
    for unit in (
        "luod.service",
        "luod.socket",
        "liveupdate.target",
        "demo.service",
        "qemu@vm1.service",
        "vendor.service",
        "luo-finish@demo.service.service",
        "luo-finish@qemu@vm1.service.service",
    ):
        proc = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", unit], env=env, capture_output=True, text=True, check=False
        )
        assert (proc.returncode, proc.stdout + proc.stderr) == (0, ""), unit
