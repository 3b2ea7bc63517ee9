#!/usr/bin/env bash
# Build pyfuse3 into .venv with the project's patch that tells readdir() which directory
# it lists (patches/pyfuse3-readdir-inode.patch, written to be offered upstream). With it
# the mount answers opendir with ENOSYS, FUSE's no-opendir mode: the kernel then sends no
# opendir/releasedir at all and keeps every listing it read (image trees never change; the
# mount invalidates the listings of the parts that do). Does nothing when the patched
# version is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=3.5.0
PATCH=patches/pyfuse3-readdir-inode.patch

if .venv/bin/python - "$VERSION" <<'PY'
import sys
try:
    import pyfuse3
    from importlib.metadata import version
except ImportError:
    sys.exit(1)
sys.exit(0 if version("pyfuse3") == sys.argv[1] and hasattr(pyfuse3.ReaddirToken, "inode") else 1)
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
