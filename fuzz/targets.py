"""The fuzz targets. Each takes a Choices, mutates real seed inputs, feeds them to imagefs the
way users do (through ImageStore: descriptor look-ups, DiskChain, the tree, the export; the
layer extractor for tars) and returns the number of clear errors met. Anything but a result or
an ImageFSError escapes as the bug it is (the runner also turns hangs and huge allocations
into failures)."""
import io
import os
import shutil
import struct
import tempfile

from imagefs import ext4
from imagefs.datastore import open_datastore
from imagefs.errors import ImageFSError
from imagefs.export import export_diff
from imagefs.store import ImageStore
from imagefs.tree import ROOT_INO, ImageTree

from . import mutate
from .choices import pick
from .seeds import BASE, CHILD, STORE

MAX_INODES = 3000              # per tree walked
MAX_EXPORT = 64 << 20          # bytes of export consumed per tree


class Target:
    def __init__(self, seed_dir, work_dir):
        self.seed_dir = seed_dir
        self.work_dir = work_dir
        self.errors = 0

    def guarded(self, fn, *args):
        """fn(*args), or None after a clear error (an ImageFSError)."""
        try:
            return fn(*args)
        except ImageFSError:
            self.errors += 1
            return None

    def fresh_dir(self):
        d = tempfile.mkdtemp(prefix="run-", dir=self.work_dir)
        return d

    # --- reading a datastore as users do ---------------------------------------------------
    def exercise_datastore(self, ds, images=(CHILD, BASE)):
        st = ImageStore(open_datastore(ds))
        trees = {}
        for image_id in images:
            self.guarded(st.get_image, STORE, image_id)
            self.guarded(st.ancestors, STORE, image_id)
            tree = self.guarded(st.tree, STORE, image_id)
            if tree is not None:
                trees[image_id] = tree
                self.walk(tree)
        for new, old in ((CHILD, None), (CHILD, BASE), (BASE, CHILD)):
            if new in trees and (old is None or old in trees):
                self.guarded(self.consume, export_diff(trees[new], trees.get(old)))
        for tree in trees.values():
            tree.chain.close()

    def walk(self, tree):
        seen, stack = {ROOT_INO}, [ROOT_INO]
        while stack and len(seen) < MAX_INODES:
            d = stack.pop()
            entries = self.guarded(tree.readdir, d) or ()
            if entries:
                self.guarded(tree.lookup, d, entries[0][0])
            for _name, ino in entries:
                st = self.guarded(tree.stat, ino)
                if st is None or ino in seen:
                    continue
                seen.add(ino)
                self.guarded(tree.xattrs, ino)
                if st.is_dir:
                    stack.append(ino)
                elif st.is_lnk:
                    self.guarded(tree.readlink, ino)
                elif st.is_reg:
                    self.guarded(tree.read, ino, 0, 65536)
                    self.guarded(tree.read, ino, max(0, st.size - 4096), 4096)
                    self.guarded(tree.data_ranges, ino)

    @staticmethod
    def consume(chunks):
        total = 0
        try:
            for chunk in chunks:
                total += len(chunk)
                if total > MAX_EXPORT:
                    break
        finally:
            chunks.close()


class VmdkTarget(Target):
    """Mutations of the VMDK files of a real two-layer chain: headers, descriptors (parent links,
    CIDs, create types, extent lines), grain directories and tables, grains, truncation."""
    name = "vmdk"

    def __init__(self, seed_dir, work_dir):
        super().__init__(seed_dir, work_dir)
        self.files, self.regions = {}, {}
        for image_id in (BASE, CHILD):
            rel = os.path.join("VIC", STORE, "images", image_id, f"{image_id}.vmdk")
            with open(os.path.join(seed_dir, "ds", rel), "rb") as f:
                self.files[rel] = f.read()
            self.regions[rel] = mutate.vmdk_regions(self.files[rel])

    def __call__(self, choices):
        ds = os.path.join(self.fresh_dir(), "ds")
        shutil.copytree(os.path.join(self.seed_dir, "ds"), ds)
        bufs = {rel: bytearray(data) for rel, data in self.files.items()}
        for _ in range(choices.int(1, 4)):
            rel = pick(choices, sorted(bufs))
            mutate.mutate_vmdk(bufs[rel], self.regions[rel], choices)
        for rel, buf in bufs.items():
            with open(os.path.join(ds, rel), "wb") as f:
                f.write(buf)
        self.exercise_datastore(ds)
        return bufs


class RawChain:
    """Just enough of a DiskChain over bytes for finding where ext4 keeps its structures."""

    class _Layer:
        path = "seed"

    def __init__(self, raw):
        self.raw, self.size, self.layers = raw, len(raw), [self._Layer()]

    def pread(self, offset, length):
        return self.raw[offset:offset + length]

    def file(self):
        return io.BytesIO(self.raw)

    def close(self):
        pass


def ext4_regions(raw):
    """Where the seed's ext4 keeps what imagefs reads: {kind: [(offset, length)]}."""
    tree = ImageTree(RawChain(raw), name="seed")
    geo, bs = tree.geo, tree.block_size
    n_groups = len(geo.inode_tables)
    out = {"superblock": [(1024, 1024)], "gdt": [(bs if bs > 1024 else 2048, n_groups * 64)],
           "inode": [], "extent": [], "dir": [], "xattr": []}
    for ino, _rec in geo.used_records():
        group, index = divmod(ino - 1, geo.inodes_per_group)
        rec_off = geo.inode_tables[group] * bs + index * geo.inode_size
        out["inode"].append((rec_off, geo.inode_size))
        rec = geo.record(ino)
        if ext4.xattr_block(rec):
            out["xattr"].append((ext4.xattr_block(rec) * bs, bs))
        mapped = ext4.extent_map(geo, rec)
        if mapped is None:
            continue
        runs, tree_blocks = mapped
        out["extent"] += [(b * bs, bs) for b in tree_blocks]
        if ext4.is_dir(rec):
            out["dir"] += [(p * bs, n * bs) for _l, p, n in runs if p is not None]
    return out


def sparse_vmdk(raw, cid, grain_sectors=128, gtes=512):
    """A monolithicSparse VMDK of ``raw`` (zero grains left out), as qemu-img would write it."""
    sector = mutate.SECTOR
    capacity = len(raw) // sector
    grain_bytes = grain_sectors * sector
    n_grains = -(-len(raw) // grain_bytes)
    n_gts = -(-n_grains // gtes)
    desc = (f"# Disk DescriptorFile\nversion=1\nCID={cid}\nparentCID=ffffffff\n"
            f'createType="monolithicSparse"\n\nRW {capacity} SPARSE "scratch.vmdk"\n').encode()
    desc_off, desc_sectors = 1, 20
    gd_off = desc_off + desc_sectors
    gt_off = gd_off + -(-n_gts * 4 // sector)
    gt_sectors = -(-gtes * 4 // sector)
    data_off = -(-(gt_off + n_gts * gt_sectors) // grain_sectors) * grain_sectors
    gd = [gt_off + i * gt_sectors for i in range(n_gts)]
    gt = [0] * (n_gts * gtes)
    grains, next_sector = [], data_off
    for g in range(n_grains):
        chunk = raw[g * grain_bytes:(g + 1) * grain_bytes]
        if chunk.count(0) != len(chunk):
            gt[g] = next_sector
            grains.append(chunk.ljust(grain_bytes, b"\0"))
            next_sector += grain_sectors
    out = bytearray(data_off * sector)
    out[0:mutate._SPARSE_HEADER.size] = mutate._SPARSE_HEADER.pack(
        b"KDMV", 1, 1, capacity, grain_sectors, desc_off, desc_sectors, gtes, 0, gd_off, data_off, 0,
        b"\n \r\n", 0)
    out[desc_off * sector:desc_off * sector + len(desc)] = desc
    struct.pack_into(f"<{n_gts}I", out, gd_off * sector, *gd)
    struct.pack_into(f"<{len(gt)}I", out, gt_off * sector, *gt)
    return bytes(out) + b"".join(grains)


class Ext4Target(Target):
    """Mutations of the base layer's ext4 (superblock, group descriptors, inode records, extent
    trees, directory and xattr blocks), wrapped in a VMDK, read alone and under its child."""
    name = "ext4"

    def __init__(self, seed_dir, work_dir):
        super().__init__(seed_dir, work_dir)
        with open(os.path.join(seed_dir, "base.raw"), "rb") as f:
            self.raw = f.read()
        self.regions = ext4_regions(self.raw)
        base = os.path.join(seed_dir, "ds", "VIC", STORE, "images", BASE, f"{BASE}.vmdk")
        with open(base, "rb") as f:
            head = f.read(64 * 1024)
        self.cid = head.split(b"CID=", 1)[1][:8].decode()

    def __call__(self, choices):
        ds = os.path.join(self.fresh_dir(), "ds")
        shutil.copytree(os.path.join(self.seed_dir, "ds"), ds)
        buf = bytearray(self.raw)
        for _ in range(choices.int(1, 4)):
            mutate.mutate_ext4(buf, self.regions, choices)
        with open(os.path.join(ds, "VIC", STORE, "images", BASE, f"{BASE}.vmdk"), "wb") as f:
            f.write(sparse_vmdk(bytes(buf), self.cid))
        self.exercise_datastore(ds)
        return {"base.raw": buf}


class TarTarget(Target):
    """Mutations of layer tars from GNU tar, bsdtar and tarfile (headers, PAX records, sizes,
    types, names, link targets, checksums), applied by the layer extractor onto a directory.
    Nothing may appear outside it."""
    name = "tar"

    def __init__(self, seed_dir, work_dir):
        super().__init__(seed_dir, work_dir)
        tars = os.path.join(seed_dir, "tars")
        self.tars = {}
        for name in sorted(os.listdir(tars)):
            with open(os.path.join(tars, name), "rb") as f:
                self.tars[name] = f.read()

    def __call__(self, choices):
        from imagefs.layer.extract import apply_layer
        name = pick(choices, sorted(self.tars))
        buf = bytearray(self.tars[name])
        for _ in range(choices.int(1, 3)):
            if name.endswith(".gz"):
                mutate.mutate_region(buf, (0, len(buf)), choices)
            else:
                mutate.mutate_tar(buf, choices)
        run = self.fresh_dir()
        root, outside = os.path.join(run, "root"), os.path.join(run, "outside")
        os.mkdir(root)
        os.mkdir(outside)
        self.guarded(apply_layer, root, io.BytesIO(bytes(buf)))
        escaped = sorted(set(os.listdir(run)) - {"root", "outside"}) + os.listdir(outside)
        if escaped:
            raise AssertionError(f"the extractor wrote outside its root: {escaped}")
        return {name: buf}


TARGETS = {t.name: t for t in (VmdkTarget, Ext4Target, TarTarget)}
