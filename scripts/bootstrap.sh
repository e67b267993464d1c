#!/bin/bash
# Installs what the project needs on a fresh Debian machine (12 "bookworm" or newer) and builds ./.venv.
# Idempotent: a second run only checks. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(python3-venv python3-dev pkg-config gcc dbus debootstrap)

# Packages built from the systemd source must match the installed systemd exactly, or apt upgrades the
# host's whole systemd stack: libsystemd-dev (systemd-python compiles against it) and systemd-container
# (systemd-nspawn, for the end-to-end tests).
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
    echo "bootstrap: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's interpreter: the one the packages and the root file systems use, with its headers.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
