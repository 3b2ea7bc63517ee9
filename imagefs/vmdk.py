"""Reading VMDK copy-on-write chains: monolithicSparse base disks and delta children.

A chain is opened top (the layer) down to the base (scratch), following each
descriptor's ``parentFileNameHint``. Every child's ``parentCID`` is checked against
its parent's ``CID``: qemu changes the CID of a disk written after its children
were made, and a child of a changed parent no longer shows what it was written
against, so such a chain is refused (CorruptDisk) rather than read.

Reads use positional I/O only (``pread``), so one chain can serve many threads.
Grain tables are merged across the chain once per grain-table span and cached, so
a read costs the same whatever the chain's depth.
"""
import posixpath
import re
import struct
import threading
from functools import cached_property

from .errors import CorruptDisk

SECTOR = 512
_MAGIC = b"KDMV"
# struct SparseExtentHeader (VMware Virtual Disk Format 1.1), little endian, packed
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
_FLAG_ZEROED_GTE = 0x4
_FLAG_COMPRESSED = 0x10000
_GD_AT_END = 0xFFFFFFFFFFFFFFFF
_NO_PARENT_CID = "ffffffff"
# What a header may make us read or allocate (the fields are untrusted): 64 TiB disks,
# grains up to 1 MiB, grain tables up to 4096 entries, descriptors up to 1 MiB, grain
# directories up to 16 MiB, offsets inside a 2**50-byte file.
MAX_CAPACITY_SECTORS = 1 << 37
MAX_GRAIN_SECTORS = 2048
MAX_GTES_PER_GT = 4096
MAX_DESCRIPTOR_SECTORS = 2048
MAX_GD_ENTRIES = 1 << 22
MAX_SECTOR = 1 << 41


class SparseExtent:
    """One monolithicSparse VMDK file: header, embedded descriptor and grain tables."""

    def __init__(self, path, handle):
        self.path = path            # datastore-relative path, for messages and hints
        self.handle = handle        # object with pread(offset, length) and close()
        head = handle.pread(0, SECTOR)
        if len(head) < _HEADER.size or head[:4] != _MAGIC:
            raise CorruptDisk(f"{path}: not a monolithicSparse VMDK (no KDMV header)")
        (_, self.version, self.flags, self.capacity, self.grain_sectors, desc_off, desc_size,
         self.gtes_per_gt, _rgd, self.gd_offset, _overhead, _unclean, _eol, compress) = _HEADER.unpack_from(head)
        if self.flags & _FLAG_COMPRESSED or compress or self.gd_offset == _GD_AT_END:
            raise CorruptDisk(f"{path}: compressed (streamOptimized) VMDKs are not supported as layers")
        if not self.grain_sectors or not self.gtes_per_gt or not self.capacity or desc_off == 0:
            raise CorruptDisk(f"{path}: invalid sparse header")
        _check_limits(path, self.capacity, self.grain_sectors, self.gtes_per_gt, desc_off, desc_size,
                      self.gd_offset)
        self.grain_size = self.grain_sectors * SECTOR
        self.size = self.capacity * SECTOR
        raw = handle.pread(desc_off * SECTOR, desc_size * SECTOR).split(b"\0", 1)[0]
        self.descriptor = _parse_descriptor(raw.decode("utf-8", "replace"), path)
        self.cid = self.descriptor.get("CID", "").lower()
        self.parent_cid = self.descriptor.get("parentCID", _NO_PARENT_CID).lower()
        self.parent_hint = self.descriptor.get("parentFileNameHint")
        self._zeroed_gte = bool(self.flags & _FLAG_ZEROED_GTE)

    @property
    def n_spans(self):
        """How many grain tables (and grain-directory entries) cover the capacity."""
        span = self.grain_sectors * self.gtes_per_gt
        return (self.capacity + span - 1) // span

    @cached_property
    def grain_directory(self):
        """Sector of each grain table (0 = none here). Read on first use: a look at the
        descriptor (parent, CID) needs none of it."""
        n_gdes = self.n_spans
        gd = self.handle.pread(self.gd_offset * SECTOR, n_gdes * 4)
        if len(gd) != n_gdes * 4:
            raise CorruptDisk(f"{self.path}: grain directory is truncated")
        return struct.unpack(f"<{n_gdes}I", gd)

    def grain_table(self, index):
        """The grain table ``index`` as a tuple of sector numbers (0 = not here, -1 = zero grain)."""
        gt_sector = self.grain_directory[index]
        if gt_sector == 0:
            return None
        raw = self.handle.pread(gt_sector * SECTOR, self.gtes_per_gt * 4)
        if len(raw) != self.gtes_per_gt * 4:
            raise CorruptDisk(f"{self.path}: grain table {index} is truncated")
        entries = struct.unpack(f"<{self.gtes_per_gt}I", raw)
        if self._zeroed_gte:
            entries = tuple(-1 if e == 1 else e for e in entries)
        return entries

    def allocated_grains(self):
        """Indices of the grains this file holds itself (not inherited from a parent)."""
        for gdi in range(len(self.grain_directory)):
            table = self.grain_table(gdi)
            if table:
                base = gdi * self.gtes_per_gt
                yield from (base + i for i, e in enumerate(table) if e)

    def close(self):
        self.handle.close()


def _check_limits(path, capacity, grain_sectors, gtes_per_gt, desc_off, desc_size, gd_offset):
    """Refuse headers whose sizes or offsets are beyond any real disk (they size reads)."""
    problems = [
        (capacity > MAX_CAPACITY_SECTORS, f"capacity of {capacity} sectors"),
        (grain_sectors > MAX_GRAIN_SECTORS or grain_sectors & (grain_sectors - 1), f"grain of {grain_sectors} sectors"),
        (gtes_per_gt > MAX_GTES_PER_GT, f"{gtes_per_gt} entries per grain table"),
        (desc_size > MAX_DESCRIPTOR_SECTORS or desc_off > MAX_SECTOR, "descriptor size or offset"),
        (gd_offset > MAX_SECTOR, "grain directory offset"),
        (-(-capacity // (grain_sectors * gtes_per_gt)) > MAX_GD_ENTRIES, "grain directory size"),
    ]
    for bad, what in problems:
        if bad:
            raise CorruptDisk(f"{path}: invalid sparse header ({what})")


def _parse_descriptor(text, path):
    values = {}
    for line in text.splitlines():
        m = re.match(r'\s*([A-Za-z.]+)\s*=\s*"?([^"]*)"?\s*$', line)
        if m:
            values[m.group(1)] = m.group(2)
    if values.get("createType", "").strip('"') not in ("monolithicSparse", ""):
        raise CorruptDisk(f"{path}: createType {values['createType']!r} is not supported (monolithicSparse only)")
    return values


class DiskChain:
    """A layer's disk and all its ancestors, read as one virtual disk.

    ``opener(path)`` returns a handle with ``pread``/``close`` for a datastore-relative
    path; hints are resolved relative to the child's directory.
    """

    def __init__(self, top_path, opener):
        self.layers = []
        path = top_path
        try:
            while True:
                extent = SparseExtent(path, _open_or_corrupt(opener, path))
                if self.layers:
                    child = self.layers[-1]
                    if child.parent_cid != extent.cid:
                        raise CorruptDisk(
                            f"{child.path}: parentCID {child.parent_cid} does not match CID {extent.cid} "
                            f"of its parent {path} (the parent was modified after the child was made)")
                    if extent.capacity != child.capacity:
                        raise CorruptDisk(f"{child.path}: capacity differs from its parent {path}")
                self.layers.append(extent)
                if extent.parent_cid == _NO_PARENT_CID or not extent.parent_hint:
                    break
                path = posixpath.normpath(posixpath.join(posixpath.dirname(path), extent.parent_hint))
                if len(self.layers) > 4096:
                    raise CorruptDisk(f"{top_path}: disk chain deeper than 4096 (a loop?)")
        except BaseException:
            self.close()
            raise
        top = self.layers[0]
        if any(layer.grain_sectors != top.grain_sectors or layer.gtes_per_gt != top.gtes_per_gt
               for layer in self.layers):
            self.close()
            raise CorruptDisk(f"{top_path}: layers of the chain use different grain sizes")
        self.size = top.size
        self.grain_size = top.grain_size
        self._gtes = top.gtes_per_gt
        self._spans = top.n_spans
        self._merged = {}
        self._lock = threading.Lock()

    @property
    def paths(self):
        return [layer.path for layer in self.layers]

    def _merged_table(self, gdi):
        """For grain-table span ``gdi``: per grain, (layer, sector) of the topmost holder, or None."""
        table = self._merged.get(gdi)
        if table is None:
            merged = [None] * self._gtes
            missing = self._gtes
            for layer in self.layers:
                entries = layer.grain_table(gdi)
                if not entries:
                    continue
                for i, sector in enumerate(entries):
                    if sector and merged[i] is None:
                        merged[i] = (layer, sector)
                        missing -= 1
                if not missing:
                    break
            table = tuple(merged)
            with self._lock:
                self._merged[gdi] = table
        return table

    def pread(self, offset, length):
        """Read ``length`` bytes at ``offset`` of the virtual disk (short at the end)."""
        if offset >= self.size or length <= 0:
            return b""
        length = min(length, self.size - offset)
        out = []
        gsize = self.grain_size
        while length:
            grain, within = divmod(offset, gsize)
            take = min(length, gsize - within)
            gdi, gti = divmod(grain, self._gtes)
            if gdi >= self._spans:
                raise CorruptDisk(f"{self.layers[0].path}: read beyond the grain directory")
            entry = self._merged_table(gdi)[gti]
            if entry is None or entry[1] == -1:
                out.append(bytes(take))
            else:
                layer, sector = entry
                # extend over following grains that sit contiguously in the same file
                run = take
                while run < length:
                    ng = grain + (run + within) // gsize
                    ngdi, ngti = divmod(ng, self._gtes)
                    if ngdi >= self._spans:
                        break
                    nxt = self._merged_table(ngdi)[ngti]
                    if nxt is None or nxt[0] is not layer or nxt[1] != sector + (ng - grain) * (gsize // SECTOR):
                        break
                    run = min(length, run + gsize)
                data = layer.handle.pread(sector * SECTOR + within, run)
                if len(data) != run:
                    raise CorruptDisk(f"{layer.path}: grain data is truncated at sector {sector}")
                out.append(data)
                take = run
            offset += take
            length -= take
        return out[0] if len(out) == 1 else b"".join(out)

    def file(self):
        """A new seekable read-only file object over the chain (one per thread)."""
        return ChainFile(self)

    def close(self):
        for layer in self.layers:
            try:
                layer.close()
            except OSError:
                pass


def _open_or_corrupt(opener, path):
    try:
        return opener(path)
    except FileNotFoundError:
        raise CorruptDisk(f"{path}: disk file is missing (broken chain)") from None
    except OSError as e:        # a parent hint naming no openable file (too long, a directory...)
        raise CorruptDisk(f"{path[:200]}: cannot open the disk ({e.strerror})") from None


class ChainFile:
    """A file-like view (read/seek/tell) of a DiskChain with its own position."""

    def __init__(self, chain):
        self.chain = chain
        self.pos = 0
        self.size = chain.size

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.chain.size - self.pos
        data = self.chain.pread(self.pos, n)
        self.pos += len(data)
        return data

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def seek(self, offset, whence=0):
        if whence == 0:
            self.pos = offset
        elif whence == 1:
            self.pos += offset
        else:
            self.pos = self.chain.size + offset
        return self.pos

    def tell(self):
        return self.pos

    def seekable(self):
        return True

    def readable(self):
        return True
