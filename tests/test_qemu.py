"""The real-kernel tier: a LUO kernel (built from Debian's linux-source, cached) booted in qemu under TCG.

The kernel's own LUO selftests check the harness; then the project's contract suite runs inside the guest
across real kexecs (tests/contract/kexec_driver.py).  See tests/qemu/README.md.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

QEMU = Path(__file__).resolve().parent / "qemu"


def qemu_installable() -> bool:
    if shutil.which("qemu-system-x86_64"):
        return True
    try:  # build-kernel.sh installs it with apt when the archive has it
        out = subprocess.run(
            ["apt-cache", "policy", "qemu-system-x86"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(re.search(r"Candidate: (?!\(none\))", out.stdout))


def why_not() -> str:
    """Why the qemu tier cannot run here ("" if it can)."""
    if platform.machine() != "x86_64":
        return f"the qemu tier is x86_64 only (this is {platform.machine()})"
    if os.geteuid() != 0:
        return "building the kernel and the images and running qemu needs root"
    if os.environ.get("LUO_SKIP_QEMU"):
        return "LUO_SKIP_QEMU is set"
    if not qemu_installable():
        return "qemu-system-x86_64 is neither installed nor installable with apt"
    return ""


pytestmark = [
    pytest.mark.slow,
    pytest.mark.kernel,
    pytest.mark.skipif(bool(why_not()), reason=f"skipped because {why_not()}"),
]


def run(script: str, *args: str) -> str:
    proc = subprocess.run([str(QEMU / script), *args], capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def result_line(argv: list[str], env: Optional[dict[str, str]] = None) -> str:
    """The one line a build script prints on stdout: callers capture it with $(...), so progress goes to stderr."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert re.fullmatch(r"[^\n]+\n", proc.stdout), f"stdout is more than the result:\n{proc.stdout}"
    return proc.stdout.rstrip("\n")


def test_sid_lists_fetched_on_first_use_stay_off_stdout(tmp_path: Path) -> None:
    """As on a new machine: no sid lists yet, so `newest` fetches them first; only the name reaches stdout."""
    env = {**os.environ, "LUO_CACHE": str(tmp_path)}
    name = result_line([str(QEMU / "sid-apt.sh"), "newest", r"linux-source-7\.[0-9]+"], env)
    assert re.fullmatch(r"linux-source-7\.\d+", name), name
    assert list((tmp_path / "apt-sid" / "lists").glob("*_sid_*Packages*")), "this run fetched the lists"


def test_build_kernel_prints_only_the_bzimage() -> None:
    bz = Path(result_line([str(QEMU / "build-kernel.sh")]))
    assert bz.name == "bzImage" and bz.is_file(), bz


def test_kernel_selftests() -> None:
    out = run("run-selftests.sh", "luo_kexec_simple", "luo_multi_session")
    assert re.search(r"^2 passed, 0 failed$", out, re.M), out


def test_contract_suite_on_the_kernel() -> None:
    out = run("run-contract.sh")
    print(out)
    rules = re.search(r"=+ (\d+) passed", out)
    assert rules and int(rules.group(1)) >= 25, out
    assert re.search(r"contract-kexec: \d+ passed, 0 failed", out), out
