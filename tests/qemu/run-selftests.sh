#!/usr/bin/env bash
# run-selftests.sh — boot the cached LUO test kernel in qemu (TCG) and run the kernel's own
# liveupdate selftests (tools/testing/selftests/liveupdate/) across a real in-guest kexec.
#
# Usage: run-selftests.sh [TEST...]
#   TEST: luo_kexec_simple luo_multi_session luo_stress_files luo_stress_sessions (stage 1 -> kexec ->
#         stage 2) and liveupdate (the kselftest-harness test, one boot, no kexec). Default: all five.
# Env:   LUO_CACHE           cache root (default /var/cache/luo-systemd)
#        LUO_QEMU_TIMEOUT    seconds per qemu run (default 240)
#        LUO_KERNEL_FRAGMENT config fragment passed to build-kernel.sh (default luo.config here)
#        LUO_EXTRA_APPEND    extra kernel command line words (e.g. "liveupdate=off" to see it fail)
#
# Per test: one qemu run of bzImage + an initrd holding a static /init (luo-init.c), the static test
# binaries and the bzImage itself. /init runs `TEST --stage 1`, then kexec_file_load()s the same
# bzImage and the same initrd (read back via retain_initrd) with the same command line but
# luo_stage=2, and kexecs; the second kernel's /init runs `TEST --stage 2`.
# Pass/fail is decided from the serial log, kept under $LUO_CACHE/logs/. Exit 0 iff all passed.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${LUO_CACHE:-/var/cache/luo-systemd}
export LUO_CACHE=$CACHE
TIMEOUT=${LUO_QEMU_TIMEOUT:-240}
ALL_TESTS=(luo_kexec_simple luo_multi_session luo_stress_files luo_stress_sessions liveupdate)
TESTS=("$@"); ((${#TESTS[@]})) || TESTS=("${ALL_TESTS[@]}")
CMDLINE_BASE="console=ttyS0 kho=on liveupdate=on panic=-1"

log() { echo "run-selftests: $*" >&2; }
die() { echo "run-selftests: ERROR: $*" >&2; exit 1; }

for t in "${TESTS[@]}"; do
    [[ " ${ALL_TESTS[*]} " == *" $t "* ]] || die "unknown test '$t' (known: ${ALL_TESTS[*]})"
done

# --- kernel (cached) ------------------------------------------------------------------------------
BZ=$("$HERE/build-kernel.sh" ${LUO_KERNEL_FRAGMENT:+"$LUO_KERNEL_FRAGMENT"})
[[ -f $BZ ]] || die "build-kernel.sh did not yield a bzImage (got '$BZ')"
OUT=$(cd "$(dirname "$BZ")/../../.." && pwd)
SRC=$(cat "$OUT/SOURCE_DIR")
ST=$SRC/tools/testing/selftests/liveupdate
[[ -d $ST ]] || die "no $ST in the kernel source"
W=$OUT/qemu
mkdir -p "$W/bin"

exec 9>"$CACHE/run-selftests.lock"
flock 9

# --- uapi headers + static selftest binaries (cached per kernel build) ----------------------------
# `make headers` = headers_install minus its final rsync copy (rsync is not on the host); the
# sanitized uapi headers land in $OUT/usr/include, which is what kselftest's lib.mk uses by default.
HDR=$OUT/usr/include
if [[ ! -f $HDR/linux/liveupdate.h ]]; then
    log "make headers -> $HDR"
    make -C "$SRC" ARCH=x86_64 O="$OUT" headers > "$W/headers.log" 2>&1 \
        || { tail -n 20 "$W/headers.log" >&2; die "make headers failed (log: $W/headers.log)"; }
fi
CFLAGS=(-static -O2 -Wall -Wno-unused-function -D_GNU_SOURCE= -isystem "$HDR" -I "$ST")
for t in "${TESTS[@]}"; do
    [[ -x $W/bin/$t ]] && continue
    log "compiling selftest $t (static)"
    if [[ $t == liveupdate ]]; then
        gcc "${CFLAGS[@]}" -o "$W/bin/$t" "$ST/liveupdate.c" "$ST/luo_test_utils.c"
    else
        gcc "${CFLAGS[@]}" -o "$W/bin/$t" "$ST/$t.c" "$ST/luo_test_utils.c"
    fi
done
# /init and the cpio writer are tiny: rebuild every time (luo-init.c may have changed).
gcc -static -O2 -Wall -o "$W/init" "$HERE/luo-init.c"
gcc -O2 -o "$W/gen_init_cpio" "$SRC/usr/gen_init_cpio.c"

# --- initrd per test: /init, /tests/TEST, /boot/bzImage (stage 1 kexecs into the same kernel + initrd).
# One test per initrd keeps it small (~3.8 MB): kexec_file_load hashes kernel+initrd, slow under TCG.
make_initrd() {  # TEST -> path of its initrd
    local t=$1 list=$W/initrd-$1.list cpio=$W/initrd-$1.cpio
    {
        echo "dir /dev 0755 0 0"
        echo "nod /dev/console 0600 0 0 c 5 1"
        echo "dir /proc 0755 0 0"
        echo "dir /sys 0755 0 0"
        echo "dir /boot 0755 0 0"
        echo "dir /tests 0755 0 0"
        echo "file /init $W/init 0755 0 0"
        echo "file /boot/bzImage $BZ 0644 0 0"
        echo "file /tests/$t $W/bin/$t 0755 0 0"
    } > "$list"
    "$W/gen_init_cpio" "$list" > "$cpio"
    echo "$cpio"
}

# --- run ------------------------------------------------------------------------------------------
LOGDIR=$CACHE/logs/$(date +%Y%m%d-%H%M%S)
mkdir -p "$LOGDIR"
pass=0; failed=0; failed_names=()
for t in "${TESTS[@]}"; do
    serial=$LOGDIR/$t.log
    initrd=$(make_initrd "$t")
    if [[ $t == liveupdate ]]; then
        append="$CMDLINE_BASE luo_test=$t luo_kexec=0"; what="boot"
    else
        append="$CMDLINE_BASE retain_initrd luo_test=$t luo_stage=1"; what="boot+kexec+boot"
    fi
    append+=${LUO_EXTRA_APPEND:+ $LUO_EXTRA_APPEND}
    t0=$(date +%s.%N)
    set +e
    timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 -accel tcg -m 1G -smp 1 -nodefaults \
        -display none -monitor none -serial stdio -no-reboot \
        -kernel "$BZ" -initrd "$initrd" -append "$append" < /dev/null > "$serial" 2>&1
    qrc=$?
    set -e
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    secs=$(printf '%.1f' "$secs")

    why=""
    grep -aq "LUOINIT: .* RESULT $t PASS" "$serial" || why="no 'RESULT $t PASS' line"
    if [[ $t == liveupdate ]]; then
        grep -aqE '^# Totals: pass:[0-9]+ fail:0 ' "$serial" || why="${why:+$why; }kselftest totals not 'fail:0'"
    else
        boots=$(grep -ac 'Linux version' "$serial" || true)
        [[ $boots == 2 ]] || why="${why:+$why; }expected 2 kernel boots, saw $boots"
        grep -aq "test=$t stage=2" "$serial" || why="${why:+$why; }stage 2 never started"
        grep -aq -- '--- .*TEST PASSED' "$serial" || why="${why:+$why; }no 'TEST PASSED' line from the selftest"
    fi
    ((qrc == 124 || qrc == 137)) && why="${why:+$why; }qemu timed out after ${TIMEOUT}s"
    if [[ -z $why ]]; then
        pass=$((pass + 1))
        echo "PASS $t (${secs}s wall, qemu $what) serial log: $serial"
    else
        failed=$((failed + 1)); failed_names+=("$t")
        echo "FAIL $t (${secs}s wall, qemu rc $qrc): $why"
        echo "  serial log: $serial (last lines follow)"
        tail -n 25 "$serial" | sed 's/^/  | /'
    fi
done
echo "logs: $LOGDIR"
echo "$pass passed, $failed failed"
((failed == 0))
