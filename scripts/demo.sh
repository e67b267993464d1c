#!/bin/bash
# The main job: a full live update of a real systemd service on the emulator, with the outcome shown.
# Sets up only what it uses (scripts/bootstrap.sh without the test tools), builds the project's Debian packages
# (without lintian, a packaging check for the tests), a Debian root file system
# (bookworm: systemd 252; SUITE=trixie or SUITE=sid for 257 or 262), boots it with systemd-nspawn, and runs
# demo/luo-demo-cache through "liveupdatectl kexec" (see tests/nspawn/live_update.py).  Needs root.
#
# "scripts/demo.sh vm": the same for a virtual machine, luo-qemu@demo.service (QEMU, TCG, 128 MiB): the guest
# keeps running across the live update (see tests/nspawn/vm_update.py); SUITE=trixie (default) or sid, as
# bookworm's QEMU 7.2 cannot keep a guest.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "") module=tests.nspawn.live_update suite=${SUITE:-bookworm} ;;
    vm) module=tests.nspawn.vm_update suite=${SUITE:-trixie} ;;
    *) echo "usage: $0 [vm]" >&2; exit 2 ;;
esac
scripts/bootstrap.sh
mapfile -t debs < <(packaging/build-deb.sh --no-lintian)
exec .venv/bin/python -m "$module" --suite "$suite" "${debs[@]}"
