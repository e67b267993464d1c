#!/usr/bin/env bash
# run-contract.sh — run the project's contract suite (tests/contract/) on the real LUO kernel in qemu
# (TCG), across real in-guest kexecs: boot 0 runs the single-boot rules with pytest
# (test_rules.py -k kernel) and step 0 of every scenario, then kexecs while holding the sessions;
# boot N runs step N (tests/contract/kexec_driver.py).  The host is never kexec'd.
#
# Usage: run-contract.sh [--build-only]
# Env:   LUO_CACHE            cache root (default /var/cache/luo-systemd)
#        LUO_QEMU_TIMEOUT     seconds for the whole qemu run (default 600)
#        LUO_QEMU_MEM         guest RAM (default 1G)
#        LUO_KERNEL_FRAGMENT  config fragment passed to build-kernel.sh (default luo.config here)
#        LUO_INITRD_COMPRESS  zstd (default), xz, or none
#        LUO_EXTRA_APPEND     extra kernel command line words (e.g. "liveupdate=off" to see it fail)
#
# The initrd: a static /init (contract-init.c), the bzImage (for the in-guest kexec_file_load), the
# host's Debian /usr/bin/python3.11 with the shared libraries it and the kept extension modules need
# (per ldd), a pruned /usr/lib/python3.11 compiled to unchecked-hash .pyc, pytest + pluggy + iniconfig +
# packaging from the project venv, and the project's src/ and tests/{conftest.py,contract/}.
# The Python part is cached per python3.11 build in $LUO_CACHE/contract/; the rest is rebuilt each run.
# Pass/fail is decided from the serial log ($LUO_CACHE/logs/<timestamp>/contract.log).  Exit 0 iff
# pytest passed, every scenario step passed, the driver's total says 0 failed and there were 3 boots.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${LUO_CACHE:-/var/cache/luo-systemd}
export LUO_CACHE=$CACHE
TIMEOUT=${LUO_QEMU_TIMEOUT:-600}
MEM=${LUO_QEMU_MEM:-1G}
COMPRESS=${LUO_INITRD_COMPRESS:-zstd}
PY=/usr/bin/python3.11
VENV_SITE=$REPO/.venv/lib/python3.11/site-packages
CMDLINE_BASE="console=ttyS0 kho=on liveupdate=on panic=-1 retain_initrd luo_boot=0"
BUILD_ONLY=0
[[ ${1:-} == --build-only ]] && BUILD_ONLY=1

log() { echo "run-contract: $*" >&2; }
die() { echo "run-contract: ERROR: $*" >&2; exit 1; }

[[ -x $PY ]] || die "$PY is missing (Debian package python3.11)"
[[ -d $VENV_SITE/_pytest ]] || die "no pytest in $VENV_SITE (run scripts/bootstrap.sh)"
case $COMPRESS in xz | zstd | none) ;; *) die "LUO_INITRD_COMPRESS must be xz, zstd or none" ;; esac

# --- kernel (cached) ------------------------------------------------------------------------------
BZ=$("$HERE/build-kernel.sh" ${LUO_KERNEL_FRAGMENT:+"$LUO_KERNEL_FRAGMENT"})
[[ -f $BZ ]] || die "build-kernel.sh did not yield a bzImage (got '$BZ')"
OUT=$(cd "$(dirname "$BZ")/../../.." && pwd)
if [[ $COMPRESS != none ]]; then
    opt=CONFIG_RD_${COMPRESS^^}
    grep -qx "$opt=y" "$OUT/.config" || die "the kernel lacks $opt (add it to the fragment or use LUO_INITRD_COMPRESS=none)"
fi
W=$OUT/qemu/contract
mkdir -p "$W" "$CACHE/contract"

exec 9>"$CACHE/run-contract.lock"
flock 9

compress() {  # FILE LEVEL -> prints the compressed file's path
    case $COMPRESS in
    xz) xz --check=crc32 -T0 "-$2" -c "$1" > "$1.xz"; echo "$1.xz" ;;
    zstd) zstd -q -f "-$2" -T0 "$1" -o "$1.zst"; echo "$1.zst" ;;
    none) echo "$1" ;;
    esac
}
to_cpio() {  # DIR OUT: a newc archive of DIR's contents, owned by root
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) > "$2"
}

# --- part 1, cached: python3.11 + libs + pruned stdlib + pytest & co (one key for all of it) ------
# The initrd is two concatenated compressed cpio archives (the kernel unpacks each in turn): this big
# one changes only with the interpreter, the venv's pytest & co, the pruning rules or the compression.
STDLIB_DROP=(test idlelib tkinter turtledemo ensurepip lib2to3 pydoc_data distutils venv sqlite3 dbm curses
    __phello__ site-packages dist-packages "config-3.11-x86_64-linux-gnu" turtle.py __pycache__)
DYNLOAD_KEEP=(_asyncio _bz2 _contextvars _ctypes _decimal _json _lsprof _lzma _multibytecodec
    _multiprocessing _posixshmem _queue _typing _uuid _zoneinfo mmap resource termios)
# pytest 9 imports pygments unconditionally (terminalwriter) and asks importlib.metadata for pluggy's
# version, so the packages go in with their dist-info.
SITE_PKGS=(pytest pluggy iniconfig packaging pygments)
SITE_MODS=(pytest _pytest pluggy iniconfig packaging pygments py.py)
site_infos=()
for p in "${SITE_PKGS[@]}"; do
    d=$(compgen -G "$VENV_SITE/$p-*.dist-info") || die "no $p-*.dist-info in $VENV_SITE (run scripts/bootstrap.sh)"
    site_infos+=("$d")
done
PYKEY=$( {
    sha256sum "$PY"
    echo "${STDLIB_DROP[*]} / ${DYNLOAD_KEEP[*]} / ${SITE_MODS[*]} / ${site_infos[*]##*/} / $COMPRESS / v2"
} | sha256sum | cut -c1-16)
PYROOT=$CACHE/contract/pyroot-$PYKEY
if [[ ! -f $PYROOT/.ok ]]; then
    t_py=$(date +%s)
    log "staging python3.11 ($($PY -V 2>&1)) + ${SITE_PKGS[*]} into $PYROOT"
    rm -rf "$PYROOT"
    R=$PYROOT/root
    mkdir -p "$R/usr/bin" "$R/usr/lib" "$R/lib/x86_64-linux-gnu" "$R/lib64" "$R/luo/site"
    cp "$PY" "$R/usr/bin/python3.11"
    ln -s python3.11 "$R/usr/bin/python3"
    excludes=()
    for d in "${STDLIB_DROP[@]}"; do excludes+=(--exclude="python3.11/$d"); done
    tar -C /usr/lib "${excludes[@]}" --exclude='__pycache__' -cf - python3.11 | tar -C "$R/usr/lib" -xf -
    find "$R/usr/lib/python3.11" -xtype l -delete  # Debian's sitecustomize.py -> /etc/python3.11/...
    DL=$R/usr/lib/python3.11/lib-dynload
    for so in "$DL"/*.so; do
        keep=0
        for k in "${DYNLOAD_KEEP[@]}"; do [[ $(basename "$so") == "$k".cpython-* ]] && keep=1; done
        ((keep)) || rm -f "$so"
    done
    # Shared libraries: whatever ldd resolves for the interpreter and the kept extension modules.
    for lib in $(ldd "$PY" "$DL"/*.so 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*[^:]$/ && $2 ~ /^\(/ {print $1}' | sort -u); do
        case $lib in
        */ld-linux-x86-64.so.2) cp -L "$lib" "$R/lib64/ld-linux-x86-64.so.2" ;;
        *) cp -L "$lib" "$R/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
        esac
    done
    for p in "${SITE_MODS[@]}"; do
        [[ -e $VENV_SITE/$p ]] || die "$VENV_SITE/$p missing"
        cp -a "$VENV_SITE/$p" "$R/luo/site/"
    done
    cp -a "${site_infos[@]}" "$R/luo/site/"
    find "$R/luo/site" -name __pycache__ -prune -exec rm -rf {} +
    # .pyc that is valid whatever the mtimes in the cpio: unchecked-hash.  Saves compiling at every boot.
    "$PY" -m compileall -q -j0 --invalidation-mode unchecked-hash "$R/usr/lib/python3.11" "$R/luo/site" > /dev/null \
        || die "compileall of the stdlib failed"
    to_cpio "$R" "$PYROOT/runtime.cpio"
    compress "$PYROOT/runtime.cpio" 19 > "$PYROOT/runtime.name"
    touch "$PYROOT/.ok"
    log "runtime archive built in $(($(date +%s) - t_py)) s"
fi
RUNTIME=$(cat "$PYROOT/runtime.name")

# --- part 2, every run: /init, the bzImage, the project's src/ and tests -----------------------------
PART=$W/run
STAGE=$W/rootfs  # both parts together, for the host-side import check below
rm -rf "$PART" "$STAGE"
mkdir -p "$PART"/{dev,proc,sys,tmp,boot,etc,luo/tests}
mknod -m 600 "$PART/dev/console" c 5 1
echo "root:x:0:0:root:/tmp:/bin/sh" > "$PART/etc/passwd"
echo "root:x:0:" > "$PART/etc/group"
gcc -static -O2 -Wall -o "$PART/init" "$HERE/contract-init.c"
cp "$BZ" "$PART/boot/bzImage"
cp -a "$REPO/src" "$PART/luo/src"
cp "$REPO/pyproject.toml" "$PART/luo/"
# conftest.py and what it imports (tests/harness.py); nothing of dbus-next or systemd-python.
cp "$REPO/tests/__init__.py" "$REPO/tests/conftest.py" "$REPO/tests/harness.py" "$PART/luo/tests/"
cp -a "$REPO/tests/contract" "$PART/luo/tests/contract"
find "$PART/luo" -name __pycache__ -prune -exec rm -rf {} + -o -name '*.egg-info' -prune -exec rm -rf {} +
"$PY" -m compileall -q -j0 --invalidation-mode unchecked-hash "$PART/luo" > /dev/null || die "compileall /luo failed"

# Sanity check on the host: the staged interpreter imports what the guest will (in a chroot).
mkdir -p "$STAGE"
cp -a "$PYROOT/root/." "$PART/." "$STAGE/"
chroot "$STAGE" /usr/bin/python3.11 -c '
import os, sys
os.chdir("/luo"); sys.path[:0] = ["/luo", "/luo/src", "/luo/site"]
import pytest, tests.conftest, tests.contract.test_rules, tests.contract.kexec_driver
' || die "the staged python cannot import the suite (see above)"

to_cpio "$PART" "$W/run.cpio"
RUNPART=$(compress "$W/run.cpio" 9)
INITRD=$W/initrd.img
cat "$RUNTIME" "$RUNPART" > "$INITRD"
log "initrd $(stat -c %s "$INITRD") bytes ($COMPRESS): runtime $(stat -c %s "$RUNTIME") (cpio $(stat -c %s "$PYROOT/runtime.cpio")) + run $(stat -c %s "$RUNPART") (cpio $(stat -c %s "$W/run.cpio")); $(du -s --apparent-size --block-size=1M "$STAGE" | cut -f1) MiB unpacked; bzImage $(stat -c %s "$BZ")"
((BUILD_ONLY)) && { echo "$INITRD"; exit 0; }

# --- run ------------------------------------------------------------------------------------------
LOGDIR=$CACHE/logs/$(date +%Y%m%d-%H%M%S)
mkdir -p "$LOGDIR"
serial=$LOGDIR/contract.log
append="$CMDLINE_BASE${LUO_EXTRA_APPEND:+ $LUO_EXTRA_APPEND}"
t0=$(date +%s.%N)
set +e
timeout --kill-after=10 "$TIMEOUT" qemu-system-x86_64 -accel tcg -m "$MEM" -smp 1 -nodefaults \
    -display none -monitor none -serial stdio -no-reboot \
    -kernel "$BZ" -initrd "$INITRD" -append "$append" < /dev/null > "$serial" 2>&1
qrc=$?
set -e
secs=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")

# --- verdict from the serial log -------------------------------------------------------------------
tr -d '\r' < "$serial" > "$serial.txt" && mv "$serial.txt" "$serial"
expected_steps=$(cd "$REPO" && "$PY" -c '
import sys; sys.path[:0] = ["src"]
from tests.contract.scenarios import SCENARIOS
print(sum(len(s.steps) for s in SCENARIOS))')
boots_expected=$(cd "$REPO" && "$PY" -c '
import sys; sys.path[:0] = ["src"]
from tests.contract.scenarios import SCENARIOS
print(max(len(s.steps) for s in SCENARIOS))')
pytest_line=$(grep -aE '^=+ .*( passed| failed| errors?| skipped| xfailed| no tests ran).* in [0-9.]+s.* =+$' "$serial" | tail -n1 || true)
driver_line=$(grep -aE '^contract-kexec: [0-9]+ passed, [0-9]+ failed$' "$serial" | tail -n1 || true)
step_pass=$(grep -acE '^SCENARIO .* step [0-9]+ PASS' "$serial" || true)
step_fail=$(grep -acE '^SCENARIO .* step [0-9]+ FAIL' "$serial" || true)
boots=$(grep -ac 'Linux version' "$serial" || true)

why=()
[[ -n $pytest_line ]] || why+=("no pytest summary line")
[[ -z $pytest_line || ! $pytest_line =~ (failed|error) ]] || why+=("pytest: failures")
[[ -z $pytest_line || $pytest_line =~ [0-9]+\ passed ]] || why+=("pytest: nothing passed")
grep -aq '^RULES pytest PASS' "$serial" || why+=("RULES pytest did not PASS")
grep -aq '^CHECK no-leak PASS' "$serial" || why+=("CHECK no-leak did not PASS")
((step_fail == 0)) || why+=("$step_fail scenario step(s) FAILED")
((step_pass == expected_steps)) || why+=("$step_pass of $expected_steps scenario steps passed")
[[ $driver_line =~ ' 0 failed'$ ]] || why+=("driver summary: '${driver_line:-none}'")
((boots == boots_expected)) || why+=("expected $boots_expected kernel boots, saw $boots")
((qrc == 124 || qrc == 137)) && why+=("qemu timed out after ${TIMEOUT}s")

echo "serial log: $serial (${secs}s wall, $boots boot(s), initrd $(stat -c %s "$INITRD") bytes $COMPRESS)"
grep -aE '^(SCENARIO|RULES|CHECK) |contract-kexec: kexec_file_load|^CONTRACTINIT: .*(boot=|RESULT)' "$serial" | sed 's/^/  /' || true
echo "pytest (guest): ${pytest_line:-<none>}"
echo "driver (guest): ${driver_line:-<none>}"
if ((${#why[@]})); then
    echo "contract-kexec FAIL: $(IFS=';'; echo "${why[*]}")"
    echo "  last lines of the serial log:"
    tail -n 30 "$serial" | sed 's/^/  | /'
    exit 1
fi
echo "contract-kexec PASS"
