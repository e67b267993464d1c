"""Loading the next kernel the one way that keeps LUO state: kexec_file_load with kho=on liveupdate=on.

The legacy kexec_load silently loses every session, and a kernel booted without ``liveupdate=on`` has no
/dev/liveupdate; both are refused here rather than discovered after the kexec.  The kernel cannot say which
image it has loaded, so the loader records the image and its LUO format identifiers next to luod
(``next_kernel_file``); a kernel loaded by another tool has no record and an unknown format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
from collections.abc import Iterator
from typing import Optional, Protocol

from luo_systemd import syscalls
from luo_systemd.config import Config
from luo_systemd.errors import KernelError, NotFound, UnreadableImage
from luo_systemd.kernel_format import ImageFormats, read_image
from luo_systemd.liveupdate import EmuControl, EmulatorTransport
from luo_systemd.runfiles import read_json, write_json

LIVE_UPDATE_ARGS = ("kho=on", "liveupdate=on")
# Set by boot loaders for the running kernel only; kexec-tools' --reuse-cmdline drops them too.
BOOT_LOADER_ARGS = ("BOOT_IMAGE=", "initrd=")


@dataclasses.dataclass(frozen=True)
class LoadedState:
    loaded: bool
    cmdline: Optional[str]  # None where it cannot be read back (the kernel does not tell)
    formats: Optional[ImageFormats] = None  # the loaded image's LUO formats; None: unknown
    unknown_why: str = ""  # why ``formats`` is None


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


def installed_kernel(release: str) -> Optional[str]:
    """The image of kernel ``release`` as Debian or Fedora install it in /boot."""
    return next((p for p in (f"/boot/vmlinuz-{release}", f"/boot/vmlinuz-{release}.efi") if os.path.exists(p)), None)


def default_image(append: str = "") -> KernelImage:
    """The running kernel again, as installed in /boot by Debian or Fedora, with the running command line."""
    release = os.uname().release
    kernel = installed_kernel(release)
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

    def unload(self) -> None: ...

    def running_formats(self) -> ImageFormats:
        """The LUO formats of the running kernel (raises UnreadableImage)."""
        ...


@dataclasses.dataclass(frozen=True)
class NextKernel:
    """What the loader recorded about the kernel it loaded."""

    kernel: str
    initrd: Optional[str]
    cmdline: str
    identifiers: tuple[str, ...]
    compression: str
    unreadable: str = ""  # why the identifiers could not be read ("" if they were)

    @staticmethod
    def of(image: KernelImage) -> NextKernel:
        try:
            formats = read_image(image.kernel)
        except UnreadableImage as e:
            return NextKernel(image.kernel, image.initrd, image.cmdline, (), "", str(e))
        return NextKernel(
            image.kernel, image.initrd, image.cmdline, tuple(sorted(formats.identifiers)), formats.compression
        )

    def formats(self) -> Optional[ImageFormats]:
        return None if self.unreadable else ImageFormats(frozenset(self.identifiers), self.compression)


def read_next_kernel(path: str) -> Optional[NextKernel]:
    try:
        doc = read_json(path)
        if doc is None:
            return None
        return NextKernel(
            str(doc["kernel"]),
            doc["initrd"] if isinstance(doc["initrd"], str) else None,
            str(doc["cmdline"]),
            tuple(str(i) for i in doc["identifiers"]),
            str(doc["compression"]),
            str(doc["unreadable"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged record says nothing: the format counts as unknown


class KernelLoader:
    def __init__(self, next_kernel_file: str, running_image: str = "") -> None:
        self.next_kernel_file = next_kernel_file
        self.running_image = running_image  # "" for the installed image of the running release
        self._running: Optional[ImageFormats] = None  # read once: the running kernel does not change

    def state(self) -> LoadedState:
        try:
            with open("/sys/kernel/kexec_loaded") as f:
                loaded = f.read().strip() == "1"
        except FileNotFoundError:
            loaded = False
        record = read_next_kernel(self.next_kernel_file) if loaded else None
        if record is None:
            return LoadedState(loaded, None, None, "it was not loaded by liveupdatectl, which records the image")
        return LoadedState(loaded, record.cmdline, record.formats(), record.unreadable)

    def running_formats(self) -> ImageFormats:
        if self._running is None:
            path = self.running_image or installed_kernel(os.uname().release)
            if path is None:
                raise UnreadableImage(f"no image of the running kernel {os.uname().release} in /boot")
            self._running = read_image(path)
        return self._running

    def load(self, image: KernelImage) -> None:
        record = NextKernel.of(image)
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
        write_json(self.next_kernel_file, dataclasses.asdict(record))

    def unload(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.next_kernel_file)
        try:
            syscalls.kexec_file_load(-1, None, "", syscalls.KEXEC_FILE_UNLOAD)
        except OSError as e:
            raise KernelError("Failed to unload the loaded kernel", e.errno or errno.EIO, e.strerror or "") from None


class EmulatedLoader:
    """The emulator's stand-in for kexec_file_load (luo-emu load): it records the command line."""

    def __init__(self, socket_path: str) -> None:
        self.transport = EmulatorTransport(socket_path)

    def state(self) -> LoadedState:
        status = json.loads(self.transport.control(EmuControl.STATUS))
        kernel = status["kernel"]
        if kernel is None:
            return LoadedState(False, None)
        formats = (
            ImageFormats(frozenset(kernel["formats"]), kernel["compression"]) if not kernel["unreadable"] else None
        )
        return LoadedState(True, kernel["cmdline"], formats, kernel["unreadable"])

    def running_formats(self) -> ImageFormats:
        status = json.loads(self.transport.control(EmuControl.STATUS))
        return ImageFormats(frozenset(status["formats"]), "none")

    def unload(self) -> None:
        self.transport.control(EmuControl.UNLOAD_KERNEL)

    def load(self, image: KernelImage, legacy: bool = False) -> None:
        """``legacy``: as if loaded with the old kexec_load, which loses all LUO state (for tests)."""
        with opened(image) as (kernel, initrd):
            payload = json.dumps({"cmdline": image.cmdline, "legacy": legacy}).encode()
            self.transport.control(EmuControl.LOAD_KERNEL, payload, [kernel] if initrd is None else [kernel, initrd])


def loader_for(cfg: Config) -> Loader:
    if cfg.backend == "emulator":
        return EmulatedLoader(cfg.emulator_socket)
    return KernelLoader(cfg.next_kernel_file, cfg.running_kernel_image)
