"""Reading LUO format identifiers out of kernel images, built here in every layout and compression
distributions use, and the pre-flight's verdict on them."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from luo_systemd import kernel_format
from luo_systemd.broker import Problem
from luo_systemd.errors import UnreadableImage
from luo_systemd.inhibitor import block_reason
from luo_systemd.kernel_format import ImageFormats, format_mismatches, image_formats, read_image
from luo_systemd.kexec import KernelImage, LoadedState, NextKernel, read_next_kernel
from luo_systemd.kexec_preflight import loaded_kernel_problems
from luo_systemd.runfiles import write_json
from tests.images import CURRENT, bzimage, compress, fake_vmlinux, write_kernel, zboot

METHODS = ["gzip", "xz", "lzma", "bzip2", "zstd", "lz4"]


@pytest.mark.parametrize("method", METHODS)
def test_bzimage_payload_in_each_compression(method: str) -> None:
    image = bzimage(compress(method, fake_vmlinux(["luo-v5", "memfd-v2", "kho-v4", "luo-session-v1"])))
    formats = image_formats(image)
    assert formats == ImageFormats(frozenset({"luo-v5", "memfd-v2", "kho-v4", "luo-session-v1"}), method)


@pytest.mark.parametrize(
    ("tool", "method"),
    [
        (["gzip", "-9c"], "gzip"),
        (["xz", "--check=crc32", "-c"], "xz"),
        (["zstd", "-19", "-c"], "zstd"),
        (["lz4", "-l", "-9", "-c"], "lz4"),
        (["bzip2", "-9c"], "bzip2"),
        (["lzma", "-9c"], "lzma"),
    ],
)
def test_payloads_compressed_by_the_tools_the_kernel_build_runs(tool: list[str], method: str, tmp_path: Path) -> None:
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} not installed")
    payload = subprocess.run(tool, input=fake_vmlinux(CURRENT), capture_output=True, check=True).stdout
    assert image_formats(bzimage(payload)).identifiers == frozenset(CURRENT)


def test_raw_vmlinux_whole_file_gzip_and_efi_zboot() -> None:
    kernel = fake_vmlinux(CURRENT)
    assert image_formats(kernel) == ImageFormats(frozenset(CURRENT), "none")
    assert image_formats(compress("gzip", kernel)).compression == "gzip"  # arm64 Image.gz
    assert image_formats(zboot("zstd22", compress("zstd", kernel))) == ImageFormats(frozenset(CURRENT), "zstd")


def test_damaged_and_unsupported_images_are_named() -> None:
    good = compress("xz", fake_vmlinux(CURRENT))
    with pytest.raises(UnreadableImage, match="xz kernel payload does not decompress"):
        image_formats(bzimage(good[:12] + bytes(64) + good[76:]))
    with pytest.raises(UnreadableImage, match="compressed with lzo cannot be read"):
        image_formats(bzimage(b"\x89LZO\0" + bytes(100)))
    broken = bytearray(bzimage(good))
    broken[0x24C:0x250] = (10 << 20).to_bytes(4, "little")  # payload longer than the file
    with pytest.raises(UnreadableImage, match="payload outside the file"):
        image_formats(bytes(broken))


def test_a_decompression_bomb_stops_at_the_limit() -> None:
    bomb = compress("gzip", bytes(8 << 20))
    with pytest.raises(UnreadableImage, match="more than 1 MiB"):
        kernel_format.decompress("gzip", bomb, limit=1 << 20)


def test_read_image_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImage, match=r"cannot read .*missing"):
        read_image(str(tmp_path / "missing"))
    (tmp_path / "garbage").write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(UnreadableImage, match="garbage: the gzip kernel payload"):
        read_image(str(tmp_path / "garbage"))


def test_mismatches_name_each_family() -> None:
    running = ImageFormats(frozenset(CURRENT), "gzip")
    assert format_mismatches(running, running) == []
    target = ImageFormats(frozenset({"luo-v6", "memfd-v2", "kho-v4"}), "zstd")
    assert format_mismatches(running, target) == ["LUO format luo: running kernel luo-v5, target kernel luo-v6"]
    assert format_mismatches(running, ImageFormats(frozenset(), "none")) == [
        "the target kernel has no LUO (no luo-vN format identifier in its image)"
    ]
    newer = ImageFormats(frozenset({*CURRENT, "luo-flb-v1"}), "gzip")
    assert format_mismatches(running, newer) == ["LUO format luo-flb: running kernel none, target kernel luo-flb-v1"]


def test_loaded_kernel_problems() -> None:
    current = ImageFormats(frozenset(CURRENT), "gzip")
    ok = LoadedState(True, "quiet kho=on liveupdate=on", current)
    assert loaded_kernel_problems(ok, lambda: current) == []
    assert loaded_kernel_problems(LoadedState(False, None), lambda: current) == [
        "no kernel is loaded for the kexec (liveupdatectl prepare loads one)"
    ]
    unknown = LoadedState(True, None, None, "it was not loaded by liveupdatectl, which records the image")
    assert loaded_kernel_problems(unknown, lambda: current) == [
        "the loaded kernel's LUO format is unknown: it was not loaded by liveupdatectl, which records the image"
    ]
    older = LoadedState(True, "kho=on", ImageFormats(frozenset({"luo-v4", "memfd-v2", "kho-v4"}), "xz"))
    assert loaded_kernel_problems(older, lambda: current) == [
        "the next kernel's command line lacks liveupdate=on",
        "LUO format luo: running kernel luo-v5, target kernel luo-v4: "
        "the new kernel would not understand what this one hands over",
    ]

    def unreadable() -> ImageFormats:
        raise UnreadableImage("no image of the running kernel 7.2.13 in /boot")

    assert loaded_kernel_problems(ok, unreadable) == [
        "the running kernel's LUO format is unknown: no image of the running kernel 7.2.13 in /boot "
        "(see agent.running_kernel_image)"
    ]


def test_the_loaded_kernel_record(tmp_path: Path) -> None:
    """liveupdatectl records what it loaded (the kernel cannot say); luod reads the formats back."""
    kernel = write_kernel(tmp_path / "vmlinuz", ["luo-v4", "memfd-v2", "kho-v4"], "zstd")
    record = NextKernel.of(KernelImage(str(kernel), None, "kho=on liveupdate=on"))
    assert record.identifiers == ("kho-v4", "luo-v4", "memfd-v2") and record.compression == "zstd"
    path = str(tmp_path / "run" / "next-kernel.json")
    write_json(path, dataclasses.asdict(record))
    assert read_next_kernel(path) == record
    (tmp_path / "run" / "next-kernel.json").write_text("{not json")
    assert read_next_kernel(path) is None, "a damaged record counts as no record"
    broken = NextKernel.of(KernelImage(str(tmp_path / "missing"), None, ""))
    assert broken.formats() is None and "cannot read" in broken.unreadable


def test_block_reason() -> None:
    problems = [Problem("", "LUO format luo: running kernel luo-v5, target kernel luo-v6")]
    assert block_reason(armed=False, loaded=True, problems=problems) == (
        "the loaded kernel fails the live-update pre-flight: LUO format luo: running kernel luo-v5, "
        "target kernel luo-v6 (liveupdatectl preflight)"
    )
    assert block_reason(armed=False, loaded=False, problems=problems) is None
    assert block_reason(armed=True, loaded=True, problems=problems) is None
    assert block_reason(armed=False, loaded=True, problems=[]) is None
