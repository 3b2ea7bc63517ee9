#!/usr/bin/env bash
# Install imagefs and everything it needs on Debian (bookworm or later), as root:
# apt packages for VMDK, ext4, FUSE and tar work, then a venv in .venv with imagefs in it.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config          # FUSE mounts (fusermount3) and building pyfuse3 if no wheel fits
  e2fsprogs fuse2fs                      # mke2fs, e2fsck, debugfs; the unprivileged layer writer
  qemu-utils qemu-system-common          # qemu-img; qemu-storage-daemon (in qemu-system-common)
  libarchive13 libarchive-tools          # tar reading for imports; bsdtar as a test oracle
  attr acl tar gzip bzip2 xz-utils zstd  # getfattr/setfattr, setfacl/getfacl; compressed layer inputs
  umoci skopeo                           # OCI images: independent layer applier and image tool (test oracles)
  debootstrap                            # a real Debian rootfs for the OCI image tests
  fio bindfs util-linux procps psmisc    # benchmarks (bindfs: a C FUSE peer); mount/losetup/setpriv; pkill/fuser
  patch                                  # the project's patch to pyfuse3 (scripts/build-pyfuse3.sh)
  systemd                                # systemd-analyze: the docs' unit example is verified (tests/test_docs.py)
  golang-go golang-github-vmware-govmomi-dev openssl  # the vSphere simulator the tests build (scripts/build-vcsim.sh)
  python3 python3-venv python3-dev gcc
)

need_install=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_install+=("$p")
done
if [ "${#need_install[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_install[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,fuzz]'
./scripts/build-pyfuse3.sh               # pyfuse3 whose readdir knows its directory (patches/)
