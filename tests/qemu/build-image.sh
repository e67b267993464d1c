#!/usr/bin/env bash
# build-image.sh SUITE BZIMAGE DEB [MISMATCH_BZIMAGE] — build (once, cached) the ext4 disk image of the systemd tier.
#
# From the cached debootstrap tree (tests/nspawn/build-rootfs.sh SUITE): a copy of the tree, the project's
# luo-systemd .deb installed with dpkg in a chroot (never the emulator package: this guest has a real
# /dev/liveupdate), the demo service (demo/luo-demo-cache) and the test driver (guest/luotest) enabled,
# /boot/bzImage = the test kernel (for the in-guest kexec), then mkfs.ext4 -d (no loop mount).
# SUITE sid (systemd >= 261) also gets guest/luo-native-cache.service, checked by the driver.  A tree with
# QEMU (SUITE sid-qemu: tests/nspawn/build-qemu-rootfs.sh) also gets luo-qemu@demo.service with the demo
# guest (demo/vm), which the driver checks across the kexecs too.
# MISMATCH_BZIMAGE (a kernel of another LUO format) goes to /boot/bzImage-luo-v6 for the driver's refusal test.
# luod is told that the running kernel's image is /boot/bzImage (qemu boots it with -kernel, not from /boot).
#
# Cache: $LUO_CACHE/qemu-systemd/images/SUITE-<key>.img, key = sha256 of the tree's stamp, the kernel, the
# .deb, the guest files, the demo and this script.  Older images of the same suite are deleted.
# stdout is only the image path (raw ext4, used read-only: runs write to a qcow2 overlay); progress goes to stderr.
# Env: LUO_CACHE, LUO_IMAGE_SIZE (default 2G, sparse), LUO_DEMO_CACHE_MB (the demo's cache size, default 64).
#
# Safety: the chroot runs in a private mount + PID namespace with CAP_SYS_BOOT removed from the bounding and
# inheritable sets, so no maintainer script can kexec or reboot the host; units are only enabled, never started.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${LUO_CACHE:-/var/cache/luo-systemd}
SIZE=${LUO_IMAGE_SIZE:-2G}
DEMO_MB=${LUO_DEMO_CACHE_MB:-64}
SUITE=${1:?usage: build-image.sh SUITE BZIMAGE DEB}
BZ=${2:?bzImage}
DEB=${3:?luo-systemd .deb}
MISMATCH=${4:-}
ROOTFS=$CACHE/rootfs/$SUITE
GUEST=$HERE/guest

log() { echo "build-image[$SUITE]: $*" >&2; }
die() { echo "build-image[$SUITE]: ERROR: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "must run as root"
[[ -f $ROOTFS/.luo-rootfs-stamp ]] || die "no cached tree at $ROOTFS (tests/nspawn/build-rootfs.sh $SUITE)"
[[ -f $BZ && -f $DEB ]] || die "missing $BZ or $DEB"
case $(basename "$DEB") in luo-systemd-emulator_*) die "refusing the emulator package on a real LUO kernel" ;; esac

NATIVE=0
sdmajor=$(sed -n 's/^systemd=\([0-9]*\).*/\1/p' "$ROOTFS/.luo-rootfs-info")
((sdmajor >= 261)) && NATIVE=1
VM=0
[[ -x $ROOTFS/usr/bin/qemu-system-x86_64 ]] && VM=1

KEY=$( {
    echo "suite=$SUITE size=$SIZE demo_mb=$DEMO_MB native=$NATIVE"
    cat "$ROOTFS/.luo-rootfs-stamp"
    sha256sum "$BZ" "$DEB" ${MISMATCH:+"$MISMATCH"} | cut -d' ' -f1
    cat "$0" "$GUEST"/* "$REPO/demo/luo-demo-cache" "$REPO/demo/luo-demo-cache.service"
    if ((VM)); then cat "$REPO"/demo/vm/*; fi
} | sha256sum | cut -c1-16)
DIR=$CACHE/qemu-systemd/images
IMG=$DIR/$SUITE-$KEY.img
mkdir -p "$DIR"
exec 9>"$DIR/.$SUITE.lock"
flock 9
if [[ -f $IMG ]]; then
    log "cached: $IMG"
    echo "$IMG"
    exit 0
fi

T0=$(date +%s.%N)
STAGE=$(mktemp -d "$DIR/.$SUITE.stage.XXXXXX")
trap 'rm -rf "$STAGE" "$IMG.tmp"' EXIT
R=$STAGE/root
log "copying $ROOTFS"
cp -a "$ROOTFS" "$R"
rm -f "$R/.luo-rootfs-stamp" "$R/.luo-rootfs-info"

# --- files ------------------------------------------------------------------------------------------
install -D -m 0644 "$BZ" "$R/boot/bzImage"
install -D -m 0644 "$DEB" "$R/tmp/debs/$(basename "$DEB")"
install -D -m 0755 "$REPO/demo/luo-demo-cache" "$R/usr/local/bin/luo-demo-cache"
install -D -m 0644 "$REPO/demo/luo-demo-cache.service" "$R/etc/systemd/system/luo-demo-cache.service"
if [[ $DEMO_MB != 64 ]]; then
    install -d "$R/etc/systemd/system/luo-demo-cache.service.d"
    printf '[Service]\nEnvironment=DEMO_CACHE_MB=%s\n' "$DEMO_MB" > "$R/etc/systemd/system/luo-demo-cache.service.d/size.conf"
fi
install -D -m 0755 "$GUEST/luotest" "$R/usr/local/sbin/luotest"
install -D -m 0644 "$GUEST/luotest.service" "$R/etc/systemd/system/luotest.service"
units="luod.socket luod.service luo-demo-cache.service luotest.service"
if ((NATIVE)); then
    install -D -m 0755 "$GUEST/luo-native-cache" "$R/usr/local/bin/luo-native-cache"
    install -D -m 0644 "$GUEST/luo-native-cache.service" "$R/etc/systemd/system/luo-native-cache.service"
    if [[ $DEMO_MB != 64 ]]; then  # the demo's peer carries as much, or the blackouts do not compare
        install -d "$R/etc/systemd/system/luo-native-cache.service.d"
        printf '[Service]\nEnvironment=NATIVE_CACHE_MB=%s\n' "$DEMO_MB" > "$R/etc/systemd/system/luo-native-cache.service.d/size.conf"
    fi
    units+=" luo-native-cache.service"
fi
vmcfg=""
if ((VM)); then
    "$REPO/demo/vm/build-guest.sh" "$STAGE/guest.img"
    install -D -m 0644 "$STAGE/guest.img" "$R/var/lib/luo-qemu/demo.img"
    install -D -m 0755 "$REPO/demo/vm/luo-vm-probe" "$R/usr/local/bin/luo-vm-probe"
    machine=$(chroot "$R" qemu-system-x86_64 -machine help | sed -n 's/^q35 .*(alias of \(pc-q35-[0-9.]*\)).*/\1/p')
    [[ -n $machine ]] || die "no versioned q35 machine type in the tree's QEMU"
    install -d "$R/etc/luo-qemu"
    sed "s/@MACHINE@/$machine/" "$REPO/demo/vm/demo.toml" > "$R/etc/luo-qemu/demo.toml"
    units+=" luo-qemu@demo.service"
    vmcfg=', "vm": "demo"'
fi
install -d "$R/etc/luod/luod.toml.d"
printf '[agent]\nrunning_kernel_image = "/boot/bzImage"\n' > "$R/etc/luod/luod.toml.d/50-qemu-kernel.toml"
# On sid (262; systemd >= 255 turns "systemctl reboot" into a kexec when a kernel is loaded) one more update.
updates='"liveupdatectl", "systemctl-kexec"'
[[ $SUITE == sid ]] && updates+=', "systemctl-reboot"'
mismatch_json=
if [[ -n $MISMATCH ]]; then
    install -D -m 0644 "$MISMATCH" "$R/boot/bzImage-luo-v6"
    mismatch_json=', "mismatch": "/boot/bzImage-luo-v6"'
fi
printf '{"suite": "%s", "native": %s, "updates": [%s]%s%s}\n' "$SUITE" "$([[ $NATIVE == 1 ]] && echo true || echo false)" \
    "$updates" "$mismatch_json" "$vmcfg" > "$R/etc/luotest.json"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 0\n' > "$R/etc/fstab"
echo "luo-qemu-$SUITE" > "$R/etc/hostname"
# The test kernel has no module support (CONFIG_MODULES is unset); systemd 257 (trixie) fails this unit when
# libkmod, which it dlopen()s and minbase lacks, is missing, which would leave the guest "degraded".
ln -sfn /dev/null "$R/etc/systemd/system/systemd-modules-load.service"

# --- dpkg -i in a chroot: private mount + PID namespace, no CAP_SYS_BOOT --------------------------------
log "installing $(basename "$DEB") and enabling: $units"
setpriv --bounding-set=-sys_boot --inh-caps=-sys_boot -- \
    unshare --mount --pid --fork --propagation private --mount-proc="$R/proc" -- \
    chroot "$R" /bin/sh -ec "
        export DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
        dpkg -i /tmp/debs/*.deb
        systemctl enable $units
        rm -rf /tmp/debs
        python3 -c 'import luo_systemd.varlink, luo_systemd.agent'
    " > "$STAGE/install.log" 2>&1 || { cat "$STAGE/install.log" >&2; die "installing in the chroot failed"; }
# a fresh journal and no state from earlier boots of the tree
rm -rf "$R/var/log/journal/"* "$R/var/lib/luotest"

log "mkfs.ext4 -d ($SIZE, sparse)"
rm -f "$IMG.tmp"
mkfs.ext4 -q -F -L luoroot -E root_owner=0:0 -d "$R" "$IMG.tmp" "$SIZE" >&2
mv "$IMG.tmp" "$IMG"
find "$DIR" -maxdepth 1 -name "$SUITE-*.img" ! -path "$IMG" -delete
T1=$(date +%s.%N)
log "built $IMG in $(printf '%.1f' "$(echo "$T1 - $T0" | bc)") s ($(du -h "$IMG" | cut -f1) used)"
echo "$IMG"
