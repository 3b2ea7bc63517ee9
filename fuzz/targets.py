"""The fuzz targets. Each takes a Choices, mutates real seed inputs, feeds them to imagefs the
way users do (through ImageStore: descriptor look-ups, DiskChain, the tree, the export; the
layer extractor for tars) and returns the number of clear errors met. Anything but a result or
an ImageFSError escapes as the bug it is (the runner also turns hangs and huge allocations
into failures)."""
import atexit
import io
import os
import re
import shutil
import struct
import tempfile

from imagefs import ext4
from imagefs.datastore import open_datastore
from imagefs.errors import ImageFSError
from imagefs.export import export_diff
from imagefs.store import ImageStore
from imagefs.tree import ROOT_INO, ImageTree

from . import disk_mutate, mutate
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
        """fn(*args), or None after a clear error: an ImageFSError of one non-empty line (what
        the CLI prints after "imagefs: " and the mount logs)."""
        try:
            return fn(*args)
        except ImageFSError as e:
            text = str(e)
            if not text.strip() or "\n" in text or "\r" in text:
                raise AssertionError(f"an error that is not one line: {text!r}") from e
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


class FormatsTarget(Target):
    """Mutations of the files of a store in every VMDK format (fuzz/format_seeds.py): text
    descriptors and parent links, KDMV headers, grain directories and tables, streamOptimized
    markers, deflate data and footers, COWD and SEsparse headers and tables, flat files cut
    short, files removed or standing in for each other. Each input is read as users read it
    (the store's look-ups, the tree, an export) and as a bare chain (every grain it maps)."""
    name = "formats"
    MAX_CHAIN_READ = 4 << 20         # bytes read per execution through the bare chain

    def __init__(self, seed_dir, work_dir):
        from .format_seeds import CASES, DS_NAME, format_seeds
        super().__init__(seed_dir, work_dir)
        self.seed_ds = os.path.join(format_seeds(os.path.dirname(seed_dir)), "ds")
        self.ds_name, self.cases = DS_NAME, {}
        # hard links of the unchanged files need the seeds' filesystem (flat files are GiBs, sparse)
        self.work_dir = tempfile.mkdtemp(prefix="formats-work-", dir=os.path.dirname(self.seed_ds))
        atexit.register(shutil.rmtree, self.work_dir, True)
        st = ImageStore(open_datastore(self.seed_ds))
        for store in CASES:
            images = sorted(i.id for i in st.list_images(store))
            top = next(i for i in images if not st.children(store, i))
            files, loaded = {}, {}
            store_dir = os.path.join(self.seed_ds, "VIC", store)
            for d, _, names in os.walk(store_dir):
                for n in names:
                    rel = os.path.relpath(os.path.join(d, n), self.seed_ds)
                    if not n.endswith(".vmdk"):
                        continue
                    with open(os.path.join(d, n), "rb") as f:
                        head = f.read(1 << 16)
                    kind = disk_mutate.classify(head)
                    files[rel] = kind
                    if kind != "flat":
                        with open(os.path.join(d, n), "rb") as f:
                            data = f.read()
                        loaded[rel] = (data, disk_mutate.regions(kind, data))
            cids = {rel: m.group(1).decode() for rel, (data, _) in loaded.items()
                    for m in [re.search(rb"\nCID=([0-9a-fA-F]+)\n", data[:1 << 16])] if m}
            self.cases[store] = {"top": top, "images": [top] + st.ancestors(store, top), "files": files,
                                 "loaded": loaded, "ctx": disk_mutate.DiskContext(files, cids, DS_NAME)}

    def __call__(self, choices):
        store = pick(choices, sorted(self.cases))
        case = self.cases[store]
        changed, cut, gone = {}, {}, set()
        for _ in range(choices.int(1, 4)):
            rel = pick(choices, sorted(case["files"]))
            kind = case["files"][rel]
            op = choices.int(0, 15)
            if op == 0:
                gone.add(rel)
            elif op == 1 and case["loaded"]:         # another disk file stands in for this one
                changed[rel] = bytearray(case["loaded"][pick(choices, sorted(case["loaded"]))][0])
            elif kind == "flat":
                cut[rel] = choices.int(0, 1 << 24)
            else:
                buf = changed.setdefault(rel, bytearray(case["loaded"][rel][0]))
                disk_mutate.mutate_file(buf, kind, case["loaded"][rel][1], rel, case["ctx"], choices)
        ds = os.path.join(self.fresh_dir(), "ds")
        self.materialize(store, ds, changed, cut, gone)
        self.exercise_store(ds, store, case)
        return changed

    def materialize(self, store, ds, changed, cut, gone):
        """The seed store at ``ds``: unchanged files hard-linked, changed ones written."""
        src_root = os.path.join(self.seed_ds, "VIC", store)
        for d, _, names in os.walk(src_root):
            out_dir = os.path.join(ds, os.path.relpath(d, self.seed_ds))
            os.makedirs(out_dir, exist_ok=True)
            for n in names:
                src = os.path.join(d, n)
                rel = os.path.relpath(src, self.seed_ds)
                dst = os.path.join(out_dir, n)
                if rel in gone:
                    continue
                if rel in changed:
                    with open(dst, "wb") as f:
                        f.write(changed[rel])
                elif rel in cut:
                    sparse_copy(src, dst, cut[rel])
                else:
                    os.link(src, dst)

    def exercise_store(self, ds, store, case):
        st = ImageStore(open_datastore(ds))
        for image_id in case["images"]:
            self.guarded(st.get_image, store, image_id)
            self.guarded(st.ancestors, store, image_id)
            self.guarded(st.layer_disk, store, image_id)
        self.guarded(st.list_images, store)
        top, parent = case["images"][0], case["images"][1]
        tree = self.guarded(st.tree, store, top)
        if tree is not None:
            try:
                self.walk(tree)
                old = self.guarded(st.tree, store, parent)
                if old is not None:
                    try:
                        self.guarded(self.consume, export_diff(tree, old))
                    finally:
                        old.chain.close()
            finally:
                tree.chain.close()
        self.read_chain(ds, st, store, top)

    def read_chain(self, ds, st, store, top):
        """The top disk as a bare chain, hints resolved with the datastore's names: every
        grain each layer maps, up to MAX_CHAIN_READ bytes, and both ends of the disk."""
        from imagefs.datastore.local import LocalReadHandle
        from imagefs.store import _disk_path
        from imagefs.vmdk import DiskChain
        chain = self.guarded(DiskChain, _disk_path(store, top), lambda p: LocalReadHandle(os.path.join(ds, p)),
                             (self.ds_name, "5e3f-uuid"))
        if chain is None:
            return
        try:
            budget = self.MAX_CHAIN_READ
            for layer in chain.layers:
                for lo, hi in self.guarded(layer.allocated) or ():
                    n = min(hi - lo, 256 << 10, budget)
                    if n <= 0:
                        break
                    self.guarded(chain.pread, lo, n)
                    budget -= n
            self.guarded(chain.pread, 0, 4096)
            self.guarded(chain.pread, max(0, chain.size - 4096), 8192)
        finally:
            chain.close()


def sparse_copy(src, dst, limit):
    """Copy the first ``limit`` bytes of ``src`` to ``dst``, holes kept (flat files are GiBs)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = min(limit, os.fstat(fi.fileno()).st_size)
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:             # ENXIO: no data after pos
                break
            end = min(size, os.lseek(fi.fileno(), pos, os.SEEK_HOLE))
            while pos < end:
                chunk = os.pread(fi.fileno(), min(1 << 20, end - pos), pos)
                os.pwrite(fo.fileno(), chunk, pos)
                pos += len(chunk)
        fo.truncate(size)


TARGETS[FormatsTarget.name] = FormatsTarget
