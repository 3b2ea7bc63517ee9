"""The image-store API against a real local datastore: VIC's store tests and the bad inputs."""
import io
import os
import re
import stat
import subprocess
import threading

import pytest

from imagefs.datastore import open_datastore
from imagefs.errors import CorruptDisk, Exists, InUse, InvalidInput, NotFound, SumMismatch
from imagefs.store import ImageStore

from fuse_fixtures import wait_for
from helpers import EMPTY_SUM, flattened_mount, make_tar, run, sha256

SMALL = "256MiB"


@pytest.fixture
def ds_root(backend):
    return backend.root


@pytest.fixture
def ds_spec(backend):
    return backend.spec


@pytest.fixture
def st(ds_spec):
    st = ImageStore(open_datastore(ds_spec))
    yield st
    st.ds.close()


@pytest.fixture
def store(st):
    st.create_store("s", capacity=SMALL)
    return "s"


def layer_tar(n):
    return make_tar([(f"dir{n}", "dir", {"mode": 0o777}),
                     *[(f"dir{n}/file{i}.txt", "file", {"data": f"layer {n} file {i}\n".encode(), "mode": 0o777})
                       for i in range(3)]])


def write(st, store, parent, image_id, data=b"", **kw):
    return st.write_image(store, parent, image_id, io.BytesIO(data), **kw)[0]


# --- stores -----------------------------------------------------------------------------------
def test_create_and_get_store(st):
    assert st.create_store("s1", capacity=SMALL) == "s1"
    assert st.get_store("s1") == "s1"
    with pytest.raises(NotFound):
        st.get_store("s1garbage")
    with pytest.raises(Exists):
        st.create_store("s1", capacity=SMALL)


def test_list_stores(st):
    for name in ("a", "b", "c"):
        st.create_store(name, capacity=SMALL)
    assert st.list_stores() == ["a", "b", "c"]


def test_scratch_skeleton_exact(st, ds_root):
    old = os.umask(0o077)   # the skeleton's modes must not depend on the umask
    try:
        st.create_store("s")
    finally:
        os.umask(old)
    tree = st.tree("s", "scratch")
    assert tree.label == "containerfs"
    assert tree.chain.size == 8_000_000_000 - 8_000_000_000 % (1 << 20)
    found = {p.decode(): (stat.S_IFMT(s.mode), stat.S_IMODE(s.mode), s.size, s.uid, s.gid)
             for p, s in tree.walk()}
    d, f, ln = stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK
    expected = {
        "/etc": (d, 0o755), "/lib": (d, 0o755), "/lib/modules": (d, 0o755), "/proc": (d, 0o555),
        "/sys": (d, 0o555), "/run": (d, 0o755), "/.tether": (d, 0o777), "/lost+found": (d, 0o700),
        "/etc/hostname": (f, 0o644), "/etc/hosts": (f, 0o644), "/etc/resolv.conf": (f, 0o644),
        "/etc/mtab": (ln, 0o777),
    }
    assert {k: v[:2] for k, v in found.items()} == expected
    assert all(v[3:] == (0, 0) for v in found.values())
    assert all(found[p][2] == 0 for p in ("/etc/hostname", "/etc/hosts", "/etc/resolv.conf"))
    assert tree.readlink(tree.resolve("/etc/mtab")) == b"/proc/mounts"
    disk = os.path.join(ds_root, "VIC/s/images/scratch/scratch.vmdk")
    assert os.path.exists(os.path.join(ds_root, "VIC/s/images/scratch/manifest"))
    assert os.path.isdir(os.path.join(ds_root, "VIC/s/images/scratch/imageMetadata"))
    run(["qemu-img", "check", disk])
    with flattened_mount(disk) as mnt:
        assert sorted(os.listdir(mnt)) == sorted(k.lstrip("/") for k in expected if k.count("/") == 1)
        assert stat.S_IMODE(os.stat(os.path.join(mnt, ".tether")).st_mode) == 0o777


def test_store_name_must_be_valid(st):
    for bad in ("", ".", "..", "a/b", "-x", "x" * 129):
        with pytest.raises(InvalidInput):
            st.create_store(bad)
    assert st.list_stores() == []


def test_delete_store_refused_while_it_holds_images(st, store):
    write(st, store, "scratch", "l1", make_tar([("a", "file", {"data": b"x"})]))
    with pytest.raises(InUse):
        st.delete_store(store)
    st.delete_store(store, force=True)
    assert st.list_stores() == []
    st.create_store("t", capacity=SMALL)
    st.delete_store("t")    # only scratch: no force needed
    with pytest.raises(NotFound):
        st.get_store("t")


def test_deleting_a_store_another_process_just_deleted_says_not_found(st, ds_spec):
    """Found by the 60-second soak: two `store rm` of one store at once. The second passed its
    check that the store exists, the first then removed it, and the second failed with
    "VIC/t/images: no such directory" instead of saying the store is not there."""
    other = ImageStore(open_datastore(ds_spec))
    st.create_store("t", capacity=SMALL)
    real_image_ids = st._image_ids

    def image_ids(store):               # the other deleter wins between the check and the walk
        other.delete_store(store)
        return real_image_ids(store)

    st._image_ids = image_ids
    with pytest.raises(NotFound, match="^image store t not found$"):
        st.delete_store("t")
    assert st.list_stores() == []
    other.ds.close()


def test_a_lock_waited_for_is_taken_on_the_file_there_now(tmp_path):
    """A store delete waiting for the store's lock while the store was deleted and made again
    got the lock of the deleted file, and excluded nobody from the new store."""
    ds = open_datastore(str(tmp_path))
    ds.mkdir("VIC/t", parents=True)
    lock_file = tmp_path / "VIC" / "t" / ".lock"
    held, release, waiter_got = threading.Event(), threading.Event(), []

    def waiter():
        with ds.lock("VIC/t/.lock") as got:
            waiter_got.append(got)
            held.set()
            release.wait(30)

    with ds.lock("VIC/t/.lock"):
        thread = threading.Thread(target=waiter)
        thread.start()
        assert wait_for(_someone_waits_on(lock_file), timeout=30)     # blocked on the old file's lock
        ds.rmtree("VIC/t")
        ds.mkdir("VIC/t")
    try:
        assert held.wait(30) and waiter_got == [True]
        with ds.lock("VIC/t/.lock", blocking=False) as other:
            assert other is False                       # the waiter holds the new file's lock
    finally:
        release.set()
        thread.join(30)


def test_a_lock_waited_for_in_a_directory_deleted_meanwhile_says_it_is_gone(tmp_path):
    """Two deletes of one store at once: the second waits for the store's lock, the first
    removes the store, lock file and all. The second then says the store's directory is
    gone (NotFound), not a bare "No such file or directory" (found by the 60-s soak)."""
    ds = open_datastore(str(tmp_path))
    ds.mkdir("VIC/t", parents=True)
    failed = []

    def waiter():
        try:
            with ds.lock("VIC/t/.lock"):
                pass
        except Exception as e:          # noqa: B902 - what the waiter met is the result
            failed.append(e)

    with ds.lock("VIC/t/.lock"):
        thread = threading.Thread(target=waiter)
        thread.start()
        assert wait_for(_someone_waits_on(tmp_path / "VIC" / "t" / ".lock"), timeout=30)
        ds.rmtree("VIC/t")
    thread.join(30)
    assert len(failed) == 1 and isinstance(failed[0], NotFound), failed
    assert str(failed[0]) == "VIC/t: no such directory"


def test_a_write_waiting_for_a_parent_deleted_meanwhile_says_the_parent_is_gone(tmp_path):
    """A child's write waits (shared) on the lock its parent's delete holds; the delete
    removes the parent's directory, lock file and all: the write reports the parent gone
    (the soak once got a bare ``.children.lock: No such file or directory``)."""
    st = ImageStore(open_datastore(str(tmp_path / "ds")))
    st.create_store("s", capacity=SMALL)
    write(st, "s", "scratch", "p", layer_tar(1))
    lock_file = tmp_path / "ds" / "VIC" / "s" / "images" / "p" / ".children.lock"
    outcome = []

    def child():
        try:
            write(st, "s", "p", "c", layer_tar(2))
        except Exception as e:          # noqa: BLE001 - the outcome is what is checked
            outcome.append(e)

    with st.ds.lock("VIC/s/images/p/.children.lock"):       # what delete_image holds
        thread = threading.Thread(target=child)
        thread.start()
        assert wait_for(_someone_waits_on(lock_file), timeout=60)
        st.ds.rmtree("VIC/s/images/p")
    thread.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], NotFound), outcome
    assert str(outcome[0]) == "parent image p not found in store s"
    st.ds.close()


def _someone_waits_on(lock_file):
    """A check: does a process wait for a flock on ``lock_file`` (a "->" line of /proc/locks)?"""
    dev_ino = f":{os.stat(lock_file).st_ino} "

    def waiting():
        with open("/proc/locks") as f:
            return any("->" in line and dev_ino in line for line in f)
    return waiting


# --- images -----------------------------------------------------------------------------------
def test_a_catalogue_walked_before_a_delete_by_the_same_object_is_not_kept(ds_spec):
    """A mount (catalogue kept a second) builds its catalogue in one thread while another
    thread deletes an image: the walk, made before the delete, must not be kept after it,
    or the deleted image is still answered for (and may be taken for one made again)."""
    st = ImageStore(open_datastore(ds_spec), catalogue_ttl=60)
    st.create_store("s", capacity=SMALL)
    write(st, "s", "scratch", "x", make_tar([("f", "file", {"data": b"x"})]))
    st._changed("s")                                # the next look walks the store anew
    real_walk = st._walk_images

    def walk_then_delete(store):        # the other thread's delete lands while this one builds
        names = real_walk(store)
        st._walk_images = real_walk
        st.delete_image(store, "x")
        return names

    st._walk_images = walk_then_delete
    assert "x" in st.catalogue("s").images          # what the walk saw, given to its caller
    with pytest.raises(NotFound):
        st.get_image("s", "x")
    assert [i.id for i in st.list_images("s")] == ["scratch"]
    st.ds.close()


def test_create_image_layers(st, store, ds_root):
    """VIC TestCreateImageLayers: 4 chained layers with metadata and sums."""
    with pytest.raises(NotFound):
        st.get_image(store, "garbage")
    parent = "scratch"
    for n in range(1, 5):
        data = layer_tar(n)
        meta = {f"key{k}": f"value {n}.{k}".encode() for k in range(3)}
        img = write(st, store, parent, f"layer{n}", data, metadata=meta, expected_sum=sha256(data))
        assert img.parent == parent
        got = st.get_image(store, f"layer{n}")
        assert got == img
        assert st.metadata(store, f"layer{n}") == meta
        parent = f"layer{n}"
    assert [i.id for i in st.list_images(store, include_scratch=False)] == [f"layer{n}" for n in range(1, 5)]
    assert st.ancestors(store, "layer4") == ["layer3", "layer2", "layer1", "scratch"]
    tree = st.tree(store, "layer4")
    names = sorted(p.decode() for p, _ in tree.walk())
    for n in range(1, 5):
        for i in range(3):
            path = f"/dir{n}/file{i}.txt"
            assert path in names
            ino = tree.resolve(path)
            assert tree.read(ino, 0, 100) == f"layer {n} file {i}\n".encode()
            assert stat.S_IMODE(tree.stat(ino).mode) == 0o777
    with pytest.raises(InUse):
        st.delete_image(store, "layer2")
    st.delete_image(store, "layer4")
    with pytest.raises(NotFound):
        st.get_image(store, "layer4")
    assert not os.path.exists(os.path.join(ds_root, "VIC/s/images/layer4"))


def test_broken_pull_then_retry(st, store):
    """VIC TestBrokenPull: a failed write leaves nothing; the same ID works afterwards."""
    with pytest.raises(InvalidInput):
        write(st, store, "scratch", "img", b"", expected_sum="bogusSum")
    with pytest.raises(SumMismatch):
        write(st, store, "scratch", "img", layer_tar(1), expected_sum=sha256(b"other"))
    assert st.ds.listdir("VIC/s/images") == ["scratch"]
    img = write(st, store, "scratch", "img", b"", expected_sum=EMPTY_SUM)
    assert img.id == "img"


def test_parallel_writes(st, store):
    """VIC TestParallel: 10 concurrent children of scratch, empty streams."""
    errors = []

    def one(i):
        try:
            write(st, store, "scratch", f"p{i}", b"", expected_sum=EMPTY_SUM)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(i.id for i in st.list_images(store, include_scratch=False)) == sorted(f"p{i}" for i in range(10))


def test_existing_id_is_an_error(st, store):
    write(st, store, "scratch", "x", layer_tar(1))
    with pytest.raises(Exists):
        write(st, store, "scratch", "x", layer_tar(2))
    assert st.tree(store, "x").resolve("/dir1/file0.txt")


def test_in_progress_cleanup(st, store, ds_root, ds_spec):
    """VIC TestInProgressCleanup: an image without manifest is removed when the store is opened."""
    write(st, store, "scratch", "half", layer_tar(1))
    os.unlink(os.path.join(ds_root, "VIC/s/images/half/manifest"))
    with pytest.raises(NotFound):
        st.get_image(store, "half")
    fresh = ImageStore(open_datastore(ds_spec))
    fresh.get_store(store)
    assert [i.id for i in fresh.list_images(store)] == ["scratch"]
    assert not os.path.exists(os.path.join(ds_root, "VIC/s/images/half"))
    write(fresh, store, "scratch", "half", layer_tar(1))   # the ID is free again


def test_cleanup_never_removes_scratch(st, store, ds_root, ds_spec):
    os.unlink(os.path.join(ds_root, "VIC/s/images/scratch/manifest"))
    fresh = ImageStore(open_datastore(ds_spec))
    fresh.get_store(store)
    assert os.path.exists(os.path.join(ds_root, "VIC/s/images/scratch/scratch.vmdk"))


def test_unknown_parent_and_invalid_ids(st, store):
    with pytest.raises(NotFound, match="parent image nope"):
        write(st, store, "nope", "x", layer_tar(1))
    for bad in ("", ".", "..", "a/b", "-x", ".hidden", "x" * 129, "sp ace"):
        with pytest.raises(InvalidInput):
            write(st, store, "scratch", bad, layer_tar(1))
    with pytest.raises(InvalidInput):
        write(st, store, "scratch", "scratch", b"")
    with pytest.raises(InvalidInput):
        write(st, store, "scratch", "m", b"", metadata={"../evil": b"x"})
    assert st.ds.listdir("VIC/s/images") == ["scratch"]


def test_bad_archive_leaves_nothing(st, store):
    good = layer_tar(1)
    for bad in (good[:700], b"this is not a tar archive at all" * 40,
                make_tar([("../escape", "file", {"data": b"x"})])):
        with pytest.raises(InvalidInput):
            write(st, store, "scratch", "bad", bad)
        assert st.ds.listdir("VIC/s/images") == ["scratch"]


def test_delete_scratch_refused_and_branch(st, store):
    with pytest.raises(InUse):
        st.delete_image(store, "scratch")
    # VIC TestDeleteBranch: scratch -> 1,2,3 -> 10,20,30 -> 100,200,300,301
    for p, kids in (("scratch", ["1", "2", "3"]), ("1", ["10"]), ("2", ["20"]), ("3", ["30"]),
                    ("10", ["100"]), ("20", ["200"]), ("30", ["300", "301"])):
        for k in kids:
            write(st, store, p, k, b"", expected_sum=EMPTY_SUM)
    with pytest.raises(InUse):
        st.delete_branch(store, "1")
    assert len(st.list_images(store, include_scratch=False)) == 10
    assert st.delete_branch(store, "100") == ["100", "10", "1"]
    assert st.delete_branch(store, "300") == ["300"]
    assert st.delete_branch(store, "200", keep=["2"]) == ["200", "20"]
    assert sorted(i.id for i in st.list_images(store, include_scratch=False)) == ["2", "3", "30", "301"]


def test_usage_and_url(st, store):
    assert st.usage(store) == 0
    write(st, store, "scratch", "a", make_tar([("big", "file", {"data": os.urandom(1 << 20)})]))
    write(st, store, "a", "b", layer_tar(1))
    ua, ub = st.layer_usage(store, "a"), st.layer_usage(store, "b")
    assert ua > (1 << 20) and ub > 0
    assert st.usage(store) == ua + ub
    write(st, store, "scratch", "scratch2", layer_tar(2))              # only scratch itself is left out
    write(st, store, "scratch2", "scratchpad", layer_tar(3))
    assert st.usage(store) == ua + ub + st.layer_usage(store, "scratch2") + st.layer_usage(store, "scratchpad")
    prefix = "[local] " if st.ds.name == "local" else f"[LocalDS_0] {st.ds.location.path}/"
    assert st.datastore_path(store, "a") == f"{prefix}VIC/s/images/a/a.vmdk"
    from urllib.parse import quote
    assert st.url(store, "a") == "ds://" + quote(f"{prefix}VIC/s/images/a/a.vmdk", safe="/")


def test_join_owners_and_in_use(st, store, ds_root):
    write(st, store, "scratch", "img", layer_tar(1))
    c = st.join(store, "img", "c1")
    assert c.disk == "c1/c1.vmdk"
    assert os.path.exists(os.path.join(ds_root, "c1/c1.vmdk"))
    assert st.owners(store, "img") == ["c1"]
    with pytest.raises(InUse, match="c1"):
        st.delete_image(store, "img")
    with pytest.raises(Exists):
        st.join(store, "img", "c1")
    with pytest.raises(InUse):
        st.delete_store(store, force=True)
    st.remove_container("c1")
    assert st.owners(store, "img") == []
    st.delete_image(store, "img")


def test_container_tree_reads_through_the_image(st, store):
    write(st, store, "scratch", "img", layer_tar(7))
    st.join(store, "img", "c7")
    tree = st.container_tree("c7")
    assert tree.read(tree.resolve("/dir7/file2.txt"), 0, 64) == b"layer 7 file 2\n"


# --- corrupt disks --------------------------------------------------------------------------------
def test_modified_parent_breaks_the_chain(st, store, ds_root, ds_spec):
    write(st, store, "scratch", "a", layer_tar(1))
    write(st, store, "a", "b", layer_tar(2))
    parent = os.path.join(ds_root, "VIC/s/images/a/a.vmdk")
    # writing to the parent gives it a new CID: b no longer matches it
    if st.disk_format(store) == "monolithicSparse":
        run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x55 0 512", parent])
    else:   # qemu does not write seSparse: change the CID as a writer would
        with open(parent) as f:
            text = f.read()
        with open(parent, "w") as f:
            f.write(re.sub(r"\nCID=[0-9a-f]+\n", "\nCID=0badcafe\n", text))
    fresh = ImageStore(open_datastore(ds_spec))
    with pytest.raises(CorruptDisk, match=r"VIC/s/images/b/b\.vmdk: parentCID .* does not match"):
        fresh.tree(store, "b")


def test_garbage_disk_is_corrupt_not_a_crash(st, store, ds_root, ds_spec):
    write(st, store, "scratch", "a", layer_tar(1))
    disk = os.path.join(ds_root, "VIC/s/images/a/a.vmdk")
    with open(disk, "r+b") as f:
        f.write(b"garbage!" * 64)
    with pytest.raises(CorruptDisk, match="a.vmdk"):
        ImageStore(open_datastore(ds_spec)).tree(store, "a")


def test_missing_parent_disk_is_corrupt(st, store, ds_root, ds_spec):
    write(st, store, "scratch", "a", layer_tar(1))
    write(st, store, "a", "b", layer_tar(2))
    os.rename(os.path.join(ds_root, "VIC/s/images/a/a.vmdk"), os.path.join(ds_root, "VIC/s/images/a/x.vmdk"))
    with pytest.raises(CorruptDisk, match="missing"):
        ImageStore(open_datastore(ds_spec)).tree(store, "b")


# --- the read API against the kernel's reading of the same chain ------------------------------------
def test_read_api_matches_kernel(st, store, ds_root):
    entries = [
        ("etc/app", "dir", {"mode": 0o750, "uid": 1000, "gid": 50, "mtime": 1700000001}),
        ("etc/app/conf", "file", {"data": b"k=v\n" * 1000, "uid": 4242, "gid": 4343, "mode": 0o4755,
                                  "xattrs": {"user.k": "v", "security.capability": "\x01\x00\x00\x02" + "\x00" * 16}}),
        ("etc/app/link", "link", {"target": "etc/app/conf"}),
        ("etc/app/sym", "symlink", {"target": "../../" + "x" * 100}),
        ("tmp", "dir", {"mode": 0o1777}),
        ("dev/null2", "chr", {"major": 1, "minor": 3}),
        ("dev/sda9", "blk", {"major": 300, "minor": 70000}),
        ("run/fifo", "fifo", {}),
    ]
    write(st, store, "scratch", "a", make_tar(entries))
    tree = st.tree(store, "a")
    with flattened_mount(os.path.join(ds_root, "VIC/s/images/a/a.vmdk")) as mnt:
        for path, s in tree.walk():
            k = os.lstat(mnt + path.decode())
            assert (s.ino, s.mode, s.uid, s.gid, s.nlink, s.rdev) == \
                   (k.st_ino, k.st_mode, k.st_uid, k.st_gid, k.st_nlink, k.st_rdev), path
            assert (s.mtime_ns, s.ctime_ns) == (k.st_mtime_ns, k.st_ctime_ns), path
            if not stat.S_ISDIR(s.mode):
                assert s.size == k.st_size and s.blocks == k.st_blocks, path
            if stat.S_ISREG(s.mode):
                with open(mnt + path.decode(), "rb") as f:
                    assert tree.read(s.ino, 0, s.size + 10) == f.read(), path
            if stat.S_ISLNK(s.mode):
                assert tree.readlink(s.ino) == os.readlink(mnt + path.decode()).encode()
            names = os.listxattr(mnt + path.decode(), follow_symlinks=False)
            assert sorted(n.encode() for n in names) == sorted(tree.xattrs(s.ino)), path
            for n in names:
                assert tree.xattrs(s.ino)[n.encode()] == os.getxattr(mnt + path.decode(), n, follow_symlinks=False)
            if stat.S_ISDIR(s.mode):
                assert sorted(os.listdir(mnt + path.decode())) == \
                       sorted(n.decode() for n, _ in tree.readdir(s.ino))
    conf = tree.stat(tree.resolve("/etc/app/conf"))
    assert conf.nlink == 2 and tree.resolve("/etc/app/link") == conf.ino
    assert os.major(tree.stat(tree.resolve("/dev/sda9")).rdev) == 300
    assert os.minor(tree.stat(tree.resolve("/dev/sda9")).rdev) == 70000


def test_written_layers_pass_fsck_and_qemu_check(st, store, ds_root):
    write(st, store, "scratch", "a", layer_tar(1))
    write(st, store, "a", "b", make_tar([(".wh.dir1", "file", {})]))
    disk = os.path.join(ds_root, "VIC/s/images/b/b.vmdk")
    run(["qemu-img", "check", disk])
    with flattened_mount(disk) as mnt:
        assert not os.path.exists(os.path.join(mnt, "dir1"))
    raw = os.path.join(ds_root, "flat.raw")
    run(["qemu-img", "convert", "-O", "raw", disk, raw])
    assert subprocess.run(["e2fsck", "-fn", raw], capture_output=True).returncode == 0


def test_tree_cache_follows_a_recreated_image(st, store, ds_root, ds_spec):
    """Another process deletes an image and writes a new one under the same ID."""
    write(st, store, "scratch", "x", layer_tar(1))
    assert st.tree(store, "x").resolve("/dir1")
    other = ImageStore(open_datastore(ds_spec))
    other.delete_image(store, "x")
    write(other, store, "scratch", "x", layer_tar(2))
    tree = st.tree(store, "x")
    assert tree.resolve("/dir2")
    with pytest.raises(NotFound):
        tree.resolve("/dir1")
