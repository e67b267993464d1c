"""Synthetic kernel images for the LUO format checks: the layouts of real ones (x86 bzImage with a compressed
payload, arm64 Image.gz, EFI zboot, a raw vmlinux) around a fake kernel whose rodata holds the identifiers."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import lz4.block
import zstandard

CURRENT = ("kho-v4", "luo-v5", "memfd-v2")  # the emulator's formats (luo_systemd.emulator.EMULATED_FORMATS)


def fake_vmlinux(identifiers: Iterable[str], size: int = 256 << 10) -> bytes:
    """An ELF-looking kernel: filler, each identifier NUL-terminated in "rodata", and near misses."""
    rodata = b"".join(b"\0" + i.encode() + b"\0" for i in identifiers)
    near_misses = b"\0xluo-v9\0luo-v8 without its NUL, memfd-v7x\0"
    filler = os.urandom(size // 2) + bytes(size // 2)  # half random: compressors cannot make it vanish
    return b"\x7fELF\x02\x01\x01" + filler[: size // 3] + rodata + near_misses + filler[size // 3 :]


def lz4_legacy(data: bytes, block: int = 8 << 20) -> bytes:
    """lz4 -l: the legacy frame the kernel's build uses."""
    out = [b"\x02\x21\x4c\x18"]
    for i in range(0, len(data), block):
        chunk = lz4.block.compress(data[i : i + block], store_size=False)
        out.append(struct.pack("<I", len(chunk)) + chunk)
    return b"".join(out)


def compress(method: str, data: bytes) -> bytes:
    if method == "gzip":
        return gzip.compress(data, 9)
    if method == "xz":
        return lzma.compress(data, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    if method == "lzma":
        return lzma.compress(data, lzma.FORMAT_ALONE)
    if method == "bzip2":
        return bz2.compress(data)
    if method == "zstd":
        return zstandard.ZstdCompressor(level=19).compress(data)
    if method == "lz4":
        return lz4_legacy(data)
    raise ValueError(method)


def bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    """An x86 bzImage (boot protocol 2.15): setup sectors, then the decompressor stub and the payload,
    which the build follows with the uncompressed size (as the kernel's size_append does)."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    stub = b"\x90" * 4096  # the decompressor's own code
    struct.pack_into("<II", setup, 0x248, len(stub), len(payload))
    return bytes(setup) + stub + payload + struct.pack("<I", 0x12345678) + bytes(512)


def zboot(method: str, payload: bytes) -> bytes:
    """An EFI zboot image (arm64/riscv Fedora): "MZ", "zimg", payload offset and size, method name."""
    header = bytearray(64)
    header[0:2] = b"MZ"
    header[4:8] = b"zimg"
    struct.pack_into("<II", header, 8, len(header), len(payload))
    header[24 : 24 + len(method)] = method.encode()
    return bytes(header) + payload


def kernel_image(identifiers: Iterable[str] = CURRENT, method: str = "gzip") -> bytes:
    return bzimage(compress(method, fake_vmlinux(identifiers)))


def write_kernel(path: Path, identifiers: Iterable[str] = CURRENT, method: str = "gzip") -> Path:
    path.write_bytes(kernel_image(identifiers, method))
    return path
