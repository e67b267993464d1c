#!/bin/bash
# Builds demo/vm/guest.S into a disk image: build-guest.sh OUTPUT (needs binutils: as, ld).  The boot sector
# is padded to 1 MiB: SeaBIOS does not boot from a disk of a single sector.
set -euo pipefail
out=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as "$(dirname "$0")/guest.S" -o "$tmp/guest.o"
ld -Ttext=0x7c00 --oformat=binary "$tmp/guest.o" -o "$tmp/guest.img"
[ "$(stat -c %s "$tmp/guest.img")" = 512 ] || { echo "build-guest.sh: the boot sector is not 512 bytes" >&2; exit 1; }
truncate -s 1M "$tmp/guest.img"
mv "$tmp/guest.img" "$out"
