"""Real inputs to mutate, made with the real tools: a small ext4 in a monolithicSparse VMDK
holding every kind of inode, a child layer written on it by imagefs's own layer writer, and
layer tars written by GNU tar, bsdtar and Python's tarfile.

Built once into a cache directory (a few seconds) and reused.
"""
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile

from imagefs.datastore import open_datastore
from imagefs.store import ImageStore

STORE = "f"
BASE, CHILD = "scratch", "child"
RAW_SIZE = "8M"
VERSION = "1"           # bump when the seeds change


def _stage(root):
    """A directory with every kind of file the readers must handle."""
    def mk(rel, data=b"", mode=0o644):
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        return p

    os.makedirs(root)
    mk("etc/hostname", b"fuzz\n")
    mk("bin/tool", b"#!/bin/sh\necho hi\n" * 10, 0o4755)
    mk("data/medium", bytes(range(256)) * 800)
    mk("data/empty")
    frag = mk("data/fragmented")
    with open(frag, "r+b") as f:          # many extents: an extent tree with an index node
        for i in range(0, 40):
            f.seek(i * 8192)
            f.write(b"x" * 4096)
    sparse = mk("data/sparse")
    with open(sparse, "r+b") as f:
        f.write(b"head")
        f.truncate(50 << 20)
    for i in range(300):                  # a directory of several blocks (htree)
        mk(f"many/file-with-a-longish-name-{i:04d}", b"%d" % i)
    os.symlink("../data/medium", os.path.join(root, "fast-link"))
    os.symlink("x" * 120, os.path.join(root, "slow-link"))
    os.link(os.path.join(root, "data/medium"), os.path.join(root, "data/hardlink"))
    os.mkfifo(os.path.join(root, "fifo"))
    os.mknod(os.path.join(root, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    x = mk("xattrs/f", b"x")
    os.setxattr(x, "user.small", b"v")
    os.setxattr(x, "user.big", b"B" * 1500)     # does not fit in the inode: an xattr block
    os.setxattr(x, "trusted.t", b"t")


def _child_tar():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, data=None, **kw):
            ti = tarfile.TarInfo(name)
            for k, v in kw.items():
                setattr(ti, k, v)
            if data is not None:
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
        add("data", type=tarfile.DIRTYPE, mode=0o755)
        add("data/medium", b"changed" * 1000)
        add("data/.wh.empty", b"")
        add("new", type=tarfile.DIRTYPE, mode=0o750)
        add("new/file", b"n" * 70000, pax_headers={"SCHILY.xattr.user.n": "1"})
        add("new/link", type=tarfile.SYMTYPE, linkname="../data/medium")
    return buf.getvalue()


def build_disks(where):
    """A datastore at ``where``/ds with store f: scratch (the small base) <- child."""
    work = os.path.join(where, "work")
    stage = os.path.join(work, "stage")
    _stage(stage)
    raw = os.path.join(work, "base.raw")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-N", "512",
                    "-O", "^inline_data", "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
                    "-d", stage, raw, RAW_SIZE], check=True)
    ds = os.path.join(where, "ds")
    images = os.path.join(ds, "VIC", STORE, "images", BASE)
    os.makedirs(os.path.join(images, "imageMetadata"))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                    raw, os.path.join(images, f"{BASE}.vmdk")], check=True)
    open(os.path.join(images, "manifest"), "wb").close()
    st = ImageStore(open_datastore(ds))
    st.write_image(STORE, BASE, CHILD, io.BytesIO(_child_tar()))
    shutil.copy(raw, os.path.join(where, "base.raw"))
    shutil.rmtree(work)


def build_tars(where):
    """Layer tars as different writers make them."""
    stage = os.path.join(where, "tar-stage")
    os.makedirs(stage)
    for rel, data in (("a/b/c.txt", b"abc\n" * 100), ("a/long-" + "n" * 150, b"long"), ("top", b"t")):
        p = os.path.join(stage, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.symlink("b/c.txt", os.path.join(stage, "a/sym"))
    os.link(os.path.join(stage, "top"), os.path.join(stage, "a/hard"))
    os.setxattr(os.path.join(stage, "top"), "user.x", b"xattr value")
    with open(os.path.join(stage, "sparse"), "wb") as f:
        f.write(b"s")
        f.truncate(1 << 18)
        f.seek(1 << 18)
        f.write(b"e")
    os.mkfifo(os.path.join(stage, "fifo"))
    out = os.path.join(where, "tars")
    os.makedirs(out)
    runs = {"gnu-posix.tar": ["tar", "--format=posix", "--xattrs", "--sparse", "-cf"],
            "gnu-gnu.tar": ["tar", "--format=gnu", "--sparse", "-cf"],
            "bsdtar-pax.tar": ["bsdtar", "--format=pax", "--xattrs", "-cf"],
            "bsdtar-ustar.tar": ["bsdtar", "--format=ustar", "-cf"]}
    for name, argv in runs.items():
        subprocess.run(argv + [os.path.join(out, name), "-C", stage, "."], check=True, capture_output=True)
    subprocess.run(["bsdtar", "--format=pax", "-czf", os.path.join(out, "bsdtar.tar.gz"), "-C", stage, "a"],
                   check=True)
    with open(os.path.join(out, "whiteouts.tar"), "wb") as f:
        f.write(_child_tar())
    shutil.rmtree(stage)


def seeds(cache):
    """The seed directory (made if missing): ds/ (a datastore), base.raw, tars/."""
    where = os.path.join(cache, f"seeds-v{VERSION}")
    if not os.path.exists(os.path.join(where, "done.json")):
        shutil.rmtree(where, ignore_errors=True)
        os.makedirs(where)
        build_disks(where)
        build_tars(where)
        with open(os.path.join(where, "done.json"), "w") as f:
            json.dump({"version": VERSION}, f)
    return where
