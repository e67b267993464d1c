#!/bin/bash
# Build (or reuse) a cached Debian root file system for the systemd-nspawn test tier.
#
#   tests/nspawn/build-rootfs.sh SUITE        SUITE: bookworm (systemd 252) | trixie (257) | sid (262+)
#
# Result: ${LUO_CACHE:-/var/cache/luo-systemd}/rootfs/SUITE, a debootstrap --variant=minbase tree.
# It is built in a temporary directory next to it and renamed into place only when complete, and
# rebuilt only when the stamp (a hash of this script, the suite and the package list) changed.
# Environment:
#   LUO_CACHE      cache root (default /var/cache/luo-systemd)
#   LUO_MIRROR     Debian mirror URI (default: the host's Debian archive URI from /etc/apt sources)
#   LUO_REBUILD=1  rebuild even when the stamp matches
# Needs root. Installs debootstrap from the host's configured apt sources if it is missing.
# Nothing here boots or touches the host's systemd; the rootfs is only populated with dpkg in a chroot.
set -euo pipefail

SUITE=${1:-}
case "$SUITE" in
    bookworm|trixie|sid) ;;
    *) echo "usage: $0 bookworm|trixie|sid" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "$0: must run as root (debootstrap)" >&2; exit 1; }

# Packages on top of minbase. All of them exist in bookworm, trixie and sid (checked against the
# archive's Packages files). procps is an addition to the brief's list: tests and shutdown hooks
# want ps/pgrep, and minbase has neither.
INCLUDE=systemd,systemd-sysv,dbus,python3,python3-dbus-next,python3-systemd,kexec-tools,util-linux,procps

CACHE=${LUO_CACHE:-/var/cache/luo-systemd}
TOP=$CACHE/rootfs
DEST=$TOP/$SUITE
STAMP_NAME=.luo-rootfs-stamp

log() { echo "build-rootfs[$SUITE]: $*" >&2; }
# shellcheck source=tests/nspawn/cached-tree.sh
. "$(dirname "$0")/cached-tree.sh"

# --- configure the tree for containers -----------------------------------------------------------
# The text of this function is part of the stamp: changing it rebuilds the cached trees.
configure_rootfs() {
    local R=$1 SUITE=$2 u
    echo "luo-$SUITE" >"$R/etc/hostname"
    mkdir -p "$R/usr/lib/systemd/system-shutdown"

    # kexec-tools: never load a kernel on its own (debconf default already says so; make it explicit).
    if [ -f "$R/etc/default/kexec" ]; then
        sed -i 's/^LOAD_KEXEC=.*/LOAD_KEXEC=false/' "$R/etc/default/kexec"
    fi

    # Units that only slow a container's boot or have nothing to do there. The harness attaches no
    # terminal, so no login prompts either. Masking a unit that a suite does not ship is harmless.
    for u in \
        console-getty.service container-getty@.service getty@.service serial-getty@.service \
        systemd-networkd-wait-online.service systemd-timesyncd.service \
        apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
        fstrim.timer dpkg-db-backup.timer man-db.timer \
        kexec.service kexec-load.service ; do
        ln -sfn /dev/null "$R/etc/systemd/system/$u"
    done

    # A persistent but small journal: `journalctl -b -1` inside shows the boot before a simulated kexec.
    mkdir -p "$R/var/log/journal" "$R/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=persistent\nSystemMaxUse=16M\n' >"$R/etc/systemd/journald.conf.d/luo-test.conf"

    # Smaller tree, no downloaded .debs.
    chroot "$R" apt-get clean >/dev/null 2>&1 || rm -f "$R"/var/cache/apt/archives/*.deb
    rm -f "$R"/var/cache/apt/*.bin
}

stamp=$( { echo "suite=$SUITE"; echo "include=$INCLUDE"; declare -f configure_rootfs; } | sha256sum | cut -d' ' -f1)

up_to_date() {
    [ "${LUO_REBUILD:-0}" != 1 ] && [ -f "$DEST/$STAMP_NAME" ] && [ "$(cat "$DEST/$STAMP_NAME")" = "$stamp" ]
}
begin_build "$SUITE"
chmod 755 "$TMP"

# --- debootstrap on the host --------------------------------------------------------------------
# debootstrap builds the trees; systemd-container (systemd-nspawn) is what harness.py needs to boot
# them. It must match the host's systemd version exactly, or apt would upgrade the whole systemd
# stack: pin it (on Debian 12 the matching version may only be in the -security suite).
# apt's output is progress: to stderr, like everything this script says.
apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 "$@" >&2; }
apt_install() {
    apt_get install -y --no-install-recommends "$@" && return 0
    apt_get update && apt_get install -y --no-install-recommends "$@"
}
if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    apt_install debootstrap
fi
if ! command -v systemd-nspawn >/dev/null 2>&1 && [ "${LUO_NO_NSPAWN_INSTALL:-0}" != 1 ]; then
    sdhost=$(dpkg-query -W -f='${Version}' systemd 2>/dev/null || true)
    log "installing systemd-container${sdhost:+=$sdhost}"
    apt_install "systemd-container${sdhost:+=$sdhost}" ||
        log "WARNING: could not install systemd-container${sdhost:+=$sdhost}; harness.py needs systemd-nspawn"
fi

# --- the mirror: the host's own Debian archive ---------------------------------------------------
find_mirror() {
    python3 - <<'EOF'
import glob, os, re
host = ""
try:
    for line in open("/etc/os-release"):
        if line.startswith("VERSION_CODENAME="):
            host = line.split("=", 1)[1].strip().strip('"')
except OSError:
    pass
entries = []  # (uri, suites, components)
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
for f in files:
    try:
        lines = open(f).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = line.split("#", 1)[0].strip()
        line = re.sub(r"\[[^]]*\]", " ", line)  # drop [options]
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "deb":
            entries.append((parts[1], [parts[2]], parts[3:]))
for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        text = open(f).read()
    except OSError:
        continue
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, val = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = val.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        for uri in fields.get("uris", "").split():
            entries.append((uri, fields.get("suites", "").split(), fields.get("components", "").split()))
for uri, suites, comps in entries:
    if host in suites and "main" in comps and "security" not in uri:
        print(uri)
        break
EOF
}
MIRROR=${LUO_MIRROR:-$(find_mirror)}
[ -n "$MIRROR" ] || { echo "$0: no Debian mirror found in /etc/apt sources; set LUO_MIRROR" >&2; exit 1; }
log "mirror $MIRROR"

# --- build into the temporary directory ---------------------------------------------------------
t0=$(date +%s)
log "debootstrap into $TMP"
if ! debootstrap --variant=minbase --components=main --include="$INCLUDE" \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$SUITE" "$TMP" "$MIRROR" >"$TMP.log" 2>&1; then
    tail -n 30 "$TMP.log" >&2
    [ -f "$TMP/debootstrap/debootstrap.log" ] && tail -n 30 "$TMP/debootstrap/debootstrap.log" >&2
    rm -f "$TMP.log"
    exit 1
fi
rm -f "$TMP.log"

configure_rootfs "$TMP" "$SUITE"
R=$TMP
sdver=$(chroot "$R" dpkg-query -W -f='${Version}' systemd)
{
    echo "suite=$SUITE"
    echo "systemd=$sdver"
    echo "python3=$(chroot "$R" dpkg-query -W -f='${Version}' python3)"
    echo "include=$INCLUDE"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$(( $(date +%s) - t0 ))"
} >"$R/.luo-rootfs-info"
echo "$stamp" >"$R/$STAMP_NAME"

swap_into_place "$SUITE"
log "built $DEST (systemd $sdver) in $(( $(date +%s) - t0 )) s"
