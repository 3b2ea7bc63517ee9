"""The mount's namespace driven directly, with no mount: what each inode number stands
for, what nodes answer, the one invalidation rule, the cache's bound."""
import errno
import io
import json
import os
import shutil

import pytest
import trio

from imagefs.datastore import open_datastore
from imagefs.errors import CorruptDisk, NotFound, ReadOnly
from imagefs.fuse.errors import IsADirectory, PermissionDenied
from imagefs.fuse.imports import ImportRegistry
from imagefs.fuse.inodes import ROOT_INO, is_tree_ino, split_tree_ino, tree_ino
from imagefs.fuse import namespace
from imagefs.fuse.namespace import Namespace, TreeClosed
from imagefs.fuse.nodes import LONG, TreeNode
from imagefs.store import ImageStore
from imagefs.tree import ROOT_INO as EXT4_ROOT

from fuse_fixtures import BIG, STORE, datastore  # noqa: F401 (fixture)
from helpers import make_tar


def make_ns(ds_root, **kw):
    store = ImageStore(open_datastore(ds_root))
    return Namespace(store, ImportRegistry(store), scratch_capacity=1 << 28, pid=os.getpid(),
                     uid=os.getuid(), gid=os.getgid(), **kw)


@pytest.fixture
def ns(datastore):  # noqa: F811
    ns = make_ns(datastore)
    yield ns
    ns.close()


def walk(ns, *names):
    """The Entry at ``names`` below the root, looked up one name at a time."""
    entry = ns.resolve(ROOT_INO).getattr(ns)
    for name in names:
        entry = ns.resolve(entry.ino).lookup(ns, name.encode())
        assert entry is not None, name
    return entry


def test_an_image_tree_is_tree_inodes_of_its_image(ns):
    root = walk(ns, STORE, "images", "base", "rootfs")
    assert is_tree_ino(root.ino) and split_tree_ino(root.ino)[1] == EXT4_ROOT
    node = ns.resolve(root.ino)
    assert isinstance(node, TreeNode) and node.inline
    names = {name for name, _ in node.listdir(ns)}
    assert {b"files", b"links", b"dev", b"xattrs", b"modes", b"bin", b"fifo"} <= names
    small = walk(ns, STORE, "images", "base", "rootfs", "files", "small")
    idx, ext4_ino = split_tree_ino(small.ino)
    assert small.ino == tree_ino(idx, ext4_ino)
    assert (small.stat.size, small.stat.uid, small.stat.gid, small.entry_ttl) == (6, 1000, 50, LONG)


def test_listing_entries_carry_the_attributes_lookup_gives(ns):
    files = walk(ns, STORE, "images", "base", "rootfs", "files")
    listing = dict(ns.resolve(files.ino).listdir(ns))
    for name in (b"small", b"big", b"hardlink", b"sparse"):
        assert listing[name] == ns.resolve(files.ino).lookup(ns, name)
    assert listing[b"small"].ino == listing[b"hardlink"].ino    # hardlinks share one number


def test_images_have_their_own_inode_numbers(ns):
    base = walk(ns, STORE, "images", "base", "rootfs", "files", "big")
    child = walk(ns, STORE, "images", "child", "rootfs", "files", "big")
    assert base.stat.size == child.stat.size == BIG
    assert split_tree_ino(base.ino)[1] == split_tree_ino(child.ino)[1]     # same ext4 inode...
    assert base.ino != child.ino                                         # ...in two images
    assert walk(ns, STORE, "images", "base", "rootfs", "files", "big") == base   # and stable


def test_missing_names(ns):
    files = walk(ns, STORE, "images", "base", "rootfs", "files")
    assert ns.resolve(files.ino).lookup(ns, b"nope") is None
    assert ns.resolve(files.ino).negative_ttl == LONG               # an image never changes
    images = walk(ns, STORE, "images")
    assert ns.resolve(images.ino).lookup(ns, b"nope") is None
    assert ns.resolve(images.ino).negative_ttl == 0                 # images come and go
    with pytest.raises(NotFound):
        ns.resolve(tree_ino(999, EXT4_ROOT))


def test_nodes_open_what_they_are(ns):
    big = walk(ns, STORE, "images", "base", "rootfs", "files", "big")
    handle = ns.resolve(big.ino).open(ns, os.O_RDONLY)
    try:
        assert handle.keep_cache and not handle.direct_io
        data = trio.run(handle.read, 0, 256)
        assert data == bytes(range(256))
        assert ns.open_files(split_tree_ino(big.ino)[0]) == 1
    finally:
        handle.release()
    assert ns.open_files(split_tree_ino(big.ino)[0]) == 0
    with pytest.raises(ReadOnly):
        ns.resolve(big.ino).open(ns, os.O_WRONLY)
    files = walk(ns, STORE, "images", "base", "rootfs", "files")
    with pytest.raises(IsADirectory):
        ns.resolve(files.ino).open(ns, os.O_RDONLY)
    with pytest.raises(ReadOnly):
        ns.resolve(files.ino).mkdir(ns, b"x")
    link = walk(ns, STORE, "images", "base", "rootfs", "links", "slow")
    assert ns.resolve(link.ino).readlink(ns) == b"x" * 200
    cap = walk(ns, STORE, "images", "base", "rootfs", "xattrs", "file")
    assert ns.resolve(cap.ino).xattrs(ns)[b"user.plain"] == b"value"


def test_synthetic_files(ns):
    info = walk(ns, STORE, "images", "child", "info.json")
    handle = ns.resolve(info.ino).open(ns, os.O_RDONLY)
    assert handle.direct_io     # its size changes (children, owners, usage)
    facts = json.loads(trio.run(handle.read, 0, 1 << 20))
    assert (facts["id"], facts["parent"], facts["ancestors"]) == ("child", "base", ["base", "scratch"])
    parent = walk(ns, STORE, "images", "child", "parent")
    assert ns.resolve(parent.ino).readlink(ns) == b"../base"
    assert "child" in json.loads(trio.run(
        ns.resolve(walk(ns, STORE, "images", "base", "info.json").ino).open(ns, os.O_RDONLY).read,
        0, 1 << 20))["children"]


def test_import_files_are_write_only(ns):
    imports = walk(ns, STORE, "images", "base", "import")
    node = ns.resolve(imports.ino)
    _handle, entry = node.create(ns, b"new1", os.O_WRONLY)
    try:
        with pytest.raises(PermissionDenied) as e:
            ns.resolve(entry.ino).open(ns, os.O_RDONLY)
        assert e.value.errno == errno.EACCES
    finally:
        node.unlink(ns, b"new1")


def test_a_deleted_image_is_forgotten_and_made_anew_gets_new_numbers(datastore, tmp_path):  # noqa: F811
    ds = str(tmp_path / "ds")
    shutil.copytree(datastore, ds)
    ns = make_ns(ds)
    try:
        images = ns.resolve(walk(ns, STORE, "images").ino)
        old = walk(ns, STORE, "images", "idl", "rootfs", "bin", "id")
        images.rmdir(ns, b"idl")
        with pytest.raises(NotFound):
            ns.resolve(old.ino)                           # its inodes went with it
        assert images.lookup(ns, b"idl") is None
        # made again behind the mount's back: a new incarnation, with numbers of its own
        shutil.copytree(f"{datastore}/VIC/{STORE}/images/idl", f"{ds}/VIC/{STORE}/images/idl")
        new = walk(ns, STORE, "images", "idl", "rootfs", "bin", "id")
        assert new.ino != old.ino and new.stat == old.stat
        with pytest.raises(NotFound):
            ns.resolve(old.ino)
    finally:
        ns.close()


def test_a_deleted_image_leaves_no_nodes_behind(datastore, tmp_path):  # noqa: F811
    """Found by the concurrency soak's review: each image the mount saw kept its synthetic nodes
    (directory, exports, import files) for the life of the mount, deleted or not."""
    ds = str(tmp_path / "ds")
    shutil.copytree(datastore, ds)
    ns = make_ns(ds)
    try:
        images = ns.resolve(walk(ns, STORE, "images").ino)
        before = len(ns._nodes)
        image_dir = walk(ns, STORE, "images", "idl")
        for name, child in ns.resolve(image_dir.ino).listdir(ns):
            if name in (b"export", b"meta", b"import"):
                ns.resolve(child.ino).listdir(ns)
        seen = len(ns._nodes)
        assert seen > before + 4
        images.rmdir(ns, b"idl")
        assert len(ns._nodes) == before and len(ns._inos) == before
        with pytest.raises(NotFound):
            ns.resolve(image_dir.ino)
        walk(ns, STORE, "images", "base", "export")      # the other images keep theirs
        assert walk(ns, STORE, "images", "base").ino == walk(ns, STORE, "images", "base").ino
    finally:
        ns.close()


def test_the_cache_stays_within_its_budget(datastore):  # noqa: F811
    ns = make_ns(datastore, cache_budget=64 << 10)
    try:
        for image in ("base", "child", "idl", "scratch"):
            stack = [walk(ns, STORE, "images", image, "rootfs").ino]
            seen = 0
            while stack:
                node = ns.resolve(stack.pop())
                for _name, entry in node.listdir(ns):
                    seen += 1
                    assert ns.resolve(entry.ino).getattr(ns) == entry._replace(entry_ttl=LONG)
                    if entry.stat.is_dir:
                        stack.append(entry.ino)
            assert seen > 5
            assert ns.cache.cost <= 64 << 10
    finally:
        ns.close()


def test_trees_beyond_the_bound_close_and_open_again_from_the_cache(datastore, monkeypatch):  # noqa: F811
    monkeypatch.setattr(namespace, "MAX_TREES", 2)
    ns = make_ns(datastore)
    try:
        small = walk(ns, STORE, "images", "base", "rootfs", "files", "small")
        for image in ("child", "idl", "scratch"):
            walk(ns, STORE, "images", image, "rootfs")
        assert ns.open_trees == 2
        with pytest.raises(TreeClosed):
            ns.resolve(small.ino)                   # the adapter reopens it in a worker thread
        cached = len(ns.cache)
        assert ns.resolve_here(small.ino).getattr(ns) == small
        assert len(ns.cache) == cached              # answered from what the first tree read
        handle = ns.resolve(small.ino).open(ns, os.O_RDONLY)
        assert trio.run(handle.read, 0, 100) == b"hello\n"
        handle.release()
    finally:
        ns.close()


def test_a_closed_tree_of_an_image_made_again_meanwhile_is_gone(datastore, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(namespace, "MAX_TREES", 1)
    ds = str(tmp_path / "ds")
    shutil.copytree(datastore, ds)
    ns = make_ns(ds)
    try:
        old = walk(ns, STORE, "images", "idl", "rootfs", "bin", "id")
        walk(ns, STORE, "images", "base", "rootfs")     # idl's tree closes
        other = ImageStore(open_datastore(ds))          # another process deletes idl and writes it again
        other.delete_image(STORE, "idl")
        other.write_image(STORE, "scratch", "idl", io.BytesIO(make_tar([("new", "file", {"data": b"new\n"})])))
        with pytest.raises(NotFound):
            ns.resolve_here(old.ino)
        with pytest.raises(NotFound):
            ns.resolve(old.ino)                         # forgotten for good
        new = walk(ns, STORE, "images", "idl", "rootfs", "new")
        assert new.ino != old.ino and new.stat.size == 4
    finally:
        ns.close()


def test_a_lookup_in_a_layer_file_replaced_meanwhile_fails_and_is_not_an_absent_name(datastore, tmp_path):  # noqa: F811
    """A name is absent (cached by the kernel for LONG) only when the directory was read;
    a layer file replaced while its image was in use makes the lookup fail instead (the
    pool's NotFound, which the disk's reads report as CorruptDisk today)."""
    ds = str(tmp_path / "ds")
    shutil.copytree(datastore, ds)
    ns = make_ns(ds, cache_budget=0)                    # every read goes to the layer files
    try:
        root = ns.resolve(walk(ns, STORE, "images", "idl", "rootfs").ino)
        ns.store.disks.max_open = 1                     # idl's layer files are closed, opened again at
        ns.store.disks.file(f"VIC/{STORE}/images/base/base.vmdk").pread(0, 1)    # their next read
        images = os.path.join(ds, "VIC", STORE, "images")
        for image in ("idl", "scratch"):                # same bytes, other files
            for name in os.listdir(os.path.join(images, image)):
                path = os.path.join(images, image, name)
                if os.path.isfile(path):
                    shutil.copy2(path, path + ".new")
                    os.replace(path + ".new", path)
        for name in (b"bin", b"no-such-name"):
            with pytest.raises((NotFound, CorruptDisk), match="replaced"):
                root.lookup(ns, name)
    finally:
        ns.close()
