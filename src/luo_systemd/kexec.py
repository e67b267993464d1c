"""Loading the next kernel the one way that keeps LUO state: kexec_file_load with kho=on liveupdate=on.

The legacy kexec_load silently loses every session, and a kernel booted without ``liveupdate=on`` has no
/dev/liveupdate; both are refused here rather than discovered after the kexec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import platform
from collections.abc import Iterator
from typing import Optional, Protocol

from luo_systemd import syscalls
from luo_systemd.config import Config
from luo_systemd.errors import KernelError, NotFound
from luo_systemd.liveupdate import EmuControl, EmulatorTransport

LIVE_UPDATE_ARGS = ("kho=on", "liveupdate=on")
# Set by boot loaders for the running kernel only; kexec-tools' --reuse-cmdline drops them too.
BOOT_LOADER_ARGS = ("BOOT_IMAGE=", "initrd=")


@dataclasses.dataclass(frozen=True)
class LoadedState:
    loaded: bool
    cmdline: Optional[str]  # None where it cannot be read back (the kernel does not tell)


@dataclasses.dataclass(frozen=True)
class KernelImage:
    kernel: str
    initrd: Optional[str]
    cmdline: str


def live_update_cmdline(base: str, append: str = "") -> str:
    """``base`` without boot-loader-only arguments and any kho=/liveupdate= values, plus ours."""
    words = [
        w for w in base.split() if not w.startswith(BOOT_LOADER_ARGS) and not w.startswith(("kho=", "liveupdate="))
    ]
    return " ".join([*words, *append.split(), *LIVE_UPDATE_ARGS])


def cmdline_problems(cmdline: str) -> list[str]:
    words = cmdline.split()
    return [f"the next kernel's command line lacks {arg}" for arg in LIVE_UPDATE_ARGS if arg not in words]


def default_image(append: str = "") -> KernelImage:
    """The running kernel again, as installed in /boot by Debian or Fedora, with the running command line."""
    release = platform.release()
    kernel = next((p for p in (f"/boot/vmlinuz-{release}", f"/boot/vmlinuz-{release}.efi") if os.path.exists(p)), None)
    if kernel is None:
        raise NotFound(f"no kernel image for {release} in /boot: pass --kernel")
    initrd = next(
        (p for p in (f"/boot/initrd.img-{release}", f"/boot/initramfs-{release}.img") if os.path.exists(p)), None
    )
    with open("/proc/cmdline") as f:
        return KernelImage(kernel, initrd, live_update_cmdline(f.read(), append))


@contextlib.contextmanager
def opened(image: KernelImage) -> Iterator[tuple[int, Optional[int]]]:
    """The image's kernel and initrd as fds, the way kexec_file_load takes them."""
    kernel = os.open(image.kernel, os.O_RDONLY | os.O_CLOEXEC)
    initrd = None
    try:
        if image.initrd:
            initrd = os.open(image.initrd, os.O_RDONLY | os.O_CLOEXEC)
        yield kernel, initrd
    finally:
        os.close(kernel)
        if initrd is not None:
            os.close(initrd)


class Loader(Protocol):
    def state(self) -> LoadedState: ...

    def load(self, image: KernelImage) -> None: ...


class KernelLoader:
    def state(self) -> LoadedState:
        try:
            with open("/sys/kernel/kexec_loaded") as f:
                return LoadedState(f.read().strip() == "1", None)
        except FileNotFoundError:
            return LoadedState(False, None)

    def load(self, image: KernelImage) -> None:
        try:
            with opened(image) as (kernel, initrd):
                syscalls.kexec_file_load(kernel, initrd, image.cmdline)
        except OSError as e:
            reasons = {
                errno.EADDRNOTAVAIL: "kernel and initrd do not fit the KHO scratch area (see kho_scratch=)",
                errno.EPERM: "not permitted (root with CAP_SYS_BOOT only)",
                errno.ENOSYS: "this kernel has no kexec_file_load (CONFIG_KEXEC_FILE)",
                errno.ENOEXEC: "not a kernel image this kernel can load (or its signature is refused)",
            }
            raise KernelError(
                f"Failed to load {image.kernel}", e.errno or errno.EIO, reasons.get(e.errno or 0, e.strerror or "")
            ) from None


class EmulatedLoader:
    """The emulator's stand-in for kexec_file_load (luo-emu load): it records the command line."""

    def __init__(self, socket_path: str) -> None:
        self.transport = EmulatorTransport(socket_path)

    def state(self) -> LoadedState:
        status = json.loads(self.transport.control(EmuControl.STATUS))
        return LoadedState(bool(status["kernel_loaded"]), status["kernel_cmdline"])

    def load(self, image: KernelImage, legacy: bool = False) -> None:
        """``legacy``: as if loaded with the old kexec_load, which loses all LUO state (for tests)."""
        with opened(image) as (kernel, initrd):
            payload = json.dumps({"cmdline": image.cmdline, "legacy": legacy}).encode()
            self.transport.control(EmuControl.LOAD_KERNEL, payload, [kernel] if initrd is None else [kernel, initrd])


def loader_for(cfg: Config) -> Loader:
    return EmulatedLoader(cfg.emulator_socket) if cfg.backend == "emulator" else KernelLoader()
