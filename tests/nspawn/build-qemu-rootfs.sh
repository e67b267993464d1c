#!/bin/bash
# A cached layer on top of build-rootfs.sh: SUITE's root file system plus QEMU, for the VM tier
# (tests/test_vm.py, scripts/demo.sh vm).
#
#   tests/nspawn/build-qemu-rootfs.sh SUITE       SUITE: bookworm (QEMU 7.2) | trixie (10.0) | sid (11.x)
#
# Result: ${LUO_CACHE:-/var/cache/luo-systemd}/rootfs/SUITE-qemu, a copy of rootfs/SUITE (reflinked where
# the file system can) with qemu-system-x86 installed by apt in a chroot.  Rebuilt when the base tree's stamp
# or this script changes; the base tree itself is left as it is, so its users are not affected.
# Same locks as build-rootfs.sh: .NAME.build.lock for builders, .NAME.lock held shared by running containers.
set -euo pipefail

SUITE=${1:-}
case "$SUITE" in
    bookworm|trixie|sid) ;;
    *) echo "usage: $0 bookworm|trixie|sid" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "$0: must run as root (chroot)" >&2; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
PACKAGES="qemu-system-x86"

CACHE=${LUO_CACHE:-/var/cache/luo-systemd}
TOP=$CACHE/rootfs
BASE=$TOP/$SUITE
NAME=$SUITE-qemu
DEST=$TOP/$NAME
log() { echo "build-qemu-rootfs[$SUITE]: $*" >&2; }
# shellcheck source=tests/nspawn/cached-tree.sh
. "$HERE/cached-tree.sh"

"$HERE/build-rootfs.sh" "$SUITE"
stamp=$( { cat "$BASE/.luo-rootfs-stamp"; echo "packages=$PACKAGES"; cat "$0"; } | sha256sum | cut -d' ' -f1)
up_to_date() { [ -f "$DEST/.luo-rootfs-stamp" ] && [ "$(cat "$DEST/.luo-rootfs-stamp")" = "$stamp" ]; }
begin_build "$NAME"
t0=$(date +%s)
exec 9>"$TOP/.$SUITE.lock"
flock -s 9  # the base tree must not be swapped out while it is copied
cp -a --reflink=auto "$BASE/." "$TMP/"
exec 9>&-
log "installing $PACKAGES"
# debootstrap copied the host's resolv.conf as a plain file; never write through a symlink to the host's.
rm -f "$TMP/etc/resolv.conf"
cp /etc/resolv.conf "$TMP/etc/resolv.conf"
# A private mount namespace: /proc for apt and maintainer scripts, gone when the chroot ends.  The mirror may
# be a snapshot older than sid's Release "Valid-Until" (a week): debootstrap does not check it either.
if ! unshare --mount --propagation private sh -c '
        mount -t proc proc "$1/proc" &&
        chroot "$1" apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Check-Valid-Until=false update -q &&
        DEBIAN_FRONTEND=noninteractive chroot "$1" apt-get -o DPkg::Lock::Timeout=600 install -y -q \
            --no-install-recommends $2' sh "$TMP" "$PACKAGES" >"$TMP.log" 2>&1; then
    tail -n 30 "$TMP.log" >&2
    rm -f "$TMP.log"
    exit 1
fi
rm -f "$TMP.log"
chroot "$TMP" apt-get clean
rm -f "$TMP"/var/cache/apt/*.bin
qemu=$(chroot "$TMP" dpkg-query -W -f='${Version}' qemu-system-x86)
{ cat "$BASE/.luo-rootfs-info"; echo "qemu=$qemu"; } >"$TMP/.luo-rootfs-info"
echo "$stamp" >"$TMP/.luo-rootfs-stamp"

swap_into_place "$NAME"
log "built $DEST (QEMU $qemu) in $(( $(date +%s) - t0 )) s"
