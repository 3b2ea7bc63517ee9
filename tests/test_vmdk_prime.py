"""A chain's hosted sparse layer takes its grain directory and tables in one read.

Opening a layer reads its header and descriptor; its directory and the tables qemu and
VMware write after it come in one more read on first use, tables of holes only are
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


def _layers(tmp_path):
    root = str(tmp_path)
    raw = str(tmp_path / "base.raw")
    make_raw(raw, SIZE, 3, REGIONS)
    base = make_base(root, "base", "monolithicSparse", raw)
    empty = make_child(root, base, "empty", "monolithicSparse", [], seed=4)
    child = make_child(root, empty, "child", "monolithicSparse", WRITES, seed=5)
    return root, base, empty, child


def _bare(runs):
    return [(s, e, k, w) for s, e, k, _, w in runs]


def test_tables_come_in_one_read_and_map_as_read_one_by_one(tmp_path):
    root, base, empty, child = _layers(tmp_path)
    for rel in (base, empty, child):
        reads = []
        disk = Disk(rel, lambda p: CountingHandle(os.path.join(root, p), reads))
        try:
            assert len(reads) == 1                      # header and descriptor
            primed = disk.runs(0, SIZE)
            assert len(reads) == 2                      # directory and every table
            assert disk.runs(0, SIZE) == primed and disk.runs(MiB, 70 * MiB) == disk.runs(MiB, 70 * MiB)
            assert len(reads) == 2
            with open(os.path.join(root, rel), "rb") as f:
                plain = HostedSparseExtent(rel, LocalReadHandle(os.path.join(root, rel)), SIZE // 512,
                                           f.read(512))
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
