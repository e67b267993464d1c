#!/bin/bash
# The test command: sets up everything (scripts/bootstrap.sh --test) and runs the whole default test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k emulator -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --test
exec .venv/bin/python -m pytest "$@"
