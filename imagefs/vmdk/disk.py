"""One disk of a chain: its descriptor facts (open_disk) and its extents (Disk).

A disk is named by one file: a text descriptor listing extent files, or a hosted
sparse file (KDMV) carrying its own descriptor. ``open_disk`` reads only the start
of that file (one read) and returns the facts a store needs: create type, CID,
parentCID, parent hint, capacity and extent files. ``Disk`` opens the extents too.
"""
import posixpath
from bisect import bisect_right
from dataclasses import dataclass

from ..errors import CorruptDisk, NotFound
from . import cowd, hosted_sparse, sesparse
from .descriptor import MAX_DESCRIPTOR, NO_PARENT_CID, Descriptor, ExtentLine, parse_descriptor
from .flat import FlatExtent, ZeroExtent
from .hints import resolve_hint
from .runs import HOLE, MAX_SECTOR, SECTOR, _advise, held_ranges

FIRST_READ = 64 * 1024          # header and embedded descriptor in one read
LAYER_READ = 16 * 1024          # the same when a chain opens a disk: qemu's and VMware's embedded
                                # descriptors end at 10.5 KiB, and each layer's first read is a
                                # cold read the next one waits for (128 empty deltas, cold: the
                                # chain opened in 23 and 27 ms instead of 26 and 41, two rounds);
                                # the tables come in a read of their own, announced at once (prime)
_EXTENT_TYPE_OF_CREATE = {
    "monolithicSparse": {"SPARSE"}, "streamOptimized": {"SPARSE"}, "twoGbMaxExtentSparse": {"SPARSE"},
    "monolithicFlat": {"FLAT"}, "twoGbMaxExtentFlat": {"FLAT"}, "vmfs": {"VMFS", "FLAT"},
    "vmfsThin": {"VMFS", "FLAT"}, "vmfsSparse": {"VMFSSPARSE"}, "seSparse": {"SESPARSE"},
}


@dataclass
class DiskInfo:
    """What a disk's own file says about it; no grain table is read to know it."""
    path: str                   # datastore-relative path of the disk's (descriptor) file
    descriptor: Descriptor
    embedded: bool              # the descriptor sits inside a hosted sparse file
    extent_files: tuple         # datastore-relative paths of its extent files, in order

    @property
    def create_type(self):
        return self.descriptor.create_type or ("monolithicSparse" if self.embedded else "")

    @property
    def cid(self):
        return self.descriptor.cid

    @property
    def parent_cid(self):
        return self.descriptor.parent_cid

    @property
    def parent_hint(self):
        return self.descriptor.parent_hint

    @property
    def has_parent(self):
        return self.parent_cid != NO_PARENT_CID and self.parent_hint is not None

    @property
    def capacity(self):
        """Bytes of the virtual disk."""
        return self.descriptor.sectors * SECTOR

    def parent_path(self, names=None):
        """The parent's datastore-relative path, or None for a base disk (CorruptDisk if
        the hint leaves the datastore)."""
        return resolve_hint(self.path, self.parent_hint, names) if self.has_parent else None


def open_disk(path, opener, names=None):
    """The DiskInfo of the disk named by ``path`` (reads the start of one file).
    FileNotFoundError if that file is gone (another process may have deleted the image:
    the caller decides); in a chain a missing file is CorruptDisk instead."""
    handle = _open(opener, path, missing_ok=True)
    try:
        info, _ = _read_info(path, handle, names)
        return info
    finally:
        handle.close()


def _read_info(path, handle, names, first=FIRST_READ):
    head = handle.pread(0, first)
    if head[:4] == hosted_sparse.MAGIC:
        header = hosted_sparse.SparseHeader(head, path)
        span = header.descriptor_span()
        if span is None:
            raise CorruptDisk(f"{path}: hosted sparse disk without an embedded descriptor")
        off, size = span
        raw = head[off:off + size] if off + size <= len(head) else handle.pread(off, size)
        desc = parse_descriptor(raw, path)
        if not desc.extents:  # qemu writes one; an older tool might not
            desc.extents.append(ExtentLine("RW", header.capacity, "SPARSE", posixpath.basename(path)))
        if len(desc.extents) != 1 or desc.extents[0].type != "SPARSE":
            raise CorruptDisk(f"{path}: a hosted sparse file must describe itself as its only extent")
        return DiskInfo(path, desc, True, (path,)), head
    if head[:4] == cowd.MAGIC or sesparse.is_sesparse(head):
        raise CorruptDisk(f"{path}: a bare delta extent; open its descriptor file instead")
    if not head.split(b"\0", 1)[0].strip():     # qemu pads descriptors with NULs; raw data starts with some
        raise CorruptDisk(f"{path}: not a VMDK (no descriptor or known header)")
    if len(head) == first:
        head = handle.pread(0, MAX_DESCRIPTOR + 1)
    desc = parse_descriptor(head, path)
    if not desc.extents:
        raise CorruptDisk(f"{path}: descriptor lists no extents")
    allowed = _EXTENT_TYPE_OF_CREATE.get(desc.create_type)
    if allowed is None:
        raise CorruptDisk(f"{path}: descriptor has no supported createType")
    for line in desc.extents:
        if line.type != "ZERO" and line.type not in allowed:
            raise CorruptDisk(f"{path}: extent type {line.type} does not belong in a {desc.create_type} disk")
        if line.access == "NOACCESS":
            raise CorruptDisk(f"{path}: extent {line.filename} is marked NOACCESS")
    files = tuple(resolve_hint(path, line.filename, names, what="extent file")
                  for line in desc.extents if line.type != "ZERO")
    return DiskInfo(path, desc, False, files), None


class Disk:
    """A disk with its extents open: ``runs(lo, hi)`` over the whole virtual disk.

    ``zero``: the disk is known to hold only zeros (a store's empty scratch base, see
    store.py): it must be a base disk of flat extents, whose files are then never
    opened or read (an 8 GB thin base is not fetched from a datastore to learn that)."""

    def __init__(self, path, opener, names=None, zero=False):
        self.extents = []
        self.zero = zero
        handle = _open(opener, path)
        try:
            # announced first, the read is just that (the kernel's read-ahead of a cold
            # file, up to the device's read_ahead_kb, is not waited for, layer after layer)
            _advise(handle, 0, LAYER_READ)
            self.info, head = _read_info(path, handle, names, LAYER_READ)
            if zero:
                handle.close()
                handle = None
                self.extents = _zero_extents(self.info)
            elif self.info.embedded:
                line = self.info.descriptor.extents[0]
                self.extents.append(hosted_sparse.HostedSparseExtent(path, handle, line.sectors, head, prime=True))
                handle = None
            else:
                handle.close()
                handle = None
                files = iter(self.info.extent_files)
                # a file named by many lines (a corrupt descriptor: 60,000 times in its 1 MiB)
                # is opened and parsed once: its descriptor, grain tables and caches are shared
                opened, parsed = {}, {}
                for line in self.info.descriptor.extents:
                    self.extents.append(ZeroExtent(line.sectors) if line.type == "ZERO"
                                        else _extent(line, next(files), opener, opened, parsed))
        except BaseException:
            if handle is not None:
                handle.close()
            self.close()
            raise
        self.starts = []
        pos = 0
        for extent in self.extents:
            self.starts.append(pos)
            pos += extent.size
        self.size = pos

    # the facts, for callers that hold a Disk
    path = property(lambda self: self.info.path)
    cid = property(lambda self: self.info.cid)
    parent_cid = property(lambda self: self.info.parent_cid)
    parent_hint = property(lambda self: self.info.parent_hint)
    create_type = property(lambda self: self.info.create_type)

    def runs(self, lo, hi):
        """Runs of [lo, hi) of the virtual disk, positions absolute (see runs.py)."""
        if self.starts == [0] and hi <= self.size:      # one extent (most disks): its runs as they are
            return self.extents[0].runs(lo, hi)
        out = []
        i = bisect_right(self.starts, lo) - 1
        while lo < hi and i < len(self.extents):
            start, extent = self.starts[i], self.extents[i]
            end = min(hi, start + extent.size)
            if end > lo:
                for rs, re_, kind, src, where in extent.runs(lo - start, end - start):
                    out.append((rs + start, re_ + start, kind, src, where))
                lo = end
            i += 1
        if lo < hi:
            out.append((lo, hi, HOLE, None, 0))
        return out

    def allocated(self):
        """Byte ranges of the virtual disk this disk holds itself."""
        return [(s + a, s + b) for s, e in zip(self.starts, self.extents) for a, b in e.allocated()]

    def close(self):
        for extent in self.extents:
            try:
                extent.close()
            except OSError:
                pass
        self.extents = []


def _zero_extents(info):
    """The extents of a disk known to be all zero: refused unless it is a flat base."""
    lines = info.descriptor.extents
    if info.has_parent or info.embedded or any(line.type not in ("VMFS", "FLAT", "ZERO") for line in lines):
        raise CorruptDisk(f"{info.path}: should be an empty flat base disk, but is a "
                          f"{info.create_type or 'hosted sparse'} disk" + (" with a parent" if info.has_parent else ""))
    return [ZeroExtent(line.sectors) for line in lines]


def _extent(line, path, opener, opened, parsed):
    """The extent of one line; a sparse file parsed for an earlier line is shared."""
    shared = parsed.get((path, line.type))
    if shared is not None:
        return _Span(shared, line.sectors)
    handle = opened.get(path)
    if handle is None:
        handle = opened[path] = _open(opener, path, what="extent file")
    extent = _open_extent(line, path, handle)
    if line.type not in ("FLAT", "VMFS"):
        parsed[(path, line.type)] = extent
    return extent


class _Span:
    """Another extent line naming a sparse file already parsed: its first ``sectors``."""

    def __init__(self, extent, sectors):
        if sectors > extent.capacity:
            raise CorruptDisk(f"{extent.path}: descriptor gives {sectors} sectors, the extent holds "
                              f"{extent.capacity}")
        self.extent, self.size = extent, sectors * SECTOR
        self.path, self.compressed = extent.path, extent.compressed

    def runs(self, lo, hi):
        return self.extent.runs(lo, hi)

    def allocated(self):
        return held_ranges(self.extent.runs(0, self.size))

    def close(self):            # the extent's own line closes it
        pass


def _open_extent(line, path, handle):
    try:
        if line.type in ("FLAT", "VMFS"):
            return FlatExtent(path, handle, line.sectors, line.offset)
        head = handle.pread(0, SECTOR * 4)
        if line.type == "SPARSE" and head[:4] == hosted_sparse.MAGIC:
            return hosted_sparse.HostedSparseExtent(path, handle, line.sectors, head)
        if line.type in ("SPARSE", "VMFSSPARSE") and head[:4] == cowd.MAGIC:
            return cowd.CowdExtent(path, handle, line.sectors, head)
        if line.type == "SESPARSE":
            return sesparse.SesparseExtent(path, handle, line.sectors, head)
        raise CorruptDisk(f"{path}: not a {line.type} extent (unknown header)")
    except BaseException:
        handle.close()
        raise


def _open(opener, path, what="disk file", missing_ok=False):
    try:
        return _CheckedHandle(opener(path), path)
    except FileNotFoundError:
        if missing_ok:
            raise
        raise CorruptDisk(f"{path}: {what} is missing (broken chain)") from None
    except OSError as e:        # a name that opens no file (too long, a directory, no permission...)
        raise CorruptDisk(f"{path[:200]}: cannot open the {what} ({e.strerror or e})") from None


class _CheckedHandle:
    """A disk file's handle whose reads fail as one CorruptDisk naming the file: an I/O
    error, a directory where a file should be, or an offset no VMDK file has (a corrupt
    table entry; the OS would raise OverflowError for some)."""

    def __init__(self, handle, path):
        self._handle, self.path = handle, path
        self._closed = False

    def pread(self, offset, length):
        if not 0 <= offset <= MAX_SECTOR * SECTOR - length:
            raise CorruptDisk(f"{self.path}: read at offset {offset} is beyond any disk file")
        try:
            return self._handle.pread(offset, length)
        except NotFound:
            raise                   # its image was deleted while in use (diskpool.py)
        except OSError as e:
            raise CorruptDisk(f"{self.path}: read failed: {e.strerror or e}") from None

    def close(self):            # extents sharing the handle each close it
        if not self._closed:
            self._closed = True
            self._handle.close()

    def __getattr__(self, name):        # size, fd...: what the datastore's handle has
        return getattr(self._handle, name)
