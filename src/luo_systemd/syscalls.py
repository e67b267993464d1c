"""Raw Linux system calls that Python's os module lacks.  stdlib only, no policy, no logging."""

from __future__ import annotations

import errno
import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
    from types import ModuleType

TMPFS_MAGIC = 0x01021994

# syscall numbers of the calls glibc 2.36 does not wrap (x86_64, arm64 and the generic table)
_SYSCALLS = {
    "x86_64": {"kexec_file_load": 320},
    "aarch64": {"kexec_file_load": 294},
}

KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_NO_INITRAMFS = 0x4


_loaded: list[ModuleType | ctypes.CDLL] = []


def _ctypes_libc() -> tuple[ModuleType, ctypes.CDLL]:
    """ctypes and libc, loaded by the first call that needs them: luod's start-up up to READY=1 makes
    none, and ctypes was an eighth of its cost (luo_systemd.uapi.ArgLayout)."""
    if not _loaded:
        import ctypes  # noqa: PLC0415

        _loaded.extend((ctypes, ctypes.CDLL(None, use_errno=True)))
    return _loaded[0], _loaded[1]  # type: ignore[return-value]


def _syscall(name: str, *args: int | bytes | None) -> int:
    number = _SYSCALLS.get(os.uname().machine, {}).get(name)
    if number is None:
        raise OSError(errno.ENOSYS, f"{name} is not known on {os.uname().machine}")
    ctypes, libc = _ctypes_libc()
    libc.syscall.restype = ctypes.c_long
    ret = int(libc.syscall(ctypes.c_long(number), *args))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def fs_magic(fd: int) -> int:
    """The f_type of fstatfs(2): which file system the file lives on."""
    ctypes, libc = _ctypes_libc()
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit targets
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def is_memfd_like(fd: int) -> bool:
    """What the kernel's memfd handler accepts: an unlinked regular shmem file (not hugetlb).

    That is every memfd_create() file without MFD_HUGETLB, and also an O_TMPFILE or deleted file on tmpfs.
    """
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and fs_magic(fd) == TMPFS_MAGIC


def fd_target(fd: int, pid: int | str = "self") -> str:
    """What /proc/PID/fd/N points to, e.g. "/memfd:cache (deleted)" or "anon_inode:[luo_session] x"."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return "?"


def kexec_file_load(kernel_fd: int, initrd_fd: int | None, cmdline: str, flags: int = 0) -> None:
    """Loads a kernel the one way that keeps LUO state (the legacy kexec_load loses it)."""
    raw = cmdline.encode() + b"\0"
    if initrd_fd is None:
        flags |= KEXEC_FILE_NO_INITRAMFS
    _syscall("kexec_file_load", kernel_fd, -1 if initrd_fd is None else initrd_fd, len(raw), raw, flags)
