"""The layer disks of a store are shared by all its chains, with bounded descriptors and
disks kept, and a file reopened after its descriptor went must be the same file; read-ahead
hints reach the layer files that hold a file's bytes, and a deep chain reads each layer's
grain tables in few reads."""
import collections
import gc
import io
import os
import shutil
import subprocess
import time

import pytest

from imagefs import ext4
from imagefs.datastore import open_datastore
from imagefs.datastore.local import LocalReadHandle
from imagefs.errors import NotFound
from imagefs.fuse import prefetch
from imagefs.store import ImageStore
from imagefs.vmdk import DiskChain

from helpers import make_tar

DEPTH = 12
DATA = os.urandom(3 << 20)      # spans many grains and a few grain tables


def _delta(root, image_id, parent):
    d = os.path.join(root, "VIC", "s", "images", image_id)
    os.makedirs(os.path.join(d, "imageMetadata"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", f"../{parent}/{parent}.vmdk", "-F", "vmdk",
                    os.path.join(d, f"{image_id}.vmdk")], check=True)
    open(os.path.join(d, "manifest"), "w").close()


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    """``base`` (a file of DATA) and d1..d12, each an empty delta over the one before."""
    root = str(tmp_path_factory.mktemp("pool") / "ds")
    st = ImageStore(open_datastore(root))
    st.create_store("s", capacity="64MiB")
    st.write_image("s", "scratch", "base", io.BytesIO(make_tar([("data", "file", {"data": DATA})])))
    parent = "base"
    for i in range(1, DEPTH + 1):
        _delta(root, f"d{i}", parent)
        parent = f"d{i}"
    return root


def open_files():
    """The files this process has descriptors open on."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def fds_into(root):
    return sum(path.startswith(root) for path in open_files())


def read_data(tree):
    return tree.read(tree.resolve("/data"), 0, len(DATA))


def test_chains_share_their_disks(chained):
    st = ImageStore(open_datastore(chained))
    top, mid = st.tree("s", f"d{DEPTH}"), st.tree("s", "d5")
    assert len(top.chain.layers) == DEPTH + 2           # d12..d1, base, scratch
    assert top.chain.layers[DEPTH - 5] is mid.chain.layers[0]
    assert all(a is b for a, b in zip(top.chain.layers[DEPTH - 5:], mid.chain.layers))
    assert read_data(top) == read_data(mid) == DATA


def test_descriptors_stay_bounded_and_reads_stay_right(chained):
    gc.collect()                # stores of other tests let go of their descriptors
    before = fds_into(chained)
    st = ImageStore(open_datastore(chained))
    st.disks.max_open = 3
    trees = [st.tree("s", f"d{i}") for i in range(1, DEPTH + 1)]
    for tree in trees + trees[::-1]:
        assert read_data(tree) == DATA
        assert fds_into(chained) - before <= 3
    assert st.disks.open_files <= 3


def test_disks_kept_are_bounded(chained):
    st = ImageStore(open_datastore(chained))
    st.disks.max_disks = 4
    for i in range(1, DEPTH + 1):
        assert read_data(st.tree("s", f"d{i}")) == DATA
        assert st.disks.kept_disks <= 4


@pytest.fixture
def leaf(chained):
    """A leaf image of its own over d12, removed afterwards."""
    d = os.path.join(chained, "VIC", "s", "images", "leaf")
    _delta(chained, "leaf", f"d{DEPTH}")
    yield os.path.join(d, "leaf.vmdk")
    shutil.rmtree(d)


LEAF = "VIC/s/images/leaf/leaf.vmdk"


def _evict_all(st):
    st.disks.max_open = 1
    st.disks.file("VIC/s/images/d1/d1.vmdk").pread(0, 1)     # another file takes the only slot


def test_a_file_replaced_meanwhile_is_not_read_as_the_old_one(chained, leaf):
    st = ImageStore(open_datastore(chained))
    old_disk = st.disks.disk(LEAF)
    pooled = st.disks.file(LEAF)
    head = pooled.pread(0, 4096)
    _evict_all(st)
    shutil.copy(leaf, leaf + ".new")            # same bytes, another file
    os.replace(leaf + ".new", leaf)
    with pytest.raises(NotFound, match="replaced"):
        pooled.pread(0, 4096)
    assert st.disks.file(LEAF).pread(0, 4096) == head
    assert st.disks.disk(LEAF) is not old_disk
    assert read_data(st.tree("s", "leaf")) == DATA


def test_a_file_deleted_meanwhile_reads_as_not_found(chained, leaf):
    st = ImageStore(open_datastore(chained))
    pooled = st.disks.file(LEAF)
    pooled.pread(0, 4096)
    _evict_all(st)
    os.unlink(leaf)
    with pytest.raises(NotFound, match="deleted"):
        pooled.pread(0, 4096)


def test_a_kept_disk_is_shared_while_its_file_is_the_same(chained, leaf):
    st = ImageStore(open_datastore(chained))
    disk = st.disks.disk(LEAF)
    _evict_all(st)
    assert st.disks.disk(LEAF) is disk
    assert read_data(st.tree("s", "leaf")) == DATA


def test_forgetting_an_image_lets_go_of_its_files(chained, leaf):
    st = ImageStore(open_datastore(chained))
    assert read_data(st.tree("s", "leaf")) == DATA
    before = st.disks.kept_disks
    assert leaf in open_files()
    st.forget_image_files("s", "leaf")
    assert st.disks.kept_disks == before - 1
    assert leaf not in open_files()


def resident(path):
    """Bytes of ``path`` in the page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def wait_resident(path, at_least, timeout=10.0):
    deadline = time.monotonic() + timeout
    while resident(path) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return resident(path)


def test_advice_on_a_file_reads_its_layer_file_ahead(chained):
    """The bytes of /data live in base's delta, below 5 empty layers: advising the file
    must bring exactly those parts of base.vmdk into memory."""
    st = ImageStore(open_datastore(chained))
    tree = st.tree("s", "d5")
    ino = tree.resolve("/data")
    base = os.path.join(chained, "VIC", "s", "images", "base", "base.vmdk")
    evict(base)
    assert resident(base) < len(DATA) // 4
    tree.advise(ino, 0, len(DATA))
    assert wait_resident(base, len(DATA)) >= len(DATA)


def test_a_sequential_reader_gets_the_layer_file_read_ahead(chained, monkeypatch):
    monkeypatch.setattr(prefetch, "WINDOW", 512 << 10)
    st = ImageStore(open_datastore(chained))
    tree = st.tree("s", "d5")
    ino = tree.resolve("/data")
    base = os.path.join(chained, "VIC", "s", "images", "base", "base.vmdk")
    evict(base)
    pf = prefetch.Prefetcher()
    try:
        data = tree.read(ino, 0, 64 << 10)      # a reader at the start of the file
        assert resident(base) < len(DATA) // 4
        pf.after_read(1 << 40, tree, ino, len(DATA), 0, len(data))
        # the rest of its window and the next AHEAD windows (512 KiB each) are read ahead
        # from base.vmdk: the reader's next requests find them in memory
        want = (1 + prefetch.AHEAD) * (512 << 10)
        assert want <= len(DATA)
        assert wait_resident(base, want) >= want
    finally:
        pf.close()


class CountingHandle:
    """A layer file whose preads are counted per path."""

    def __init__(self, root, path, counts):
        self._handle = LocalReadHandle(os.path.join(root, path))
        self._path, self._counts = path, counts

    def pread(self, offset, length):
        self._counts[self._path] += 1
        return self._handle.pread(offset, length)

    def close(self):
        self._handle.close()


def test_a_chain_reads_each_layers_grain_tables_in_few_reads(tmp_path):
    """qemu's deltas have a 2 KiB grain table per 32 MiB, laid out in order: mapping
    256 MiB through 3 empty deltas reads each layer's tables in one go (with its grain
    directory), not one read per table (8 here, 1,400 for a 200 MiB file at depth 128),
    and keeps none of those empty tables."""
    root = str(tmp_path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", os.path.join(root, "l0.vmdk"), "1G"], check=True)
    for i in range(1, 4):
        subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-b", f"l{i - 1}.vmdk", "-F", "vmdk",
                        os.path.join(root, f"l{i}.vmdk")], check=True)
    counts = collections.Counter()
    chain = DiskChain("l3.vmdk", lambda p: CountingHandle(root, p, counts))
    try:
        counts.clear()                                   # what opening read does not count
        chain.advise(0, 256 << 20)                       # maps 16 chunks of 16 MiB, reads no data
        assert chain.pread(100 << 20, 4096) == bytes(4096)
        assert sorted(counts) == [f"l{i}.vmdk" for i in range(4)]
        assert max(counts.values()) <= 2, counts         # the grain directory, then the tables
        # tables of holes only are kept as "all hole", not as arrays of zeros
        assert all(layer.extents[0].table(t) is None for layer in chain.layers for t in range(8))
    finally:
        chain.close()


def test_listing_a_directory_announces_the_blocks_of_its_subdirectories(tmp_path):
    """A walk lists a directory's subdirectories next: their blocks are announced to the
    layer files when the directory is listed, so that each is not one cold read after the
    other. Exactly their blocks: nothing of files, nothing of the directory itself."""
    st = ImageStore(open_datastore(str(tmp_path)))
    st.create_store("s", capacity="64MiB")
    members = [("top", "dir", {"mode": 0o755}), ("top/file", "file", {"data": b"x" * 10000})]
    for i in range(3):
        members.append((f"top/sub{i}", "dir", {"mode": 0o755}))
        members += [(f"top/sub{i}/entry-with-a-long-name-{j:04d}", "file", {"data": b""}) for j in range(150)]
    st.write_image("s", "scratch", "img", io.BytesIO(make_tar(members)))
    tree = st.tree("s", "img")
    announced = []
    real_advise = tree.geo.chain.advise
    tree.geo.chain.advise = lambda offset, length: (announced.append((offset, length)), real_advise(offset, length))

    names = dict(tree.entries(tree.resolve("/top")))
    bs = tree.block_size
    expected = set()
    for i in range(3):
        runs, _ = ext4.extent_map(tree.geo, tree._raw_inode(names[f"sub{i}".encode()].ino))
        expected |= {(pblk * bs, count * bs) for _lblk, pblk, count in runs}
    assert len(expected) >= 3 and sum(n for _, n in expected) >= 3 * 2 * bs     # 150 long names: 2+ blocks each
    assert set(announced) == expected


def test_an_image_whose_layer_file_was_deleted_meanwhile_reads_as_not_found(tmp_path):
    """The pool reads a layer file deleted meanwhile as NotFound; the disk and chain readers
    above it turned that into CorruptDisk (EIO through the mount, as for a broken disk).
    Found by the 60-s soak: an export of an image the CLI deleted meanwhile got EIO."""
    st = ImageStore(open_datastore(str(tmp_path)))
    st.create_store("s", capacity="64MiB")
    st.write_image("s", "scratch", "img", io.BytesIO(make_tar([("data", "file", {"data": DATA})])))
    tree = st.tree("s", "img")
    ino = tree.resolve("/data")
    st.disks.max_open = 1
    st.disks.file("VIC/s/images/scratch/scratch.vmdk").pread(0, 1)     # takes the only slot
    os.unlink(tmp_path / "VIC" / "s" / "images" / "img" / "img.vmdk")
    with pytest.raises(NotFound, match="deleted while its image was in use"):
        tree.read(ino, 0, len(DATA))
