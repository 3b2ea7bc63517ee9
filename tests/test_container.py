"""Container read-write layers: join, import with a filter spec (docker cp), export, refusal on images."""
import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile

import pytest

from imagefs.datastore import open_datastore
from imagefs.errors import InvalidInput, NotFound, ReadOnly
from imagefs.export import FilterSpec
from imagefs.store import ImageStore

from helpers import make_tar


@pytest.fixture
def st(backend):
    st = ImageStore(open_datastore(backend.spec))
    st.root = backend.root          # where the datastore's files are, to look at them directly
    st.create_store("s", capacity="256MiB")
    st.write_image("s", "scratch", "img", io.BytesIO(make_tar([("app", "dir", {}),
                                                                 ("app/main", "file", {"data": b"v1"})])))
    st.join("s", "img", "c1")
    yield st
    st.ds.close()


def host_path(st, path):
    return os.path.join(st.root, path)


def disk_sum(st, container_id):
    with open(host_path(st, f"{container_id}/{container_id}.vmdk"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def tar_names(chunks):
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
        return {m.name.rstrip("/"): m for m in tf.getmembers()}


def test_import_with_rebase_and_filters(st):
    data = make_tar([("index.html", "file", {"data": b"<html>", "uid": 33, "gid": 33, "mode": 0o640}),
                     ("private", "dir", {}), ("private/key", "file", {"data": b"secret"}),
                     ("private/keep", "file", {"data": b"kept"}),
                     (".wh.index.old", "file", {})])
    spec = FilterSpec(inclusions={"private/keep"}, exclusions={"private"}, rebase="srv/www")
    stats = st.container_import("c1", io.BytesIO(data), spec=spec)
    assert stats.entries >= 3
    tree = st.container_tree("c1")
    page = tree.stat(tree.resolve("/srv/www/index.html"))
    assert (page.uid, page.gid, stat.S_IMODE(page.mode)) == (33, 33, 0o640)
    assert tree.read(page.ino, 0, 100) == b"<html>"
    assert tree.read(tree.resolve("/srv/www/private/keep"), 0, 10) == b"kept"
    with pytest.raises(NotFound):
        tree.resolve("/srv/www/private/key")
    tree.resolve("/srv/www/.wh.index.old")          # docker cp: a plain file, not a whiteout
    assert tree.read(tree.resolve("/app/main"), 0, 10) == b"v1"   # the image shows through


def test_export_changes_and_whole_tree(st):
    st.container_import("c1", io.BytesIO(make_tar([("app/extra", "file", {"data": b"new"})])))
    changes = tar_names(st.container_export("c1", changes=True))
    assert set(changes) == {"app", "app/extra"}
    whole = tar_names(st.container_export("c1"))
    assert {"app/main", "app/extra", "etc/hostname"} <= set(whole)
    headers = tar_names(st.container_export("c1", changes=True, data=False))
    assert headers["app/extra"].pax_headers["SCHILY.xattr.change_type"] == "A"


def test_failed_import_changes_nothing(st):
    st.container_import("c1", io.BytesIO(make_tar([("first", "file", {"data": b"1"})])))
    before = disk_sum(st, "c1")
    bad = make_tar([("second", "file", {"data": b"2" * 5000}), ("../escape", "file", {"data": b"x"})])
    with pytest.raises(InvalidInput):
        st.container_import("c1", io.BytesIO(bad))
    assert disk_sum(st, "c1") == before
    assert not os.path.exists(host_path(st, "c1/c1.vmdk.import-backup"))
    with pytest.raises(NotFound):
        st.container_tree("c1").resolve("/second")


def test_sealed_images_refuse_imports(st):
    before = hashlib.sha256(open(host_path(st, "VIC/s/images/img/img.vmdk"), "rb").read()).hexdigest()
    with pytest.raises(ReadOnly, match="img in store s is sealed"):
        st.container_import("img", io.BytesIO(make_tar([("x", "file", {"data": b"x"})])))
    after = hashlib.sha256(open(host_path(st, "VIC/s/images/img/img.vmdk"), "rb").read()).hexdigest()
    assert before == after
    with pytest.raises(NotFound):
        st.container_import("nosuch", io.BytesIO(b""))


def test_container_cli(tmp_path, backend):
    ds = backend.spec

    def cli(*args, input=None):
        proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", ds, *args], input=input,
                              capture_output=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    cli("store", "create", "s", "--capacity", "256MiB")
    cli("image", "write", "s", "scratch", "img", input=make_tar([("a", "file", {"data": b"a"})]))
    assert cli("container", "join", "s", "img", "web") == b"web/web.vmdk\n"
    assert cli("container", "ls") == b"web s/img\n"
    cli("container", "cp", "web", "--rebase", "srv", input=make_tar([("b", "file", {"data": b"b"})]))
    out = tmp_path / "c.tar"
    cli("container", "export", "web", "--changes", "-o", str(out))
    with tarfile.open(out) as tf:
        assert tf.getnames() == ["srv", "srv/b"]
    proc = subprocess.run([sys.executable, "-m", "imagefs", "--datastore", ds, "container", "cp", "img"],
                          input=b"", capture_output=True)
    assert proc.returncode == 6 and b"sealed" in proc.stderr       # exit code 6: read-only
    cli("container", "rm", "web")
    assert cli("container", "ls") == b""
