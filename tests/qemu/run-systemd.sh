#!/usr/bin/env bash
# run-systemd.sh [bookworm|trixie|sid|sid-qemu] — a real live update under systemd as PID 1, in qemu (TCG).
#
# The test kernel (build-kernel.sh, cached) boots a Debian disk image (build-image.sh, cached: the nspawn
# tier's debootstrap tree + the project's luo-systemd .deb + the demo + the in-guest driver guest/luotest)
# from virtio-blk, root=/dev/vda.  Each run writes to its own qcow2 overlay.  Inside the guest:
#   boot 1: luod + luo-demo-cache run; liveupdatectl kexec --kernel /boot/bzImage  -> real kexec
#   boot 2: the demo is restored (same sha256, LIVEUPDATE_RESTORED=1, count 1), luod idle, verify ok;
#           liveupdatectl prepare /boot/bzImage; systemctl kexec                 -> real kexec
#   boot 3: restored again (count 2); verdict; reboot, and qemu (-no-reboot) exits.
# sid (systemd >= 261) adds luo-native-cache.service, whose fd store systemd itself carries through LUO, and
#   boot 3: liveupdatectl prepare; plain systemctl reboot (a kexec, since a kernel is loaded) -> boot 4
#   boot 4: restored (count 3); a second kernel build whose LUO format is luo-v6 (build-kernel.sh with
#           LUO_ABI_VARIANT) is refused by the pre-flight (prepare exits 3, nothing is loaded);
#           then, for the record, liveupdatectl kexec --force into it: its console shows what it does.
# sid-qemu adds QEMU and luo-qemu@demo.service: a guest (nested TCG) that keeps running across both kexecs.
# Pass/fail and the blackout come from the serial log (systemd_verdict.py); the exit status is 0 iff PASS.
#
# Env: LUO_CACHE (default /var/cache/luo-systemd), LUO_QEMU_TIMEOUT (whole run, default 900 s),
#      LUO_QEMU_MEM (default 1G), LUO_KERNEL_FRAGMENT, LUO_EXTRA_APPEND (extra kernel command line words),
#      LUO_DEMO_CACHE_MB (default 64), LUO_KEEP_OVERLAY=1 (keep the run's disk overlay in the log dir).
# Logs: $LUO_CACHE/logs/<timestamp>-systemd-SUITE/{serial.log,serial.ts,summary.txt}.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SUITE=${1:-bookworm}
CACHE=${LUO_CACHE:-/var/cache/luo-systemd}
export LUO_CACHE=$CACHE
TIMEOUT=${LUO_QEMU_TIMEOUT:-900}
MEM=${LUO_QEMU_MEM:-1G}
APPEND="root=/dev/vda rw console=ttyS0 kho=on liveupdate=on panic=-1 ${LUO_EXTRA_APPEND:-}"

log() { echo "run-systemd: $*" >&2; }
die() { echo "run-systemd: ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(now) - $1" | bc)"; }

case $SUITE in bookworm | trixie | sid | sid-qemu) ;; *) die "usage: run-systemd.sh [bookworm|trixie|sid|sid-qemu]" ;; esac
[[ $(id -u) == 0 ]] || die "must run as root"
[[ $(uname -m) == x86_64 ]] || die "x86_64 hosts only"

# --- inputs (all cached) ------------------------------------------------------------------------------
t=$(now)
BZ=$("$HERE/build-kernel.sh" ${LUO_KERNEL_FRAGMENT:+"$LUO_KERNEL_FRAGMENT"})
[[ -f $BZ ]] || die "build-kernel.sh did not yield a bzImage (got '$BZ')"
MISMATCH=
if [[ $SUITE == sid ]]; then
    MISMATCH=$(LUO_ABI_VARIANT=luo-v6 "$HERE/build-kernel.sh" ${LUO_KERNEL_FRAGMENT:+"$LUO_KERNEL_FRAGMENT"} | tail -n1)
    [[ -f $MISMATCH ]] || die "build-kernel.sh (LUO_ABI_VARIANT=luo-v6) did not yield a bzImage"
fi
T_KERNEL=$(since "$t")
t=$(now)
if [[ $SUITE == *-qemu ]]; then
    "$REPO/tests/nspawn/build-qemu-rootfs.sh" "${SUITE%-qemu}" >&2
else
    "$REPO/tests/nspawn/build-rootfs.sh" "$SUITE" >&2
fi
T_ROOTFS=$(since "$t")
t=$(now)
DEBS=$("$REPO/packaging/build-deb.sh" --no-lintian)
DEB=$(grep -E '/luo-systemd_[^/]*_all\.deb$' <<< "$DEBS" | tail -n1)
[[ -f $DEB ]] || die "packaging/build-deb.sh did not yield luo-systemd_*.deb (got: $DEBS)"
T_DEB=$(since "$t")
t=$(now)
IMG=$("$HERE/build-image.sh" "$SUITE" "$BZ" "$DEB" $MISMATCH)
[[ -f $IMG ]] || die "build-image.sh did not yield an image (got '$IMG')"
T_IMAGE=$(since "$t")
command -v qemu-img > /dev/null || {
    log "installing qemu-utils (qemu-img)"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends qemu-utils >&2
}

LOGDIR=$CACHE/logs/$(date +%Y%m%d-%H%M%S)-systemd-$SUITE
mkdir -p "$LOGDIR"
OVERLAY=$LOGDIR/overlay.qcow2
qemu-img create -q -f qcow2 -F raw -b "$IMG" "$OVERLAY"
log "kernel $BZ"
log "image  $IMG (overlay $OVERLAY)"
log "inputs: kernel ${T_KERNEL}s, rootfs ${T_ROOTFS}s, deb ${T_DEB}s, image ${T_IMAGE}s; booting (timeout ${TIMEOUT}s, serial log $LOGDIR/serial.log)"

# --- qemu (TCG, never KVM here), the serial console stamped with host time line by line -------------------
STAMP='
import sys, time
raw = open(sys.argv[1], "wb", buffering=0)
ts = open(sys.argv[2], "w", buffering=1)
echo = sys.argv[3] == "1"
for line in sys.stdin.buffer:
    t = time.time()
    raw.write(line)
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    ts.write("%.3f %s\n" % (t, text))
    if echo:
        sys.stderr.write(text + "\n")
'
t=$(now)
set +e
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 -accel tcg -m "$MEM" -smp 1 -nodefaults -display none \
    -monitor none -serial stdio -no-reboot -kernel "$BZ" -append "$APPEND" \
    -drive "file=$OVERLAY,if=virtio,format=qcow2,cache=unsafe" < /dev/null 2> "$LOGDIR/qemu.stderr" |
    python3 -c "$STAMP" "$LOGDIR/serial.log" "$LOGDIR/serial.ts" "${LUO_VERBOSE:-0}"
rc=${PIPESTATUS[0]}
set -e
T_QEMU=$(since "$t")
log "qemu exited with $rc after ${T_QEMU}s"

set +e
python3 "$HERE/systemd_verdict.py" "$LOGDIR/serial.ts" --suite "$SUITE" --qemu-rc "$rc" --qemu-seconds "$T_QEMU" \
    --updates "$([[ $SUITE == sid ]] && echo 3 || echo 2)" ${MISMATCH:+--forced} \
    --inputs "kernel=${T_KERNEL}s rootfs=${T_ROOTFS}s deb=${T_DEB}s image=${T_IMAGE}s" | tee "$LOGDIR/summary.txt"
verdict=${PIPESTATUS[0]}
set -e
if [[ $verdict == 0 && ${LUO_KEEP_OVERLAY:-0} != 1 ]]; then
    rm -f "$OVERLAY"
fi
echo "logs: $LOGDIR"
exit "$verdict"
