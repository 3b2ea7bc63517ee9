"""What the kernel may keep: every directory listing it read (FUSE's no-opendir mode, through
the project's pyfuse3 patch), trusted only while the directory's mtime stays: the parts of
the mount that change are read again as soon as their names change, here or outside.

Requests are counted in libfuse's own request trace (the ``debug`` mount option)."""
import io
import os
import subprocess
import time

from imagefs.datastore import open_datastore
from imagefs.fuse.ops import NO_OPENDIR
from imagefs.store import ImageStore

from fuse_fixtures import (STORE, child_tar, datastore, image_path, is_mounted,  # noqa: F401
                           mount_cmd, unmount, wait_for)


def _count(log, opcode):
    time.sleep(0.2)      # libfuse writes its trace after the reply
    with open(log, "rb") as f:
        return sum(1 for line in f if f"opcode: {opcode} ".encode() in line)


def _kept(log, read_again, attempts=10):
    """Whether a listing read once is served again without a READDIRPLUS. Another process
    dropping the machine's caches in between (benchmarks do) makes the kernel ask again:
    an attempt during which /proc/vmstat counted a drop tells nothing."""
    for _ in range(attempts):
        read_again()
        before, drops = _count(log, "READDIRPLUS"), _drops()
        read_again()
        if _drops() == drops:
            return _count(log, "READDIRPLUS") == before
    raise AssertionError(f"the machine's caches were dropped during each of {attempts} attempts")


def _drops():
    with open("/proc/vmstat") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("drop_"))


def _mount_traced(ds, mnt, log):
    mnt.mkdir()
    with open(log, "wb") as err:
        proc = subprocess.Popen(mount_cmd(ds, mnt, ["debug"]), stdout=subprocess.DEVNULL, stderr=err)
    assert wait_for(lambda: is_mounted(mnt) and os.path.isdir(image_path(mnt, "base")), timeout=30)
    return proc


def test_the_kernel_keeps_listings_and_opens_no_directory(datastore, tmp_path):  # noqa: F811
    assert NO_OPENDIR, "pyfuse3 without the readdir patch: run scripts/setup.sh (scripts/build-pyfuse3.sh)"
    mnt, log = tmp_path / "mnt", tmp_path / "debug.log"
    proc = _mount_traced(datastore, mnt, log)
    try:
        files = image_path(mnt, "base", "rootfs", "files")
        assert "small" in os.listdir(files) and _count(log, "READDIRPLUS") >= 1
        assert _kept(log, lambda: os.listdir(files))             # served from the kernel's cache
        for name in ("OPENDIR", "RELEASEDIR"):                   # one ENOSYS, then never again
            assert _count(log, name) <= (1 if name == "OPENDIR" else 0), name

        images = os.path.join(mnt, STORE, "images")

        def after_its_attributes_expired():
            getattrs = _count(log, "GETATTR")
            time.sleep(1.2)                                      # its attributes are kept 1 s
            os.listdir(images)
            assert _count(log, "GETATTR") > getattrs             # then it asks whether it changed
        assert _kept(log, after_its_attributes_expired)          # unchanged: the listing is kept
    finally:
        unmount(mnt)
        proc.wait(timeout=60)


def test_changing_listings_are_read_again(tmp_path, datastore):  # noqa: F811
    ds = tmp_path / "ds"
    subprocess.run(["cp", "-a", "--sparse=always", str(datastore), str(ds)], check=True)
    mnt, log = tmp_path / "mnt", tmp_path / "debug.log"
    proc = _mount_traced(ds, mnt, log)
    try:
        images = os.path.join(mnt, STORE, "images")
        imports = image_path(mnt, "base", "import")
        before = sorted(os.listdir(images))
        assert "outside" not in before and os.listdir(imports) == []

        # made outside the mount: the kernel has no idea; a listing shows it once the mount's
        # own view of the store is renewed (it reuses it for 1 s)
        store = ImageStore(open_datastore(str(ds)))
        store.write_image(STORE, "base", "outside", io.BytesIO(child_tar()))
        assert wait_for(lambda: sorted(os.listdir(images)) == sorted(before + ["outside"]), timeout=10)

        # an import through the mount: listed while it runs, gone from import/ once sealed
        with open(os.path.join(imports, "inside"), "wb") as f:
            assert os.listdir(imports) == ["inside"]
            f.write(child_tar())
        assert os.listdir(imports) == []
        assert sorted(os.listdir(images)) == sorted(before + ["outside", "inside"])

        # deleted inside: gone from the next listing; outside: once the mount looks again
        os.rmdir(os.path.join(images, "inside"))
        assert sorted(os.listdir(images)) == sorted(before + ["outside"])
        store.delete_image(STORE, "outside")
        assert wait_for(lambda: sorted(os.listdir(images)) == before, timeout=10)

        # stores come and go at the root the same way
        assert os.listdir(mnt) == [STORE]
        store.create_store("made-outside", capacity="64MiB")
        assert wait_for(lambda: sorted(os.listdir(mnt)) == sorted([STORE, "made-outside"]), timeout=10)
        os.rmdir(os.path.join(mnt, "made-outside"))
        assert os.listdir(mnt) == [STORE]
    finally:
        unmount(mnt)
        proc.wait(timeout=60)
