#!/bin/bash
# scripts/bootstrap.sh [--test]
# Installs what the project needs on a fresh Debian machine (12 "bookworm" or newer) and builds ./.venv with
# the package; --test adds the test tools (pytest, ruff, mypy, docutils: the "test" extra), which the demo
# does not use.  Idempotent: a second run only checks. Needs root for apt-get.  Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=
case "${1:-}" in
    --test) extra=test ;;
    "") ;;
    *) echo "usage: scripts/bootstrap.sh [--test]" >&2; exit 2 ;;
esac

apt_packages=(python3-venv python3-dev pkg-config gcc debootstrap)
# dbus-daemon: the tests' private buses (tests/harness.py); the demo's containers bring their own.
[ -z "$extra" ] || apt_packages+=(dbus)

# Packages built from the systemd source must match the installed systemd exactly, or apt upgrades the
# host's whole systemd stack: libsystemd-dev (systemd-python compiles against it) and systemd-container
# (systemd-nspawn, for the demo and the end-to-end tests).
libsystemd_version=$(dpkg-query -W -f '${Version}' libsystemd0)
systemd_version=$(dpkg-query -W -f '${Version}' systemd)
missing=()
for p in "${apt_packages[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
[ "$(dpkg-query -W -f '${Version}' libsystemd-dev 2>/dev/null || true)" = "$libsystemd_version" ] ||
    missing+=("libsystemd-dev=$libsystemd_version")
[ "$(dpkg-query -W -f '${Version}' systemd-container 2>/dev/null || true)" = "$systemd_version" ] ||
    missing+=("systemd-container=$systemd_version")
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's interpreter: the one the packages and the root file systems use, with its headers.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
# pip's downloads and wheels are cached with everything else the project builds (see README, Tests).
export PIP_CACHE_DIR=${LUO_CACHE:-/var/cache/luo-systemd}/pip
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp-test" ] && [ ! -e "$stamp${extra:+-$extra}" ]; then
    .venv/bin/pip install -q --upgrade pip >&2
    .venv/bin/pip install -q -e ".${extra:+[$extra]}" >&2
    touch "$stamp${extra:+-$extra}"
fi

# node_exporter for the metrics test (tests/harness.py NodeExporter): Debian's binary unpacked into the
# cache, not installed, so that no exporter service starts on the host.
node_exporter=${LUO_CACHE:-/var/cache/luo-systemd}/node-exporter
if [ -n "$extra" ] && [ ! -x "$node_exporter/usr/bin/prometheus-node-exporter" ]; then
    echo "bootstrap: unpacking prometheus-node-exporter into $node_exporter" >&2
    download=$(mktemp -d)
    chmod 755 "$download"  # apt downloads as _apt
    (cd "$download" && { apt-get -o DPkg::Lock::Timeout=600 download prometheus-node-exporter >&2 ||
        { apt-get -o DPkg::Lock::Timeout=600 update -qq >&2 && apt-get -o DPkg::Lock::Timeout=600 download prometheus-node-exporter >&2; }; })
    rm -rf "$node_exporter.new"
    dpkg-deb -x "$download"/prometheus-node-exporter_*.deb "$node_exporter.new"
    rm -rf "$download" "$node_exporter"
    mv "$node_exporter.new" "$node_exporter"
fi
