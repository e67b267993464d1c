#!/bin/bash
# The main job: a full live update of a real systemd service on the emulator, with the outcome shown.
# Sets up everything (scripts/bootstrap.sh), builds the project's Debian packages, a Debian root file system
# (bookworm: systemd 252; SUITE=trixie or SUITE=sid for 257 or 262), boots it with systemd-nspawn, and runs
# demo/luo-demo-cache through "liveupdatectl kexec" (see tests/nspawn/live_update.py).  Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
mapfile -t debs < <(packaging/build-deb.sh)
exec .venv/bin/python -m tests.nspawn.live_update --suite "${SUITE:-bookworm}" "${debs[@]}"
