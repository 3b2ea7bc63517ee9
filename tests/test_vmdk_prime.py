"""A chain's hosted sparse layer takes its grain directory and tables in one read.

Opening a layer reads its header and descriptor; its directory and the first tables qemu
and VMware write after it come with them or in one more read on first use, tables of holes only are
remembered as such (a deep chain of deltas asks every layer about every range). The
maps must be the ones the directory and tables give when read one by one.
"""
import os

from imagefs.datastore.local import LocalReadHandle
from imagefs.vmdk import Disk
from imagefs.vmdk.hosted_sparse import HostedSparseExtent
from imagefs.vmdk.runs import HOLE
from vmdk_fixtures import MiB, assert_reads_equal, chain, make_base, make_child, make_raw, qemu_raw

SIZE = 72 * MiB                 # three grain tables of 32 MiB (qemu: 64 KiB grains, 512 a table)
REGIONS = [(0, 2 * MiB), (40 * MiB + 512, 300_000)]
WRITES = [(1 * MiB, 4096), (65 * MiB + 512, 70_000)]


class CountingHandle(LocalReadHandle):
    """A real file whose preads are counted (how many the disk layer makes)."""

    def __init__(self, path, reads):
        super().__init__(path)
        self.reads = reads

    def pread(self, offset, length):
        self.reads.append((offset, length))
        return super().pread(offset, length)


def _layers(tmp_path, size=SIZE, regions=REGIONS, writes=WRITES):
    root = str(tmp_path)
    raw = str(tmp_path / "base.raw")
    make_raw(raw, size, 3, regions)
    base = make_base(root, "base", "monolithicSparse", raw)
    empty = make_child(root, base, "empty", "monolithicSparse", [], seed=4)
    child = make_child(root, empty, "child", "monolithicSparse", writes, seed=5)
    return root, base, empty, child


def _unprimed(root, rel, size):
    with open(os.path.join(root, rel), "rb") as f:
        return HostedSparseExtent(rel, LocalReadHandle(os.path.join(root, rel)), size // 512, f.read(512))


def _bare(runs):
    return [(s, e, k, w) for s, e, k, _, w in runs]


def test_tables_come_in_one_read_and_map_as_read_one_by_one(tmp_path):
    root, base, empty, child = _layers(tmp_path)
    for rel in (base, empty, child):
        reads = []
        disk = Disk(rel, lambda p: CountingHandle(os.path.join(root, p), reads))
        try:
            assert len(reads) == 1                      # header and descriptor (the tables too if they fit)
            primed = disk.runs(0, SIZE)
            assert len(reads) <= 2                      # directory and every table: at most one more
            done = len(reads)
            assert disk.runs(0, SIZE) == primed and disk.runs(MiB, 70 * MiB) == disk.runs(MiB, 70 * MiB)
            assert len(reads) == done
            plain = _unprimed(root, rel, SIZE)
            try:
                assert _bare(primed) == _bare(plain.runs(0, SIZE))
                for lo, hi in [(0, 1), (MiB - 512, MiB + 8192), (31 * MiB, 34 * MiB), (SIZE - 512, SIZE)]:
                    assert _bare(disk.runs(lo, hi)) == _bare(plain.runs(lo, hi))
            finally:
                plain.close()
        finally:
            disk.close()
        if rel == empty:
            assert primed == [(0, SIZE, HOLE, None, 0)]


def test_chain_through_empty_and_written_deltas_reads_as_qemu(tmp_path):
    root, base, empty, child = _layers(tmp_path)
    c = chain(root, child)
    assert [layer.path for layer in c.layers] == [child, empty, base]
    assert_reads_equal(c, qemu_raw(root, child, str(tmp_path / "q.raw")), piece=MiB + 4096)


def test_tables_past_the_first_read_come_when_asked_for(tmp_path):
    """A disk of 40 tables: the first read brings the first PRIME_TABLES; the others are read
    when a range needs them, and every map is the one the tables give."""
    size = 40 * 32 * MiB
    root, base, empty, child = _layers(tmp_path, size, [(0, MiB), (900 * MiB, 3 * MiB)],
                                       [(600 * MiB + 512, 70_000), (size - 4096, 4096)])
    for rel in (base, empty, child):
        disk = Disk(rel, lambda p: LocalReadHandle(os.path.join(root, p)))
        plain = _unprimed(root, rel, size)
        try:
            for lo, hi in [(1200 * MiB, 1201 * MiB), (599 * MiB, 602 * MiB), (0, size), (size - 512, size)]:
                assert _bare(disk.runs(lo, hi)) == _bare(plain.runs(lo, hi))
        finally:
            plain.close()
            disk.close()
