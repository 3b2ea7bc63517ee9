#!/usr/bin/env bash
# Set imagefs up on this Debian machine and mount a local datastore that holds a ready
# store ("demo") with a small sample image ("hello"). Run as root.
#   usage: scripts/quickstart.sh [MOUNTPOINT]     (default /mnt/imagefs)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

MNT=${1:-/mnt/imagefs}
export IMAGEFS_DATASTORE=${IMAGEFS_DATASTORE:-/var/lib/imagefs}
IMAGEFS=$PWD/.venv/bin/imagefs

if mountpoint -q "$MNT" 2>/dev/null || grep -q " $MNT fuse" /proc/mounts; then
  "$IMAGEFS" umount "$MNT" || true
fi
mkdir -p "$MNT"

mkdir -p "$IMAGEFS_DATASTORE"
"$IMAGEFS" store ls | grep -qx demo || "$IMAGEFS" store create demo >/dev/null
if ! "$IMAGEFS" image ls -q demo | grep -qx hello; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/root/usr/share/hello" "$work/root/etc"
  cp /etc/os-release "$work/root/etc/os-release"
  printf '#!/bin/sh\necho "hello from an imagefs layer"\n' > "$work/root/usr/share/hello/hello.sh"
  chmod 755 "$work/root/usr/share/hello/hello.sh"
  ln -s hello.sh "$work/root/usr/share/hello/link-to-hello"
  tar -C "$work/root" --numeric-owner --owner=0 --group=0 -cf "$work/hello.tar" .
  "$IMAGEFS" image write demo scratch hello "$work/hello.tar" \
      --meta "metaData={\"comment\":\"quick start sample\"}" >/dev/null
fi

"$IMAGEFS" mount "$IMAGEFS_DATASTORE" "$MNT"

cat <<TIPS
imagefs: datastore $IMAGEFS_DATASTORE is mounted at $MNT

Try:
  ls $MNT                                             # stores
  ls -l $MNT/demo/images/                             # images (scratch, hello)
  cat $MNT/demo/images/hello/rootfs/usr/share/hello/hello.sh
  tar -tvf $MNT/demo/images/hello/rootfs.tar          # the whole image as a tar
  tar -C / -cf - etc/hostname > $MNT/demo/images/hello/import/world   # add a layer
  ls $MNT/demo/images/world/rootfs/etc
  cat $MNT/demo/images/hello/info.json
  mkdir $MNT/another-store                            # a new store with its scratch image
  $IMAGEFS umount $MNT                                # unmount
Docs: docs/mount.md (the mount), docs/cli.md (the command line), docs/design.md.
TIPS
