#!/usr/bin/env bash
# build-kernel.sh — build (once, cached) a minimal LUO test kernel from Debian sid's linux-source-7.*.
#
# Usage: build-kernel.sh [FRAGMENT]        (default: luo.config next to this script)
# Env:   LUO_CACHE        cache root (default /var/cache/luo-systemd)
#        LUO_SID_UPDATE=1 refresh the private sid apt lists first (may pick a newer kernel => rebuild)
#        LUO_KERNEL_PKG   force a source package name (e.g. linux-source-7.2)
#        LUO_ABI_VARIANT  build a kernel whose LUO format identifier is this instead (e.g. luo-v6): a copy of
#                         the source tree with LUO_ABI_COMPATIBLE patched, cached under its own key; the
#                         pre-flight must refuse it (tests/test_qemu_systemd.py)
#
# Steps: install host build deps if missing (bookworm, normal sources) -> find the newest
# linux-source-7.* in the sid lists (sid-apt.sh, a separate apt config) -> download + unpack once into
# $LUO_CACHE/src/ -> allnoconfig with the fragment in $OUT=$LUO_CACHE/build/<key> (key = hash of source
# version + fragment content) -> verify every fragment option landed in .config -> make bzImage.
# If $OUT/arch/x86/boot/bzImage already exists for the key, nothing is built.
# Progress goes to stderr; stdout is only the bzImage's path (one line), for callers' $(...).
# Also writes $OUT/SOURCE_DIR (path of the unpacked tree) for run-selftests.sh.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${LUO_CACHE:-/var/cache/luo-systemd}
FRAGMENT=$(realpath "${1:-$HERE/luo.config}")
SID_APT=$HERE/sid-apt.sh
export LUO_CACHE=$CACHE

log() { echo "build-kernel: $*" >&2; }
die() { echo "build-kernel: ERROR: $*" >&2; exit 1; }

[[ -r $FRAGMENT ]] || die "fragment $FRAGMENT not readable"
mkdir -p "$CACHE"

# --- host build dependencies (normal bookworm sources) ----------------------------------------------
HOST_PKGS=(qemu-system-x86 flex bison bc libelf-dev libssl-dev build-essential cpio xz-utils)
missing=()
for p in "${HOST_PKGS[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing host packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_get() { apt-get -o DPkg::Lock::Timeout=600 "$@" >&2; }
    apt_get install -y --no-install-recommends "${missing[@]}" \
        || { apt_get update && apt_get install -y --no-install-recommends "${missing[@]}"; }
fi

# --- which linux-source ---------------------------------------------------------------------------
[[ ${LUO_SID_UPDATE:-0} == 1 ]] && "$SID_APT" update >&2
PKG=${LUO_KERNEL_PKG:-$("$SID_APT" newest 'linux-source-7\.[0-9]+')}
[[ -n $PKG ]] || die "no linux-source-7.* package in the sid lists (try LUO_SID_UPDATE=1)"
VERSION=$("$SID_APT" apt-cache show "$PKG" | awk '$1=="Version:" {print $2; exit}')
[[ -n $VERSION ]] || die "cannot read the version of $PKG from the sid lists"

VARIANT=${LUO_ABI_VARIANT:-}
[[ -z $VARIANT || $VARIANT =~ ^luo-v[0-9]+$ ]] || die "LUO_ABI_VARIANT must look like luo-vN, not $VARIANT"
KEY=$( { printf '%s %s%s\n' "$PKG" "$VERSION" "${VARIANT:+ $VARIANT}"; cat "$FRAGMENT"; } | sha256sum | cut -c1-16)
OUT=$CACHE/build/$KEY
BZ=$OUT/arch/x86/boot/bzImage
SRC_BASE=$CACHE/src/${PKG}_$VERSION

# --- one build per key at a time; the shared source tree under a lock of its own ----------------------
mkdir -p "$CACHE/build"
exec 9>"$CACHE/build/.$KEY.lock"
flock 9
if [[ -f $BZ && -f $OUT/.luo-build-ok ]]; then
    log "cached: $PKG $VERSION, fragment $(basename "$FRAGMENT"), key $KEY (nothing to do)"
    echo "$BZ"
    exit 0
fi
exec 8>"$CACHE/build-kernel.lock"
flock 8

T0=$(date +%s)

# --- fetch + unpack the source once ------------------------------------------------------------------
if [[ ! -f $SRC_BASE/.unpacked ]]; then
    DEBDIR=$CACHE/debs
    VFILE=${VERSION//:/%3a}
    DEB=$DEBDIR/${PKG}_${VFILE}_all.deb
    if [[ ! -f $DEB ]]; then
        log "downloading $PKG $VERSION from sid"
        "$SID_APT" download "$DEBDIR" "$PKG=$VERSION" >&2
    fi
    [[ -f $DEB ]] || die "expected $DEB after download"
    log "unpacking $DEB"
    rm -rf "$SRC_BASE"; mkdir -p "$SRC_BASE/deb"
    dpkg-deb -x "$DEB" "$SRC_BASE/deb"
    TARBALL=$(find "$SRC_BASE/deb/usr/src" -maxdepth 1 -name 'linux-source-*.tar.xz' | head -n1)
    [[ -n $TARBALL ]] || die "no linux-source-*.tar.xz inside $DEB"
    tar -C "$SRC_BASE" -xJf "$TARBALL"
    rm -rf "$SRC_BASE/deb"
    touch "$SRC_BASE/.unpacked"
fi
SRC=$(find "$SRC_BASE" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)
[[ -n $SRC && -f $SRC/Makefile ]] || die "unpacked source tree not found under $SRC_BASE"
if [[ -n $VARIANT ]]; then
    # Hard links share every file with the original tree; sed -i writes the one patched file anew.
    VSRC=$SRC_BASE-$VARIANT/$(basename "$SRC")
    if [[ ! -f $VSRC/.luo-variant ]]; then
        rm -rf "$SRC_BASE-$VARIANT"; mkdir -p "$SRC_BASE-$VARIANT"
        cp -al "$SRC" "$VSRC"
        sed -i -E "s/^(#define LUO_ABI_COMPATIBLE\s+)\"luo-v[0-9]+\"/\1\"$VARIANT\"/" "$VSRC/include/linux/kho/abi/luo.h"
        grep -q "\"$VARIANT\"" "$VSRC/include/linux/kho/abi/luo.h" || die "could not patch LUO_ABI_COMPATIBLE"
        touch "$VSRC/.luo-variant"
    fi
    SRC=$VSRC
    log "LUO format variant $VARIANT (source copy $SRC)"
fi
flock -u 8  # the source tree is ready: builds of other keys may go on alongside

# --- configure + verify ----------------------------------------------------------------------------
log "configuring $PKG $VERSION in $OUT"
mkdir -p "$OUT"
cp "$FRAGMENT" "$OUT/luo.config.fragment"
printf '%s\n' "$SRC" > "$OUT/SOURCE_DIR"
printf '%s %s\n' "$PKG" "$VERSION" > "$OUT/SOURCE_VERSION"
make -C "$SRC" ARCH=x86_64 O="$OUT" KCONFIG_ALLCONFIG="$OUT/luo.config.fragment" allnoconfig \
    > "$OUT/config.log" 2>&1 || { tail -n 30 "$OUT/config.log" >&2; die "allnoconfig failed (log: $OUT/config.log)"; }

bad=()
while IFS= read -r line; do
    line=${line%%[[:space:]]}
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF "$line" "$OUT/.config" || bad+=("${BASH_REMATCH[1]} (wanted ${BASH_REMATCH[2]}, got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$OUT/.config" || echo 'absent'))")
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        ! grep -qE "^${BASH_REMATCH[1]}=" "$OUT/.config" || bad+=("${BASH_REMATCH[1]} (wanted unset, got: $(grep -E "^${BASH_REMATCH[1]}=" "$OUT/.config"))")
    fi
done < "$FRAGMENT"
if ((${#bad[@]})); then
    printf 'build-kernel: MISSING from %s/.config: %s\n' "$OUT" "${bad[@]}" >&2
    die "${#bad[@]} fragment option(s) did not make it into .config (dependencies unmet?)"
fi
log "all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$FRAGMENT") fragment options present in .config"

# --- build ------------------------------------------------------------------------------------------
JOBS=$(nproc)
log "make -j$JOBS bzImage (log: $OUT/build.log)"
TB=$(date +%s)
make -C "$SRC" ARCH=x86_64 O="$OUT" -j"$JOBS" bzImage > "$OUT/build.log" 2>&1 \
    || { tail -n 40 "$OUT/build.log" >&2; die "kernel build failed (log: $OUT/build.log)"; }
[[ -f $BZ ]] || die "make succeeded but $BZ is missing"
touch "$OUT/.luo-build-ok"
T1=$(date +%s)
log "built $PKG $VERSION: make bzImage $((T1 - TB)) s, total (incl. fetch/unpack/config) $((T1 - T0)) s"
echo "$BZ"
