"""``imagefs store check``: verify every image of a store, list what is broken or left over.

For each complete image (one with a manifest): the disk and the metadata directory are
there, the VMDK header and descriptor parse, the chain's parentCIDs match up to
scratch through images of this store, every grain table and grain lies inside its
file without overlap, and the ext4 tree reads end to end through the reader that
serves users (every directory, inode, link target, xattr and, unless ``data=False``,
every byte of file data).

Besides images: half-made image directories (no manifest) and whether a live writer
still holds them, claim and temporary files left by dead writers, stray files, and the
work directories on this host of dead writers of this store's images.

``repair`` removes only what is provably debris: half-made images whose claim lock is
free, stale claims, temporary files of processes that no longer exist, dead writers'
work directories (through ``layer.recover``). A broken image is reported, never
deleted: it may still be worth reading.
"""
import os
import posixpath
import re
import stat
from dataclasses import asdict, dataclass, field

from .errors import CorruptDisk, ImageFSError, NotFound
from .ids import SCRATCH
from .layer.recover import dead_work_dirs, disks_of, recover_work_dirs
from .store import CLAIM, _claim_path, _disk_path, _image_dir, _images_dir, _store_lock
from .tree import ROOT_INO
from .vmdk import SECTOR, Disk

READ_SIZE = 1 << 20
_TEMP = re.compile(r"\.(?:tmp|space-probe)-(\d+)$")


@dataclass
class Problem:
    where: str                  # "<store>/<image>", or a path
    kind: str                   # half-made, stale-claim, temporary-file, dead-writer, stray-file,
                                # missing-disk, missing-metadata, corrupt-disk, broken-chain, unreadable-tree
    message: str
    repairable: bool = False
    repaired: bool = False

    def line(self):
        state = " (repaired)" if self.repaired else " (debris: --repair removes it)" if self.repairable else ""
        return f"{self.where}: {self.kind}: {self.message}{state}"


@dataclass
class Report:
    store: str
    images_checked: int = 0
    in_progress: list = field(default_factory=list)     # half-made images a live writer holds: not problems
    problems: list = field(default_factory=list)

    @property
    def ok(self):
        return all(p.repaired for p in self.problems)

    def as_dict(self):
        return {"store": self.store, "images_checked": self.images_checked, "in_progress": self.in_progress,
                "ok": self.ok, "problems": [asdict(p) for p in self.problems]}


def check_store(st, store, *, repair=False, data=True, workdir=None) -> Report:
    """Check store ``store`` of ImageStore ``st`` (opened without recovery, so that a check
    changes nothing unless ``repair``)."""
    if not st.ds.is_dir(_images_dir(store)):
        raise NotFound(f"image store {store} not found")
    report = Report(store)
    _leftovers(st, store, report, repair, workdir)
    for image_id in st.ds.listdir(_images_dir(store)):
        if st.ds.is_dir(_image_dir(store, image_id)) and st.ds.exists(f"{_image_dir(store, image_id)}/manifest"):
            report.images_checked += 1
            _check_image(st, store, image_id, report, data)
    return report


# --- what dead writers left ------------------------------------------------------------------------
def _leftovers(st, store, report, repair, workdir):
    local = getattr(st.ds, "local_path", None)          # a remote datastore's writers stage elsewhere
    images = os.path.abspath(local(_images_dir(store))) if local else None

    def writes_here(path):                      # a dead writer of one of this store's images
        return any(os.path.dirname(os.path.dirname(disk)) == images for disk in disks_of(path))

    for path in filter(writes_here, dead_work_dirs(workdir)):
        report.problems.append(Problem(path, "dead-writer", "work directory of a killed layer writer "
                                       "(its mounts, loop device and processes, if any, go with it)", True))
    if repair and any(p.kind == "dead-writer" for p in report.problems):
        done = {r.work_dir for r in recover_work_dirs(workdir, only=writes_here) if r.removed}
        for p in report.problems:
            p.repaired = p.kind == "dead-writer" and p.where in done
    with st.ds.lock(_store_lock(store), exclusive=True):    # no new claim while we look
        for image_id in st.ds.listdir(_images_dir(store)):
            d = _image_dir(store, image_id)
            where = f"{store}/{image_id}"
            if not st.ds.is_dir(d):
                report.problems.append(Problem(d, "stray-file", "not an image directory"))
                continue
            complete = st.ds.exists(f"{d}/manifest") and st.ds.exists(_disk_path(store, image_id))
            if not complete and image_id != SCRATCH:
                if st._is_being_written(store, image_id):
                    report.in_progress.append(image_id)
                    continue
                p = Problem(where, "half-made", "no manifest and no live writer: a killed or failed write", True)
                p.repaired = repair and st._remove_if_debris(store, image_id)
                report.problems.append(p)
                continue
            if st.ds.exists(_claim_path(store, image_id)) and complete:
                p = Problem(where, "stale-claim", f"{CLAIM} left by a writer killed after its commit", True)
                if repair and not st._is_being_written(store, image_id):
                    st._drop_stale_claim(store, image_id)
                    p.repaired = not st.ds.exists(_claim_path(store, image_id))
                report.problems.append(p)
            for rel in _temporary_files(st, d):
                p = Problem(f"{where}/{rel}", "temporary-file", "left by a process that no longer runs", True)
                if repair:
                    st.ds.remove(f"{d}/{rel}")
                    p.repaired = True
                report.problems.append(p)


def _temporary_files(st, d):
    out = []
    for sub in ("", "imageMetadata"):
        try:
            names = st.ds.listdir(f"{d}/{sub}" if sub else d)
        except NotFound:
            continue
        for name in names:
            m = _TEMP.search(name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                out.append(f"{sub}/{name}" if sub else name)
    return out


# --- one image ---------------------------------------------------------------------------------------
def _check_image(st, store, image_id, report, data):
    where = f"{store}/{image_id}"
    d = _image_dir(store, image_id)
    disk = _disk_path(store, image_id)
    if not st.ds.exists(disk):
        report.problems.append(Problem(where, "missing-disk", f"{image_id}.vmdk is missing"))
        return
    if not st.ds.is_dir(f"{d}/imageMetadata"):
        report.problems.append(Problem(where, "missing-metadata", "imageMetadata/ is missing"))
    try:
        _check_extent(st, disk)
    except CorruptDisk as err:
        report.problems.append(Problem(where, "corrupt-disk", str(err)))
        return
    try:
        chain = st.open_chain(disk)
    except CorruptDisk as err:
        report.problems.append(Problem(where, "broken-chain", str(err)))
        return
    try:
        problem = _chain_in_store(st, store, chain)
        if problem:
            report.problems.append(Problem(where, "broken-chain", problem))
        _read_tree(st, chain, where, data)
    except (CorruptDisk, ImageFSError, RecursionError) as err:
        report.problems.append(Problem(where, "unreadable-tree", str(err)))
    finally:
        chain.close()


def _check_extent(st, disk):
    """The disk's descriptor and extents open, and every grain table and grain of its sparse
    extents lies inside its file, no two grains in one place."""
    opened = Disk(disk, st.ds.open_read)
    try:
        for extent in opened.extents:
            if not hasattr(extent, "table"):
                continue                                # flat or zero: no tables
            size = st.ds.size(extent.path)
            used = set()
            for index in range(extent.n_tables):
                table = extent.table(index)
                if table is None:
                    continue
                for entry in table:
                    if entry <= 1:                      # a hole, or a grain of zeros
                        continue
                    end = entry * SECTOR + (SECTOR if extent.compressed else extent.grain_size)
                    if end > size:
                        raise CorruptDisk(f"{extent.path}: a grain of table {index} lies beyond the end of the "
                                          f"file (sector {entry}, file of {size} bytes)")
                    if entry in used:
                        raise CorruptDisk(f"{extent.path}: two grains share sector {entry}")
                    used.add(entry)
    finally:
        opened.close()


def _chain_in_store(st, store, chain):
    """Each parent of the chain is a complete image of this store, down to scratch."""
    for layer in chain.layers[1:]:
        parts = layer.path.split("/")
        if len(parts) != 5 or parts[:2] != ["VIC", store] or parts[2] != "images":
            return f"parent disk {layer.path} is not an image of store {store}"
        if not st.ds.exists(posixpath.join(posixpath.dirname(layer.path), "manifest")):
            return f"parent {parts[3]} has no manifest"
    if os.path.basename(chain.layers[-1].path) != f"{SCRATCH}.vmdk":
        return f"the chain ends at {chain.layers[-1].path}, not at scratch"
    return None


def _read_tree(st, chain, where, data):
    """Every entry, link target, xattr and (with ``data``) byte, without recursion."""
    from .tree import ImageTree
    tree = ImageTree(chain, name=where)
    pending = [ROOT_INO]
    seen = set()
    while pending:
        ino = pending.pop()
        for _name, child in tree.readdir(ino):
            s = tree.stat(child)
            tree.xattrs(child)
            if s.is_dir:
                if child not in seen:
                    seen.add(child)
                    pending.append(child)
            elif s.is_lnk:
                tree.readlink(child)
            elif s.is_reg and data and child not in seen:
                seen.add(child)
                _read_data(tree, child, s)
            elif stat.S_ISCHR(s.mode) or stat.S_ISBLK(s.mode) or stat.S_ISFIFO(s.mode):
                pass


def _read_data(tree, ino, s):
    ranges = [(0, s.size)] if s.blocks * 512 >= s.size else tree.data_ranges(ino)
    for start, length in ranges:
        offset, end = start, start + length
        while offset < end:
            block = tree.read(ino, offset, min(READ_SIZE, end - offset))
            if not block:
                raise CorruptDisk(f"inode {ino}: data ends at {offset} of {s.size} bytes")
            offset += len(block)
