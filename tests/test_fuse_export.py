"""Exports read from the mount: export/<ancestor>[,options].tar (diffs) and rootfs[,options].tar
(the whole image) with cat, cp, GNU tar, bsdtar, tarfile."""
import errno
import io
import os
import stat
import subprocess
import tarfile
import threading
import time

import pytest

from imagefs.datastore import open_datastore
from imagefs.export import export_diff
from imagefs.export.filterspec import FilterSpec
from imagefs.store import ImageStore

from fuse_fixtures import BIG, STORE, datastore, dump, file_sha256, image_path, mounted, tar_names  # noqa: F401


@pytest.fixture(scope="module")
def mnt(datastore, tmp_path_factory):  # noqa: F811
    with mounted(datastore, tmp_path_factory.mktemp("export") / "mnt") as m:
        yield m


@pytest.fixture(scope="module")
def store(datastore):  # noqa: F811
    return ImageStore(open_datastore(datastore))


def expected(store, image, ancestor, **kw):
    """The CLI's export: ``ancestor`` None is the whole image."""
    old = None if ancestor is None else store.tree(STORE, ancestor)
    return b"".join(export_diff(store.tree(STORE, image), old, **kw))


def whole(mnt, image, options=""):
    return image_path(mnt, image, f"rootfs{options}.tar")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_export_lists_the_ancestors(mnt):
    assert os.listdir(image_path(mnt, "child", "export")) == ["base.tar", "scratch.tar"]
    assert os.listdir(image_path(mnt, "base", "export")) == ["scratch.tar"]
    assert os.listdir(image_path(mnt, "scratch", "export")) == []
    assert "rootfs.tar" in os.listdir(image_path(mnt, "scratch"))


@pytest.mark.parametrize("image,ancestor", [("child", "base"), ("child", "scratch"), ("base", "scratch")])
def test_export_is_the_diff(mnt, store, image, ancestor):
    assert read(image_path(mnt, image, "export", f"{ancestor}.tar")) == expected(store, image, ancestor)


@pytest.mark.parametrize("image", ["child", "base", "scratch"])
def test_rootfs_tar_is_the_whole_image(mnt, store, image):
    assert read(whole(mnt, image)) == expected(store, image, None)


def test_scratch_tar_is_the_diff_against_scratch_not_the_whole_image(mnt):
    """One meaning per name, as the CLI's --ancestor scratch: a base layer's own changes."""
    diff, full = tar_names(read(image_path(mnt, "base", "export", "scratch.tar"))), tar_names(read(whole(mnt, "base")))
    assert "etc/hostname" in full and "lost+found" in full
    assert "etc/hostname" not in diff and "lost+found" not in diff    # scratch's own, unchanged
    assert "files/big" in diff and "files/big" in full


def test_child_against_base_holds_only_the_changes(mnt):
    names = tar_names(read(image_path(mnt, "child", "export", "base.tar")))
    assert "files/.wh.exec" in names and "files/small" in names and "newdir/f" in names
    assert "files/empty" not in names and "bin/id" not in names


def test_cp_copies_the_whole_stream_despite_size_0(mnt, tmp_path):
    src = whole(mnt, "child")
    assert os.stat(src).st_size == 0
    subprocess.run(["cp", src, tmp_path / "x.tar"], check=True)
    assert file_sha256(tmp_path / "x.tar") == file_sha256(src)
    assert os.path.getsize(tmp_path / "x.tar") > BIG


@pytest.mark.parametrize("tool", [["tar", "-tvf"], ["bsdtar", "-tvf"]])
def test_tar_tools_list_it(mnt, tool):
    out = subprocess.run(tool + [whole(mnt, "child")],
                         check=True, capture_output=True, text=True).stdout
    assert "files/big" in out and "dev/sda" in out and "files/added" in out


@pytest.mark.parametrize("tool", [["tar", "--xattrs", "--xattrs-include=*", "-xpf"],
                                  ["bsdtar", "--xattrs", "-xpf"]])
def test_tar_extracts_the_image_from_the_mount(mnt, tmp_path, tool):
    subprocess.run(tool + [whole(mnt, "child"), "-C", tmp_path], check=True)
    ours = dump(tmp_path, times=False, blocks=False, dir_sizes=False)
    image = dump(image_path(mnt, "child", "rootfs"), times=False, blocks=False, dir_sizes=False)
    for entries in (ours, image):    # directory mtimes are the extraction's
        for e in entries.values():
            if stat.S_ISDIR(e["mode"]):
                del e["mtime"]
    assert ours == image


def test_python_tarfile_reads_it(mnt):
    path = whole(mnt, "child")
    with tarfile.open(path) as tf:               # probes compressions, seeks back within the window
        big = [tf.extractfile(m).read() for m in tf if m.name == "files/big"]
    assert len(big[0]) == BIG
    with tarfile.open(path, "r|") as tf:
        assert "files/added" in [m.name for m in tf]


def test_seeking_back_beyond_the_window_is_an_error(mnt, store):
    want = expected(store, "child", None)
    with open(whole(mnt, "child"), "rb", buffering=0) as f:
        assert f.read(1000) == want[:1000]
        f.seek(100)                               # within the window: right bytes
        assert f.read(100) == want[100:200]
        f.seek(3 << 20)                           # forward: skipped
        assert f.read(10) == want[3 << 20: (3 << 20) + 10]
        f.seek(0)
        with pytest.raises(OSError) as e:
            f.read(10)
        assert e.value.errno == errno.ESPIPE


def test_filter_options_and_headers_only(mnt, store):
    options = ",include=files%2Fbig,exclude=files,exclude=dev,rebase=r,strip="
    spec = FilterSpec(inclusions={"files/big"}, exclusions={"files", "dev"}, rebase="r", strip="")
    got = read(whole(mnt, "child", options))
    assert got == expected(store, "child", None, spec=spec)
    assert read(image_path(mnt, "child", "export", f"scratch{options}.tar")) == expected(
        store, "child", "scratch", spec=spec)
    names = tar_names(got)
    assert "r/files/big" in names and "r/files/small" not in names and "r/dev/null" not in names
    headers = read(image_path(mnt, "child", "export", "base,headers.tar"))
    assert headers == expected(store, "child", "base", data=False)
    with tarfile.open(fileobj=io.BytesIO(headers)) as tf:
        members = {m.name: m for m in tf}
    assert all(m.size == 0 for m in members.values())
    assert members["files/small"].pax_headers.get("SCHILY.xattr.change_type") == "C"


def test_bad_export_names(mnt):
    export = image_path(mnt, "child", "export")
    with pytest.raises(FileNotFoundError):
        open(f"{export}/idl.tar", "rb")          # not an ancestor
    with pytest.raises(FileNotFoundError):
        open(f"{export}/base.zip", "rb")
    with pytest.raises(OSError) as e:
        open(f"{export}/base,colour=red.tar", "rb")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(FileNotFoundError):
        open(image_path(mnt, "scratch", "export", "scratch.tar"), "rb")    # scratch has no ancestors
    with pytest.raises(FileNotFoundError):
        open(image_path(mnt, "child", "rootfs,.zip"), "rb")
    with pytest.raises(OSError) as e:
        open(whole(mnt, "child", ",colour=red"), "rb")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        open(f"{export}/base.tar", "wb")
    assert e.value.errno in (errno.EROFS, errno.EACCES)


def test_other_reads_flow_while_an_export_is_read_slowly(mnt):
    stop = threading.Event()

    def slow_reader():
        with open(whole(mnt, "child"), "rb", buffering=0) as f:
            while not stop.is_set() and f.read(4096):
                time.sleep(0.01)

    t = threading.Thread(target=slow_reader)
    t.start()
    try:
        time.sleep(0.2)
        start = time.monotonic()
        walked = dump(image_path(mnt, "base", "rootfs"))
        assert len(walked) > 30 and time.monotonic() - start < 5
        assert t.is_alive()                      # the export was still being read meanwhile
    finally:
        stop.set()
        t.join()
