#!/usr/bin/env bash
# Build pyfuse3 into .venv with the project's patch that lets opendir() ask the kernel to
# cache directory listings (FUSE's cache_readdir; patches/pyfuse3-cache-readdir.patch,
# written to be offered upstream). Image trees never change, so a listing read once can
# serve every later readdir. Does nothing when the patched version is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.5.0
PATCH=patches/pyfuse3-cache-readdir.patch

if .venv/bin/python - "$VERSION" <<'PY'
import sys
try:
    import pyfuse3
    from importlib.metadata import version
except ImportError:
    sys.exit(1)
sys.exit(0 if version("pyfuse3") == sys.argv[1] and hasattr(pyfuse3.FileInfo(), "cache_readdir") else 1)
PY
then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$work" "pyfuse3==$VERSION"
tar -xzf "$work/pyfuse3-$VERSION.tar.gz" -C "$work"
patch -d "$work/pyfuse3-$VERSION" -p1 --quiet < "$PATCH"
.venv/bin/pip install -q --disable-pip-version-check --force-reinstall --no-deps "$work/pyfuse3-$VERSION"
