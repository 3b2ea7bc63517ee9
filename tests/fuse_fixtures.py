"""Shared pieces of the FUSE tests: a datastore with rich images, real mounts, tree dumps.

The datastore is built once per test session (``build_datastore``: the layer writer
is the slow part) and each test module mounts it once. Every mount is unmounted in
teardown, also when the daemon was killed.
"""
import contextlib
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time

import pytest

from helpers import make_tar

from imagefs.datastore import open_datastore
from imagefs.store import ImageStore

STORE = "s"
CAPACITY = "256MiB"
NS_MTIME = "2021-02-03 04:05:06.123456789"
BIG = 3 * 1024 * 1024 + 12345           # bigger than the export read-back window


# --- mounting ----------------------------------------------------------------------------------
def mount_cmd(ds, mnt, options=(), foreground=False):
    code = ("import sys; from imagefs.fuse.mount import mount; "
            f"sys.exit(mount({str(ds)!r}, {str(mnt)!r}, foreground={foreground!r}, options={list(options)!r}))")
    return [sys.executable, "-c", code]


def daemon_pid(mnt):
    return int(os.getxattr(mnt, "user.imagefs.pid"))


def is_mounted(mnt):
    mnt = os.path.abspath(mnt)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mnt for line in f)


def unmount(mnt):
    """Unmount whatever state the mount is in (live, stale, busy)."""
    from imagefs.fuse.mount import umount
    if is_mounted(mnt) and umount(str(mnt)) != 0:
        umount(str(mnt), lazy=True)


@contextlib.contextmanager
def mounted(ds, mnt, options=("allow_other",)):
    os.makedirs(mnt, exist_ok=True)
    proc = subprocess.run(mount_cmd(ds, mnt, options), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    try:
        yield str(mnt)
    finally:
        unmount(mnt)


@contextlib.contextmanager
def mounted_copy(ds, tmp, options=("allow_other",)):
    """A copy of datastore ``ds`` in ``tmp`` (for tests that change it), mounted."""
    subprocess.run(["cp", "-a", "--sparse=always", str(ds), str(tmp / "ds")], check=True)
    with mounted(tmp / "ds", tmp / "mnt", options) as m:
        yield m


# --- the test images -----------------------------------------------------------------------------
def _stage_base(root):
    """A directory holding every kind of file the read path must show (needs root)."""
    def mk(rel, data=b"", mode=0o644, uid=0, gid=0):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        return path

    os.makedirs(root)
    mk("files/small", b"hello\n", 0o640, 1000, 50)
    mk("files/exec", b"#!/bin/sh\necho hi\n", 0o755)
    mk("files/empty")
    mk("files/big", bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256))
    mk("files/unicode-\u00fc\u00df.txt", b"u")
    mk("files/" + "n" * 255, b"long name")
    sparse = mk("files/sparse")
    with open(sparse, "r+b") as f:
        f.write(b"head")
        f.seek(10 << 20)
        f.write(b"middle")
        f.truncate(50 << 20)
    os.link(os.path.join(root, "files/small"), os.path.join(root, "files/hardlink"))
    os.makedirs(os.path.join(root, "links"))
    os.symlink("../files/small", os.path.join(root, "links/rel"))
    os.symlink("/etc/passwd", os.path.join(root, "links/abs"))
    os.symlink("nowhere", os.path.join(root, "links/dangling"))
    os.symlink("x" * 200, os.path.join(root, "links/slow"))       # not a fast symlink
    os.makedirs(os.path.join(root, "dev"))
    os.mknod(os.path.join(root, "dev/null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(os.path.join(root, "dev/sda"), 0o660 | stat.S_IFBLK, os.makedev(8, 0))
    os.mknod(os.path.join(root, "dev/big"), 0o600 | stat.S_IFCHR, os.makedev(300, 70000))
    os.mkfifo(os.path.join(root, "fifo"), 0o644)
    x = mk("xattrs/file", b"x")
    os.setxattr(x, "user.plain", b"value")
    os.setxattr(x, "user.binary", bytes(range(0, 256, 7)))
    os.setxattr(x, "trusted.t", b"trusted")
    subprocess.run(["setcap", "cap_net_raw+ep", mk("xattrs/cap", b"c", 0o755)], check=True)
    for rel, mode in (("modes/tmp", 0o1777), ("modes/setgid", 0o2775), ("modes/private", 0o700),
                      ("modes/none", 0o000)):
        os.makedirs(os.path.join(root, rel))
        os.chmod(os.path.join(root, rel), mode)
    os.chown(os.path.join(root, "modes/private"), 1000, 1000)
    mk("modes/private/secret", b"secret", 0o600, 1000, 1000)
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy(shutil.which("id"), os.path.join(root, "bin/id"))
    os.chmod(os.path.join(root, "bin/id"), 0o4755)                    # setuid root
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            subprocess.run(["touch", "-h", "-d", NS_MTIME, os.path.join(dirpath, name)], check=True)


def base_tar(tmp):
    """The base layer: GNU tar (posix format: ns times, xattrs, sparse) of the staged tree."""
    stage = os.path.join(tmp, "stage")
    _stage_base(stage)
    out = os.path.join(tmp, "base.tar")
    subprocess.run(["tar", "--format=posix", "--xattrs", "--xattrs-include=*", "--sparse", "--numeric-owner",
                    "-cpf", out, "-C", stage, "."], check=True)
    with open(out, "rb") as f:
        return f.read()


def child_tar():
    """Changes on top of base: modify, delete (whiteout), add, a new hard link to a lower file."""
    return make_tar([
        ("files", "dir", {"mode": 0o755, "mtime": 1700000100}),
        ("files/small", "file", {"data": b"changed\n", "mode": 0o644, "uid": 1000, "gid": 50,
                                 "mtime": 1700000100}),
        ("files/.wh.exec", "file", {}),
        ("files/added", "file", {"data": b"new file\n", "mtime": 1700000100}),
        ("files/big-link", "link", {"target": "files/big"}),
        ("newdir", "dir", {"mode": 0o750, "uid": 7, "gid": 8, "mtime": 1700000100}),
        ("newdir/f", "file", {"data": b"f" * 5000, "mtime": 1700000100}),
    ])


def id_layer_tar():
    """A layer holding a setuid-root copy of id(1)."""
    with open(shutil.which("id"), "rb") as f:
        data = f.read()
    return make_tar([("bin", "dir", {"mode": 0o755}), ("bin/id", "file", {"data": data, "mode": 0o4755})])


def build_datastore(ds, tmp):
    """Store ``s``: scratch <- base <- child; scratch <- idl (setuid id)."""
    st = ImageStore(open_datastore(str(ds)))
    st.create_store(STORE, capacity=CAPACITY)
    st.write_image(STORE, "scratch", "base", io.BytesIO(base_tar(tmp)),
                   metadata={"name": b"base image", "bin": bytes(range(8))})
    st.write_image(STORE, "base", "child", io.BytesIO(child_tar()))
    st.write_image(STORE, "scratch", "idl", io.BytesIO(id_layer_tar()))
    return st


_BUILT = {}


@pytest.fixture(scope="session")
def datastore(tmp_path_factory):
    """The shared datastore (built once per session; test modules import this fixture)."""
    if "ds" not in _BUILT:
        tmp = tmp_path_factory.mktemp("fuse-ds")
        build_datastore(tmp / "ds", str(tmp))
        _BUILT["ds"] = str(tmp / "ds")
    return _BUILT["ds"]


def image_path(mnt, image, *parts):
    return os.path.join(mnt, STORE, "images", image, *parts)


def vmdk_path(ds, image):
    return os.path.join(ds, "VIC", STORE, "images", image, f"{image}.vmdk")


# --- comparing trees -----------------------------------------------------------------------------
def dump(root, *, times=True, blocks=True, inodes=True, dir_sizes=True):
    """Everything lstat, readlink and xattrs tell about each path under ``root`` (sorted).

    Leave out what another filesystem holding the same tree would show differently:
    ``times`` (atime, ctime), ``blocks``, ``dir_sizes``.
    """
    out = {}
    ino_first = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            e = {"mode": st.st_mode, "nlink": st.st_nlink, "uid": st.st_uid, "gid": st.st_gid,
                 "size": st.st_size, "rdev": st.st_rdev}
            if not dir_sizes and stat.S_ISDIR(st.st_mode):
                del e["size"]
            if times:
                e.update(atime=st.st_atime_ns, mtime=st.st_mtime_ns, ctime=st.st_ctime_ns)
            else:
                e.update(mtime=st.st_mtime_ns)
            if blocks:
                e["blocks"] = st.st_blocks
            if stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                e["sha256"] = file_sha256(full)
            e["xattrs"] = {k: os.getxattr(full, k, follow_symlinks=False)
                           for k in sorted(os.listxattr(full, follow_symlinks=False))}
            if inodes and not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                e["linked_to"] = ino_first.setdefault(st.st_ino, rel)
            out[rel] = e
    return out


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tar_names(data):
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.name for m in tf]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
