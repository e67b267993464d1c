"""The distribution packages: the Debian ones built for real by packaging/build-deb.sh (cached in
$LUO_CACHE/deb/: a rebuild only when the tree changed), their contents, dependencies and maintainer scripts;
and the files that packaging/ keeps in step with the project (versions, man page lists, the documented default
configuration)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from luo_systemd import config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

TOP = Path(__file__).resolve().parent.parent
PACKAGING = TOP / "packaging"
BUILD_DEB = PACKAGING / "build-deb.sh"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MAN_SOURCES = TOP / "docs" / "man"
COMMANDS = ("luod", "liveupdatectl", "luo-hook", "luo-emu", "luo-qemu")


# -- what packaging/ keeps in step with the project (fast, no build)


def rules_manpages() -> list[str]:
    match = re.search(r"^MANPAGES := (.*)$", (PACKAGING / "debian" / "rules").read_text(), re.MULTILINE)
    assert match, "debian/rules has no MANPAGES := line"
    return match.group(1).split()


def spec_text() -> str:
    return (PACKAGING / "rpm" / "luo-systemd.spec").read_text()


def test_versions_agree() -> None:
    project = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]["version"]
    changelog = re.match(r"luo-systemd \(([^)]+)\)", (PACKAGING / "debian" / "changelog").read_text())
    spec = re.search(r"^Version:\s+(\S+)$", spec_text(), re.MULTILINE)
    assert changelog and spec
    assert (changelog.group(1).split("-")[0], spec.group(1)) == (project, project)


def test_man_page_lists_agree() -> None:
    spec = re.search(r"^%global manpages (.*)$", spec_text(), re.MULTILINE)
    assert spec
    assert rules_manpages() == spec.group(1).split()
    sources = sorted(p.name.removesuffix(".rst") for p in MAN_SOURCES.glob("*.rst"))
    assert sorted(rules_manpages()) == sources, "docs/man/*.rst and the packages' man page lists differ"


def uncommented_defaults(text: str) -> str:
    """packaging/luod.toml with its '#key = value' lines made live."""
    return "\n".join(re.sub(r"^#(\w+ = .*)$", r"\1", line) for line in text.splitlines())


def test_default_config_documents_every_setting(tmp_path: Path) -> None:
    shipped = (PACKAGING / "luod.toml").read_text()
    assert config.load([str(PACKAGING / "luod.toml")]) == config.Config(), "the shipped file must change nothing"
    live = tmp_path / "luod.toml"
    live.write_text(uncommented_defaults(shipped))
    documented = set(tomllib.loads(live.read_text())["agent"])
    assert documented == set(config.Config._fields)
    assert config.load([str(live)]) == config.Config(), "a documented default differs from the built-in one"


def test_emulator_dropin_selects_the_emulator() -> None:
    files = [str(PACKAGING / "luod.toml"), str(PACKAGING / "emulator" / "50-emulator.toml")]
    assert config.load(files) == config.Config(backend="emulator")


# -- the Debian packages, built


def pkg_config(variable: str) -> str:
    argv = ["pkg-config", f"--variable={variable}", "systemd"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip(), f"pkg-config systemd has no {variable}"
    return proc.stdout.strip()


def cannot_build() -> str:
    """Why dpkg-buildpackage cannot run here, or '' when it can (build-deb.sh installs what is missing)."""
    if not shutil.which("dpkg", path=SYSTEM_PATH):
        return "this is not a Debian system (no dpkg)"
    if os.geteuid() == 0 and shutil.which("apt-get", path=SYSTEM_PATH):
        return ""
    check = subprocess.run(
        ["dpkg-checkbuilddeps", str(PACKAGING / "debian" / "control")],
        capture_output=True,
        text=True,
        env={"PATH": SYSTEM_PATH, "LC_ALL": "C.UTF-8"},
        check=False,
    )
    if check.returncode != 0:
        return f"build dependencies are missing and only root can install them: {check.stderr.strip()}"
    return ""


@dataclass(frozen=True)
class Entry:
    mode: str
    path: str  # absolute, as installed


@dataclass(frozen=True)
class Deb:
    path: Path

    def contents(self) -> dict[str, Entry]:
        out = subprocess.run(["dpkg-deb", "-c", str(self.path)], capture_output=True, text=True, check=True).stdout
        entries = {}
        for line in out.splitlines():
            mode, _owner, _size, _date, _time, name = line.split(None, 5)
            path = name.split(" -> ")[0].removeprefix(".").rstrip("/") or "/"
            entries[path] = Entry(mode, path)
        return entries

    def read(self, path: str) -> str:
        """The text of one installed file."""
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(self.path)], capture_output=True, check=True).stdout
        return subprocess.run(["tar", "-xO", f".{path}"], input=tar, capture_output=True, check=True).stdout.decode()

    def field(self, name: str) -> str:
        info = subprocess.run(["dpkg-deb", "-I", str(self.path)], capture_output=True, text=True, check=True).stdout
        match = re.search(rf"^ {name}: (.*)$", info, re.MULTILINE)
        assert match, f"{self.path.name} has no {name} field"
        return match.group(1)

    def control_file(self, tmp: Path, name: str) -> str:
        target = tmp / self.path.name
        if not target.exists():
            subprocess.run(["dpkg-deb", "-e", str(self.path), str(target)], check=True)
        script = target / name
        return script.read_text() if script.exists() else ""


@pytest.fixture(scope="module")
def debs() -> Iterator[dict[str, Deb]]:
    reason = cannot_build()
    if reason:
        pytest.skip(f"skipped because {reason}")
    proc = subprocess.run([str(BUILD_DEB)], capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, f"packaging/build-deb.sh failed:\n{proc.stderr[-6000:]}"
    paths = [Path(line) for line in proc.stdout.splitlines()]
    # Callers capture stdout with $(...): nothing but the paths may be there.
    assert all(p.is_absolute() and p.suffix == ".deb" and p.is_file() for p in paths), proc.stdout
    yield {p.name.split("_")[0]: Deb(p) for p in paths}


def test_both_packages_are_built(debs: dict[str, Deb]) -> None:
    assert sorted(debs) == ["luo-systemd", "luo-systemd-emulator"]


def test_lintian_reports_no_errors(debs: dict[str, Deb]) -> None:
    report = (debs["luo-systemd"].path.parent / "lintian.txt").read_text()
    errors = [line for line in report.splitlines() if line.startswith("E: ")]
    assert not errors, report
    assert "unused-override" not in report, f"a lintian override no longer matches anything:\n{report}"


def test_main_package_contents(debs: dict[str, Deb]) -> None:
    files = debs["luo-systemd"].contents()
    unitdir, generatordir = pkg_config("systemdsystemunitdir"), pkg_config("systemdsystemgeneratordir")
    expected = {
        f"{unitdir}/luod.service",
        f"{unitdir}/luod.socket",
        f"{unitdir}/liveupdate.target",
        f"{unitdir}/luo-qemu@.service",
        f"{generatordir}/luo-systemd-generator",
        "/usr/share/dbus-1/system.d/io.liveupdate.Agent1.conf",
        "/usr/share/dbus-1/system-services/io.liveupdate.Agent1.service",
        "/usr/lib/luod/luod.toml",
        f"{pkg_config('catalogdir')}/luo-systemd.catalog",
        *(f"/usr/bin/{command}" for command in COMMANDS),
        *(f"/usr/share/man/man{page.rsplit('.', 1)[1]}/{page}.gz" for page in rules_manpages()),
        *(
            f"/usr/lib/python3/dist-packages/luo_systemd/{module.name}"
            for module in (TOP / "src" / "luo_systemd").glob("*.py")
        ),
    }
    assert expected <= set(files), sorted(expected - set(files))
    for executable in (f"{generatordir}/luo-systemd-generator", *(f"/usr/bin/{c}" for c in COMMANDS)):
        assert files[executable].mode == "-rwxr-xr-x", files[executable]
    assert not [p for p in files if "emulator" in p.rsplit("/", 1)[-1] and p.endswith((".toml", ".service"))], (
        "the emulator's switch belongs to luo-systemd-emulator only"
    )


@pytest.mark.parametrize(
    ("path", "module"),
    [
        (f"{pkg_config('systemdsystemgeneratordir')}/luo-systemd-generator", "generator.py"),
        ("/usr/bin/luo-qemu", "vm.py"),  # in a live-updated VM's blackout
    ],
)
def test_the_commands_without_site_find_the_installed_package(debs: dict[str, Deb], path: str, module: str) -> None:
    """They run without site (python3 -IS): the build writes the package's directory into them."""
    script = debs["luo-systemd"].read(path)
    assert script.startswith("#!/usr/bin/python3 -IS\n"), script.splitlines()[0]
    assert 'PACKAGE_DIR = "/usr/lib/python3/dist-packages"\n' in script, script
    assert f"/usr/lib/python3/dist-packages/luo_systemd/{module}" in debs["luo-systemd"].contents()


def test_emulator_package_contents(debs: dict[str, Deb]) -> None:
    files = debs["luo-systemd-emulator"].contents()
    hook = f"{pkg_config('systemdshutdowndir')}/luo-emu"
    expected = {
        f"{pkg_config('systemdsystemunitdir')}/luo-emu.service",
        "/usr/lib/luod/luod.toml.d/50-emulator.toml",
        hook,
    }
    assert expected <= set(files), sorted(expected - set(files))
    assert files[hook].mode == "-rwxr-xr-x"


def test_dependencies(debs: dict[str, Deb]) -> None:
    depends = {d.strip() for d in debs["luo-systemd"].field("Depends").split(",")}
    needs = ("python3 (>= 3.9)", "python3-dbus-next (>= 0.2.3)", "python3-dbus-next (<< 0.2.4~)", "python3-systemd")
    for needed in (*needs, "systemd (>= 252)"):
        assert needed in depends, depends
    assert "default-dbus-system-bus | dbus-system-bus" in depends, depends
    version = debs["luo-systemd"].field("Version")
    assert debs["luo-systemd-emulator"].field("Depends") == f"luo-systemd (= {version})"
    assert debs["luo-systemd"].field("Architecture") == debs["luo-systemd-emulator"].field("Architecture") == "all"


def test_upgrades_never_stop_or_restart_luod(debs: dict[str, Deb], tmp_path: Path) -> None:
    deb = debs["luo-systemd"]
    scripts = {name: deb.control_file(tmp_path, name) for name in ("preinst", "postinst", "prerm", "postrm")}
    assert "luod" not in scripts["preinst"]
    assert not re.search(r"\b(restart|try-restart|stop)\b", scripts["postinst"]), scripts["postinst"]
    assert "deb-systemd-invoke start luod.socket luod.service" in scripts["postinst"]
    assert "daemon-reload" in scripts["postinst"] and "daemon-reload" in scripts["postrm"]
    # The only stop: on removal, through the socket (a direct stop of luod.service is refused).
    stops = re.findall(r"deb-systemd-invoke stop .*", scripts["prerm"])
    assert stops == ["deb-systemd-invoke stop luod.socket >/dev/null || true"], scripts["prerm"]
    assert 'if [ "$1" = remove ]' in scripts["prerm"]
    assert not any("liveupdate.target" in text for text in scripts.values()), "the package must never kexec"
    emulator = {name: debs["luo-systemd-emulator"].control_file(tmp_path, name) for name in ("preinst", "postinst")}
    assert not any(re.search(r"\b(start|restart|stop)\b", text) for text in emulator.values()), emulator
