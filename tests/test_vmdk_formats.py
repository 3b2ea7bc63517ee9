"""Every VMDK format ESXi and VIC write, read in any chain and checked against qemu-img.

Bases in each format qemu-img writes (and ESXi's vmfs/vmfsThin descriptors over a flat
file), deltas in monolithicSparse, vmfsSparse (COWD) and seSparse, mixed chains: each
read by imagefs equals ``qemu-img convert -O raw`` of the same chain.
"""
import os
import subprocess

import pytest

from imagefs.errors import CorruptDisk
from imagefs.vmdk import open_disk
from imagefs.datastore.local import LocalReadHandle
from vmdk_fixtures import (BASE_FORMATS, DELTA_FORMATS, MiB, assert_reads_equal, chain, make_base,
                           make_child, make_raw, qemu_raw, run, set_value)

SIZE = 40 * MiB
# data at grain-unaligned places, and up to the last sector
REGIONS = [(0, 3 * MiB), (5 * MiB + 4096, 700_000), (17 * MiB - 512, 2 * MiB + 1024), (SIZE - 8192, 8192)]
WRITES = [(1 * MiB + 512, 5000), (6 * MiB, 2 * MiB), (16 * MiB + 65536, 4096), (SIZE - 512, 512)]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("raw") / "base.raw")
    make_raw(path, SIZE, 1, REGIONS)
    return path


@pytest.mark.parametrize("fmt", BASE_FORMATS + ("vmfsThin",))
def test_base_format_reads_as_qemu_and_the_source(tmp_path, raw, fmt):
    root = str(tmp_path)
    rel = make_base(root, "base", fmt, raw)
    c = chain(root, rel)
    assert c.layers[0].create_type == fmt
    assert_reads_equal(c, raw)
    if fmt != "vmfsThin":           # qemu 7.2 does not know the vmfsThin createType
        assert_reads_equal(c, qemu_raw(root, rel, str(tmp_path / "q.raw")))


@pytest.mark.parametrize("child_fmt", DELTA_FORMATS)
@pytest.mark.parametrize("base_fmt", ["monolithicSparse", "monolithicFlat", "streamOptimized", "vmfs"])
def test_delta_on_each_base(tmp_path, raw, base_fmt, child_fmt):
    root = str(tmp_path)
    base = make_base(root, "base", base_fmt, raw)
    child = make_child(root, base, "child", child_fmt, WRITES, seed=2)
    info = open_disk(child, lambda p: LocalReadHandle(os.path.join(root, p)))
    assert (info.create_type, info.parent_hint) == (child_fmt, "../base/base.vmdk")
    assert info.parent_cid == open_disk(base, lambda p: LocalReadHandle(os.path.join(root, p))).cid
    c = chain(root, child)
    assert [d.create_type for d in c.layers] == [child_fmt, base_fmt]
    assert_reads_equal(c, qemu_raw(root, child, str(tmp_path / "q.raw")))
    run(["qemu-img", "check", os.path.join(root, child)])


def test_mixed_chain_each_format_under_each(tmp_path, raw):
    """vmfs base <- seSparse <- monolithicSparse <- vmfsSparse <- seSparse <- vmfsSparse <- monolithicSparse."""
    root = str(tmp_path)
    rel = make_base(root, "l0", "vmfs", raw)
    formats = ["seSparse", "monolithicSparse", "vmfsSparse", "seSparse", "vmfsSparse", "monolithicSparse"]
    for i, fmt in enumerate(formats, 1):
        writes = [(off + i * 12288, length) for off, length in WRITES[:-1]] + [(i * 3 * MiB + 100 * i, 70_000)]
        rel = make_child(root, rel, f"l{i}", fmt, writes, seed=10 + i)
        c = chain(root, rel)
        assert [d.create_type for d in c.layers] == list(reversed(formats[:i])) + ["vmfs"]
        assert_reads_equal(c, qemu_raw(root, rel, str(tmp_path / f"q{i}.raw")))


@pytest.mark.parametrize("fmt", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_two_gb_extents_across_extent_boundaries(tmp_path, fmt):
    """A 4.5 GiB disk in three extents, data straddling each boundary, with a seSparse
    child writing across a boundary too."""
    root, size, edge = str(tmp_path), 4608 * MiB, 2048 * MiB
    regions = [(edge - 3 * MiB, 6 * MiB), (2 * edge - 4096, 8192), (size - MiB, MiB)]
    make_raw(str(tmp_path / "big.raw"), size, 3, regions)
    base = make_base(root, "base", fmt, str(tmp_path / "big.raw"))
    c = chain(root, base)
    assert len(c.layers[0].extents) == 3
    windows = [(lo - MiB, lo + n + MiB) if lo + n + MiB <= size else (lo - MiB, size) for lo, n in regions]
    assert_reads_equal(c, str(tmp_path / "big.raw"), windows)
    child = make_child(root, base, "child", "seSparse", [(edge - 5000, 10000)], seed=4)
    assert_reads_equal(chain(root, child), qemu_raw(root, child, str(tmp_path / "q.raw")),
                       windows + [(edge - 2 * MiB, edge + 2 * MiB)])


def test_zero_extents_read_as_zeros(tmp_path, raw):
    """A descriptor mixing FLAT and ZERO extents (qemu skips ZERO lines, so the source is the oracle)."""
    root = str(tmp_path)
    make_base(root, "base", "monolithicFlat", raw)
    desc = tmp_path / "base" / "base.vmdk"
    half = SIZE // 512 // 2
    text = desc.read_text().replace(f'RW {SIZE // 512} FLAT "base-flat.vmdk" 0',
                                    f'RW {half} FLAT "base-flat.vmdk" 0\nRW {half} ZERO')
    desc.write_text(text)
    with open(raw, "rb") as f:
        expected = f.read(SIZE // 2) + bytes(SIZE // 2)
    c = chain(root, "base/base.vmdk")
    assert c.pread(0, SIZE) == expected


def test_parent_cid_mismatch_names_both_files(tmp_path, raw):
    root = str(tmp_path)
    base = make_base(root, "base", "vmfs", raw)
    child = make_child(root, base, "child", "vmfsSparse", WRITES, seed=5)
    set_value(os.path.join(root, base), "CID", "0badcafe")
    with pytest.raises(CorruptDisk) as err:
        chain(root, child)
    assert "child/child.vmdk" in str(err.value) and "base/base.vmdk" in str(err.value)
    assert "\n" not in str(err.value)


def test_capacity_mismatch_is_refused(tmp_path, raw):
    root = str(tmp_path)
    base = make_base(root, "base", "vmfs", raw)
    child = make_child(root, base, "child", "seSparse", WRITES, seed=6)
    desc = os.path.join(root, base)
    with open(desc) as f:
        text = f.read()
    with open(desc, "w") as f:
        f.write(text.replace(f"RW {SIZE // 512} VMFS", f"RW {SIZE // 512 - 8} VMFS"))
    with pytest.raises(CorruptDisk, match="capacity"):
        chain(root, child)


def test_missing_extent_file_is_one_line_naming_it(tmp_path, raw):
    root = str(tmp_path)
    base = make_base(root, "base", "vmfs", raw)
    child = make_child(root, base, "child", "vmfsSparse", WRITES, seed=7)
    os.unlink(tmp_path / "child" / "child-delta.vmdk")
    with pytest.raises(CorruptDisk, match=r"child/child-delta.vmdk: extent file is missing"):
        chain(root, child)


@pytest.mark.parametrize("fmt", ["vmfsSparse", "seSparse"])
def test_written_delta_has_the_esxi_layout(tmp_path, raw, fmt):
    """A text descriptor with that createType, parent hint and parentCID, one extent of the
    matching type in <id>-delta.vmdk / <id>-sesparse.vmdk; qemu-img info agrees."""
    root = str(tmp_path)
    base = make_base(root, "base", "vmfs", raw)
    child = make_child(root, base, "child", fmt, WRITES, seed=8)
    text = (tmp_path / "child" / "child.vmdk").read_text()
    extent = {"vmfsSparse": 'VMFSSPARSE "child-delta.vmdk"', "seSparse": 'SESPARSE "child-sesparse.vmdk"'}[fmt]
    assert text.startswith("# Disk DescriptorFile\n")
    assert f'createType="{fmt}"' in text and 'parentFileNameHint="../base/base.vmdk"' in text
    assert f"RW {SIZE // 512} {extent}" in text
    assert sorted(os.listdir(tmp_path / "child")) == sorted(["child.vmdk", extent.split('"')[1]])
    info = run(["qemu-img", "info", "--output=json", os.path.join(root, child)])
    assert f'"create-type": "{fmt}"' in info and '"backing-filename": "../base/base.vmdk"' in info


@pytest.mark.parametrize("base_fmt,child_fmt", [("monolithicSparse", "vmfsSparse"), ("streamOptimized", "seSparse"),
                                                ("twoGbMaxExtentFlat", "monolithicSparse"), ("vmfs", "seSparse"),
                                                ("twoGbMaxExtentSparse", "vmfsSparse")])
def test_same_bytes_as_dissect_hypervisor(tmp_path, raw, base_fmt, child_fmt):
    """dissect.hypervisor's VMDK reader (it follows relative hints by itself) agrees."""
    from dissect.hypervisor.disk.vmdk import VMDK
    root = str(tmp_path)
    base = make_base(root, "base", base_fmt, raw)
    child = make_child(root, base, "child", child_fmt, WRITES, seed=9)
    ours, theirs = chain(root, child), VMDK(os.path.join(root, child))
    assert theirs.size == ours.size
    for pos in range(0, SIZE, 5 * MiB):
        theirs.seek(pos)
        assert theirs.read(5 * MiB) == ours.pread(pos, 5 * MiB), f"differs in the 5 MiB at {pos}"


@pytest.mark.parametrize("name", ["../../outside-flat.vmdk", "/etc/passwd", "/vmfs/volumes/ds/../../x"])
def test_extent_file_outside_the_datastore_is_refused(tmp_path, raw, name):
    root = str(tmp_path / "ds")
    make_base(root, "base", "vmfs", raw)
    desc = tmp_path / "ds" / "base" / "base.vmdk"
    desc.write_text(desc.read_text().replace('"base-flat.vmdk"', f'"{name}"'))
    with pytest.raises(CorruptDisk, match=r"base/base.vmdk: extent file .* refused"):
        chain(root, "base/base.vmdk")


def test_read_only_extents_read(tmp_path, raw):
    """ESXi marks some extents RDONLY; they read like RW ones."""
    root = str(tmp_path)
    make_base(root, "base", "twoGbMaxExtentFlat", raw)
    desc = tmp_path / "base" / "base.vmdk"
    desc.write_text(desc.read_text().replace("RW ", "RDONLY "))
    assert_reads_equal(chain(root, "base/base.vmdk"), raw)


@pytest.mark.parametrize("child_fmt", ["twoGbMaxExtentSparse"])  # qemu refuses flat children
def test_qemu_made_children(tmp_path, raw, child_fmt):
    """A child in the other sparse format qemu-img writes, under an ESXi-format chain."""
    root = str(tmp_path)
    base = make_base(root, "base", "vmfs", raw)
    mid = make_child(root, base, "mid", "seSparse", WRITES, seed=11)
    os.makedirs(tmp_path / "child")
    top = str(tmp_path / "child" / "child.vmdk")
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={child_fmt}", "-b", "../mid/mid.vmdk",
         "-F", "vmdk", top])
    run(["qemu-io", "-f", "vmdk", "-c", "write -P 7 100000 300000", "-c", f"write -P 9 {SIZE - 70000} 4096", top])
    c = chain(root, "child/child.vmdk")
    assert [d.create_type for d in c.layers] == [child_fmt, "seSparse", "vmfs"]
    assert_reads_equal(c, qemu_raw(root, "child/child.vmdk", str(tmp_path / "q.raw")))
