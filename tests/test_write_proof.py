"""A layer is committed only when proven: full datastores are ENOSPC, lost writes are caught.

Small datastores are real filesystems: a loop-mounted 48 MiB ext4 image and a 30 MB
tmpfs, made and removed here. The writers write into them until the datastore is full;
the write must fail with one clear line and leave nothing behind.
"""
import io
import os
import subprocess
import sys
import tarfile

import pytest

from helpers import make_tar

from imagefs.errors import InvalidInput
from imagefs.layer import verify
from imagefs.layer.extract import apply_layer
from imagefs.layer.model import KIND_REG, LayerModel
from imagefs.layer.writer import write_layer
from reliability.harness import leftovers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop mounts, FUSE)")


def _mounted(kind, where):
    point = os.path.join(where, kind)
    os.mkdir(point)
    if kind == "ext4":
        image = os.path.join(where, "ext4.img")
        subprocess.run(["truncate", "-s", "48M", image], check=True)
        subprocess.run(["mkfs.ext4", "-q", image], check=True)
        subprocess.run(["mount", "-o", "loop", image, point], check=True)     # autoclear: the loop goes with it
    else:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30M", "tmpfs", point], check=True)
    return point


@pytest.fixture(params=["ext4", "tmpfs"])
def small_datastore(request, tmp_path):
    point = _mounted(request.param, str(tmp_path))
    try:
        yield point
    finally:
        subprocess.run(["umount", point], check=True)


def _cli(ds, work, *args, stdin=None):
    env = dict(os.environ, IMAGEFS_WORKDIR=work)
    return subprocess.run([sys.executable, "-m", "imagefs", "--datastore", ds, *args], env=env,
                          capture_output=True, text=True, input=stdin)


def _big_tar(path, files, size):
    rnd = os.urandom(1 << 20)
    with tarfile.open(path, "w") as tf:
        for i in range(files):
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = size
            tf.addfile(ti, io.BytesIO((rnd * (size // len(rnd) + 1))[:size]))
    return path


@pytest.mark.parametrize("writer", ["kernel", "fuse2fs"])
def test_full_datastore_is_no_space_and_leaves_nothing(small_datastore, writer, tmp_path):
    """Today's silent loss: a 60 MiB file onto ~32 MB free; 30 files of 8 MiB onto a 30 MB tmpfs."""
    ds, work = os.path.join(small_datastore, "ds"), str(tmp_path / "work")
    os.mkdir(work)
    tar = _big_tar(str(tmp_path / "big.tar"), 1, 60 << 20) if small_datastore.endswith("ext4") \
        else _big_tar(str(tmp_path / "big.tar"), 30, 8 << 20)
    assert _cli(ds, work, "store", "create", "s").returncode == 0
    free_before = os.statvfs(small_datastore).f_bfree
    proc = _cli(ds, work, "image", "write", "--writer", writer, "s", "scratch", "big", tar)
    assert proc.returncode == 7                       # no space left
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagefs: the datastore is full"), proc.stderr
    assert leftovers(work, ds) == []
    assert os.listdir(os.path.join(ds, "VIC", "s", "images")) == ["scratch"]
    assert abs(os.statvfs(small_datastore).f_bfree - free_before) * os.statvfs(small_datastore).f_frsize < 1 << 20
    # a layer that fits still goes in afterwards
    small = make_tar([("ok", "file", {"data": b"fits"})])
    proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", ds, "image", "write", "s", "scratch",
                           "small"], input=small, capture_output=True, env=dict(os.environ, IMAGEFS_WORKDIR=work))
    assert proc.returncode == 0, proc.stderr


def test_datastore_full_before_the_write(small_datastore, tmp_path):
    """No room even for the new disk: NoSpace up front, not a qemu-img assertion."""
    ds, work = os.path.join(small_datastore, "ds"), str(tmp_path / "work")
    os.mkdir(work)
    assert _cli(ds, work, "store", "create", "s").returncode == 0
    filler = os.path.join(small_datastore, "filler")
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=100"], capture_output=True)
    try:
        proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", ds, "image", "write", "s",
                               "scratch", "x"], input=make_tar([("f", "file", {"data": b"x"})]),
                              capture_output=True, env=dict(os.environ, IMAGEFS_WORKDIR=work))
        assert proc.returncode == 7                       # no space left
        assert proc.stderr.decode().strip() in ("imagefs: the datastore is full: no room for layer disk x.vmdk",
                                                "imagefs: the datastore is full: no room for image x")
        assert leftovers(work, ds) == []
    finally:
        os.unlink(filler)


# --- the read-back catches what the tools do not say --------------------------------------------
@pytest.fixture
def written(layer_base_disk, tmp_path):
    """A layer written from a tar, and the model of that tar recorded by a second extraction."""
    tar = make_tar([("d", "dir", {"mode": 0o750}), ("d/a", "file", {"data": b"A" * 70000}),
                    ("d/b", "file", {"data": b"bbb", "mode": 0o600, "uid": 5}),
                    ("d/l", "symlink", {"target": "a"}), ("d/h", "link", {"target": "d/a"}),
                    ("lower/.wh.gone", "file", {}), ("opq/.wh..wh..opq", "file", {}),
                    ("opq/new", "file", {"data": b"n"})])
    (tmp_path / "child").mkdir()
    child = str(tmp_path / "child" / "child.vmdk")
    work = tmp_path / "work"
    work.mkdir()
    write_layer(layer_base_disk.vmdk, child, io.BytesIO(tar), workdir=str(work))
    return child, tar


def _model_of(tar, where):
    """The model a fresh extraction of ``tar`` over a copy of the base's files records."""
    root = os.path.join(where, "root")
    for rel in ("lower/gone", "lower/keep", "opq/old", "opq/sub/old"):
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        open(os.path.join(root, rel), "w").close()
    model = LayerModel(os.path.join(where, "model.db"))
    apply_layer(root, io.BytesIO(tar), model=model)
    return model


def test_read_back_agrees_with_the_tar(written, tmp_path):
    child, tar = written
    model = _model_of(tar, str(tmp_path))
    assert verify.verify_layer(child, model) == model.count()


@pytest.mark.parametrize("lie, message", [
    (lambda m: m.node(b"d/b", KIND_REG, perm=0o644, uid=5, gid=0, atime=0, mtime=1700000000 * 10**9, size=3,
                      digest="0" * 64), "/d/b has mode 600, not 644"),
    (lambda m: m.node(b"d/new", KIND_REG, perm=0o644, uid=0, gid=0, atime=0, mtime=0, size=1, digest=""),
     "/d/new is missing"),
    (lambda m: m.removed(b"lower/keep", subtree=False), "/lower/keep is still there"),
    (lambda m: m.emptied(b"lower"), "/lower still holds 'gonedir' of a lower layer"),
    (lambda m: m.link(b"d/b2", b"d/b", KIND_REG), "/d/b2 is missing"),
])
def test_read_back_catches_a_difference(written, tmp_path, lie, message):
    child, tar = written
    model = _model_of(tar, str(tmp_path))
    lie(model)
    with pytest.raises(verify.LayerMismatch, match=message):
        verify.verify_layer(child, model)


def test_data_digest_sees_data_not_zeros():
    from imagefs.layer.model import DataDigest

    def digest(*blocks):
        d = DataDigest()
        for offset, data in blocks:
            d.update(offset, data)
        return d.hexdigest()

    assert digest((0, b"abc")) == digest((0, b"abc" + bytes(100000)))          # zeros written = a hole
    assert digest((0, b"abc"), (1 << 40, b"x")) == digest((0, b"ab"), (2, b"c"), (1 << 40, b"x"))
    assert digest((0, b"abc")) != digest((0, b"abd"))
    assert digest((65536, b"a")) != digest((0, b"a"))                          # where data lies counts
    with pytest.raises(ValueError):
        digest((10, b"a"), (5, b"b"))


def test_unordered_sparse_blocks_are_refused(tmp_path):
    """A sparse map that goes back would make the digest (and the file) ambiguous."""
    class Tar:
        def data_blocks(self):
            yield 4096, memoryview(b"late")
            yield 0, memoryview(b"early")
    from imagefs.layer.extract import _Applier
    from imagefs.layer.tarread import Entry
    root = tmp_path / "r"
    root.mkdir()
    applier = _Applier(str(root), None, True, None, LayerModel())
    entry = Entry(b"f", 0o100000, 0o644, 0, 0, 0, 0, 8192, None, None, 0, 0, [])
    with pytest.raises(InvalidInput, match="out of order"):
        applier.apply(entry, Tar())
