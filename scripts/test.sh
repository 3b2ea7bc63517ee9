#!/usr/bin/env bash
# Run the whole test suite (needs root for FUSE and loop mounts; run scripts/setup.sh first).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
