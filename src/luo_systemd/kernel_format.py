"""The LUO format identifiers a kernel image carries, and whether two kernels speak the same format.

LUO's serialized state is versioned by compatible strings in the kernel's rodata (``luo-v5``, ``memfd-v2``,
``kho-v4`` in 7.2) and is not compatible across versions: an incoming LUO header the new kernel does not
understand makes it panic, a file handler string it does not know makes /dev/liveupdate fail with EIO and
loses every session.  So the pre-flight reads the strings out of the image to be loaded and out of the
running kernel's image and refuses a difference.  A bzImage (x86) keeps the kernel compressed behind its
setup code; arm64 and riscv images are compressed whole or wrapped in an EFI zboot header.  The
compressions Debian, Fedora and upstream use are gzip, xz, zstd (and lz4, lzma, bzip2 as build options).

Pure functions over bytes; only :func:`read_image` touches the file system.
"""

from __future__ import annotations

import bz2
import dataclasses
import lzma
import os
import re
import struct
import zlib
from collections.abc import Iterable
from typing import Callable

from luo_systemd.errors import UnreadableImage

MAX_IMAGE = 256 << 20  # a distribution kernel image is 10-20 MiB: refuse anything far beyond
MAX_UNPACKED = 512 << 20  # a decompressed kernel is 30-100 MiB; bounds a decompression bomb

# A compatible string stands alone and NUL-terminated in rodata: "luo-v5", "memfd-v2", "kho-v4",
# and sub-formats such as "luo-session-v1".
_IDENTIFIER = re.compile(rb"(?<![A-Za-z0-9_.-])((?:luo|memfd|kho)(?:-[a-z]+)*-v[0-9]{1,4})\x00")

# x86 boot protocol (Documentation/arch/x86/boot.rst): setup_sects, "HdrS", payload_offset/_length (2.08+).
_SETUP_SECTS = 0x1F1
_HDRS = 0x202
_PAYLOAD = 0x248
# EFI zboot (drivers/firmware/efi/libstub/zboot-header.S): "MZ", "zimg", payload offset and size, method.
_ZIMG = 4

_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_LZ4_LEGACY_BLOCK = 8 << 20  # the kernel's lz4 (lz4 -l) writes legacy frames of 8 MiB blocks


@dataclasses.dataclass(frozen=True)
class ImageFormats:
    """The LUO format identifiers found in one kernel image, e.g. {"luo-v5", "memfd-v2", "kho-v4"}."""

    identifiers: frozenset[str]
    compression: str  # "none", "gzip", "xz", ...

    def describe(self) -> str:
        return ", ".join(sorted(self.identifiers)) or "no LUO format identifiers"


def family(identifier: str) -> str:
    """``memfd-v2`` -> ``memfd``."""
    return identifier.rsplit("-v", 1)[0]


def find_identifiers(data: bytes) -> frozenset[str]:
    return frozenset(m.decode() for m in _IDENTIFIER.findall(data))


def format_mismatches(running: ImageFormats, target: ImageFormats) -> list[str]:
    """Why ``target`` cannot take over the live update from ``running`` (empty: it can)."""
    if not target.identifiers:
        return ["the target kernel has no LUO (no luo-vN format identifier in its image)"]
    out = []
    for fam in sorted({family(i) for i in running.identifiers | target.identifiers}):
        have = sorted(i for i in running.identifiers if family(i) == fam)
        want = sorted(i for i in target.identifiers if family(i) == fam)
        if have != want:
            out.append(
                f"LUO format {fam}: running kernel {'/'.join(have) or 'none'}, target kernel {'/'.join(want) or 'none'}"
            )
    return out


def image_formats(image: bytes) -> ImageFormats:
    """The identifiers in a kernel image as stored: raw, bzImage, EFI zboot, or compressed whole."""
    compression, payload = kernel_payload(image)
    data = payload if compression == "none" else decompress(compression, payload)
    return ImageFormats(find_identifiers(data), compression)


def kernel_payload(image: bytes) -> tuple[str, bytes]:
    """The compression and the compressed kernel inside ``image`` (``("none", image)`` for a raw kernel)."""
    if image[_HDRS : _HDRS + 4] == b"HdrS" and len(image) >= _PAYLOAD + 8:
        setup_sects = image[_SETUP_SECTS] or 4  # 0 means 4, for very old boot loaders
        offset, length = struct.unpack_from("<II", image, _PAYLOAD)
        start = (setup_sects + 1) * 512 + offset
        payload = image[start : start + length]
        if length == 0 or len(payload) != length:
            raise UnreadableImage("bzImage payload outside the file (boot protocol older than 2.08?)")
        return compression_of(payload), payload
    if image[:2] == b"MZ" and image[_ZIMG : _ZIMG + 4] == b"zimg" and len(image) >= 32:
        offset, size = struct.unpack_from("<II", image, 8)
        method = image[24:32].rstrip(b"\0").decode(errors="replace")
        payload = image[offset : offset + size]
        if len(payload) != size:
            raise UnreadableImage("EFI zboot payload outside the file")
        return _ZBOOT_METHODS.get(method, method), payload
    compression = compression_of(image)
    return compression, image


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (_LZ4_LEGACY_MAGIC, "lz4"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
)
_ZBOOT_METHODS = {"gzip": "gzip", "xzkern": "xz", "zstd22": "zstd", "lz4": "lz4", "bzip2": "bzip2", "lzma": "lzma"}


def compression_of(data: bytes) -> str:
    return next((name for magic, name in _MAGIC if data.startswith(magic)), "none")


def decompress(compression: str, data: bytes, limit: int = MAX_UNPACKED) -> bytes:
    """At most ``limit`` bytes of ``data`` decompressed.  A kernel payload may be followed by padding or
    a size trailer (bzImage), so what follows the first stream is ignored, not an error."""
    method = _DECOMPRESSORS.get(compression)
    if method is None:
        raise UnreadableImage(f"kernel images compressed with {compression} cannot be read")
    try:
        out = method(data, limit)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError, RuntimeError) as e:
        raise UnreadableImage(f"the {compression} kernel payload does not decompress: {e}") from None
    if len(out) >= limit:
        raise UnreadableImage(f"the kernel payload decompresses to more than {limit >> 20} MiB")
    return out


def _gzip(data: bytes, limit: int) -> bytes:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data, limit)


def _xz(data: bytes, limit: int) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data, limit)


def _lzma(data: bytes, limit: int) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data, limit)


def _bzip2(data: bytes, limit: int) -> bytes:
    return bz2.BZ2Decompressor().decompress(data, limit)


def _zstd(data: bytes, limit: int) -> bytes:
    try:
        import zstandard  # noqa: PLC0415 - optional (python3-zstandard); only zstd images need it
    except ImportError:
        raise UnreadableImage("the kernel is zstd-compressed and python3-zstandard is not installed") from None
    chunks, total = [], 0
    with zstandard.ZstdDecompressor().stream_reader(data) as reader:
        while total < limit:
            chunk = reader.read(min(limit - total, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    return b"".join(chunks)


def _lz4(data: bytes, limit: int) -> bytes:
    try:
        import lz4.block  # noqa: PLC0415 - optional (python3-lz4); only lz4 images need it
        import lz4.frame  # noqa: PLC0415
    except ImportError:
        raise UnreadableImage("the kernel is lz4-compressed and python3-lz4 is not installed") from None
    if not data.startswith(_LZ4_LEGACY_MAGIC):
        return bytes(lz4.frame.LZ4FrameDecompressor().decompress(data, max_length=limit))
    return b"".join(_lz4_legacy_blocks(data, limit, lz4.block.decompress))


def _lz4_legacy_blocks(data: bytes, limit: int, block: Callable[..., bytes]) -> Iterable[bytes]:
    """lz4's legacy frame: the magic, then (little-endian u32 size, block) pairs; the kernel's build appends
    the uncompressed size, and a new magic may start a further frame."""
    pos, total = len(_LZ4_LEGACY_MAGIC), 0
    while pos + 4 <= len(data) and total < limit:
        if data[pos : pos + 4] == _LZ4_LEGACY_MAGIC:
            pos += 4
            continue
        (size,) = struct.unpack_from("<I", data, pos)
        chunk = data[pos + 4 : pos + 4 + size]
        if size == 0 or len(chunk) != size:
            break  # the size trailer or padding
        out = block(chunk, uncompressed_size=_LZ4_LEGACY_BLOCK)
        total += len(out)
        yield out
        pos += 4 + size


_DECOMPRESSORS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _gzip,
    "xz": _xz,
    "lzma": _lzma,
    "bzip2": _bzip2,
    "zstd": _zstd,
    "lz4": _lz4,
}


def read_image(path: str) -> ImageFormats:
    """The LUO format identifiers of the kernel image at ``path`` (remembered while the file is unchanged:
    decompressing a kernel takes a second, and prepare checks, loads and records the same image)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in _read:
                _read.clear()
                _read[key] = _formats_of_file(path, f.read(MAX_IMAGE + 1))
            return _read[key]
    except OSError as e:
        raise UnreadableImage(f"cannot read {path}: {e.strerror or e}") from None


_read: dict[tuple[str, int, int, int, int], ImageFormats] = {}


def _formats_of_file(path: str, image: bytes) -> ImageFormats:
    if len(image) > MAX_IMAGE:
        raise UnreadableImage(f"{path} is larger than {MAX_IMAGE >> 20} MiB: not a kernel image")
    try:
        return image_formats(image)
    except UnreadableImage as e:
        raise UnreadableImage(f"{path}: {e}") from None
