"""What the kernel may keep: listings of image directories (FUSE cache_readdir, through
the project's pyfuse3 patch), never listings of the parts of the mount that change.

Requests are counted in libfuse's own request trace (the ``debug`` mount option)."""
import os
import subprocess
import time

from imagefs.fuse.ops import CACHE_READDIR

from fuse_fixtures import STORE, datastore, image_path, is_mounted, mount_cmd, unmount, wait_for  # noqa: F401


def _readdirs(log):
    with open(log, "rb") as f:
        return sum(1 for line in f if b"opcode: READDIR" in line)


def test_the_kernel_keeps_listings_of_images_only(datastore, tmp_path):  # noqa: F811
    assert CACHE_READDIR, "pyfuse3 without cache_readdir: run scripts/setup.sh (scripts/build-pyfuse3.sh)"
    mnt, log = tmp_path / "mnt", tmp_path / "debug.log"
    mnt.mkdir()
    with open(log, "wb") as err:
        proc = subprocess.Popen(mount_cmd(datastore, mnt, ["debug"]), stdout=subprocess.DEVNULL, stderr=err)
    try:
        assert wait_for(lambda: is_mounted(mnt) and os.path.isdir(image_path(mnt, "base")), timeout=30)
        files = image_path(mnt, "base", "rootfs", "files")
        first = sorted(os.listdir(files))
        time.sleep(0.2)
        asked = _readdirs(log)
        assert asked >= 1 and "small" in first
        for _ in range(3):
            assert sorted(os.listdir(files)) == first
        time.sleep(0.2)
        assert _readdirs(log) == asked              # served from the kernel's cache

        images = os.path.join(mnt, STORE, "images")
        os.listdir(images)
        time.sleep(0.2)
        before = _readdirs(log)
        os.listdir(images)
        time.sleep(0.2)
        assert _readdirs(log) > before              # images come and go: asked every time
    finally:
        unmount(mnt)
        proc.wait(timeout=60)
