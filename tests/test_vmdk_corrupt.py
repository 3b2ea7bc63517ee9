"""Damaged disks: every parser fails with one CorruptDisk line naming a file, never with
another exception, whatever bytes its headers, descriptors and tables hold."""
import os
import random
import shutil

import pytest

from imagefs.errors import CorruptDisk
from imagefs.datastore.local import LocalReadHandle
from imagefs.vmdk import DiskChain
from vmdk_fixtures import MiB, chain, make_base, make_child, make_raw, set_value

SIZE = 4 * MiB


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """One small chain per format: base -> child; returns {name: (root, top rel path, files)}."""
    out = {}
    base = tmp_path_factory.mktemp("corrupt")
    raw = str(base / "raw")
    make_raw(raw, SIZE, 7, [(0, MiB), (2 * MiB + 512, 300_000)])
    for fmt in ("monolithicSparse", "streamOptimized", "monolithicFlat", "vmfsSparse", "seSparse"):
        root = str(base / fmt)
        if fmt in ("vmfsSparse", "seSparse"):
            b = make_base(root, "base", "vmfs", raw)
            top = make_child(root, b, "child", fmt, [(4096, 70_000), (SIZE - 4096, 4096)], seed=3)
        else:
            top = make_base(root, "base", fmt, raw)
        files = sorted(os.path.join(dp, n) for dp, _, ns in os.walk(root) for n in ns if "flat" not in n)
        out[fmt] = (root, top, files)
    return out


def _read_all(root, top):
    c = chain(root, top)
    try:
        for pos in range(0, c.size, MiB):
            c.pread(pos, MiB)
    finally:
        c.close()


@pytest.mark.parametrize("fmt", ["monolithicSparse", "streamOptimized", "monolithicFlat", "vmfsSparse",
                                 "seSparse"])
def test_mutated_metadata_gives_corrupt_disk_or_reads(tmp_path, disks, fmt):
    src_root, top, files = disks[fmt]
    rnd = random.Random(fmt)
    for trial in range(100):
        root = str(tmp_path / f"t{trial}")
        shutil.copytree(src_root, root)
        victim = os.path.join(root, os.path.relpath(rnd.choice(files), src_root))
        size = os.path.getsize(victim)
        with open(victim, "r+b") as f:
            for _ in range(rnd.choice([1, 2, 8])):
                # mostly headers, descriptors and the first tables; sometimes anywhere
                at = rnd.randrange(min(size, 8192 if rnd.random() < 0.8 else size))
                f.seek(at)
                f.write(bytes([rnd.randrange(256)]) if rnd.random() < 0.5 else
                        rnd.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff\xff\xff\xff\xff", b'"']))
            if rnd.random() < 0.1:
                f.truncate(rnd.randrange(size))
        try:
            _read_all(root, top)
        except CorruptDisk as err:
            message = str(err)
            assert "\n" not in message and message.split(": ", 1)[0].strip(), message
        shutil.rmtree(root)


def test_a_parent_loop_whose_cids_agree_is_called_one_at_once(tmp_path):
    """A's parent is B and B's is A, each parentCID the other's CID: the chain stops at the
    first disk met twice (it used to open 4,096 disks before calling it a loop)."""
    root = str(tmp_path)
    raw = str(tmp_path / "raw")
    make_raw(raw, SIZE, 5, [(0, MiB)])
    base = make_base(root, "base", "vmfs", raw)
    a = make_child(root, base, "a", "vmfsSparse", [(0, 4096)], seed=1)
    b = make_child(root, base, "b", "vmfsSparse", [(4096, 4096)], seed=2)
    set_value(os.path.join(root, a), "CID", "aaaaaaaa")
    set_value(os.path.join(root, b), "CID", "bbbbbbbb")
    set_value(os.path.join(root, a), "parentCID", "bbbbbbbb")
    set_value(os.path.join(root, b), "parentCID", "aaaaaaaa")
    set_value(os.path.join(root, a), "parentFileNameHint", '"../b/b.vmdk"')
    set_value(os.path.join(root, b), "parentFileNameHint", '"../a/a.vmdk"')
    opened = []

    def opener(path):
        opened.append(path)
        return LocalReadHandle(os.path.join(root, path))

    with pytest.raises(CorruptDisk, match=r"^a/a.vmdk: its disk chain loops \(back to a/a.vmdk\)$"):
        DiskChain(a, opener)
    assert len(opened) <= 6
