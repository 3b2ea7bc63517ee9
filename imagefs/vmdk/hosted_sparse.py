"""Hosted sparse extents (``KDMV``): monolithicSparse, the ``-s###`` extents of
twoGbMaxExtentSparse, and streamOptimized (compressed grains).

Virtual Disk Format 1.1, "Hosted Sparse Extent Header" and "Stream-Optimized
Compressed Sparse Extents": a 512-byte header, an optional embedded descriptor, a
grain directory of uint32 sectors of grain tables, grain tables of uint32 grain
sectors (0: not here; 1: a zero grain when the header's zeroed-GTE flag is set).
A streamOptimized extent sets the grain directory offset to GD_AT_END and keeps the
real header as a footer in the file's third-last sector; each grain there is a
marker (uint64 LBA, uint32 size) followed by deflate data.
"""
import os
import struct
import threading
import zlib
from array import array

from ..errors import CorruptDisk
from .runs import PRIME_TABLES, SECTOR, GrainMapped, check_geometry, check_sector

MAGIC = b"KDMV"
# struct SparseExtentHeader, little endian, packed (the 4-byte magic first)
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")
FLAG_REDUNDANT_GD = 0x2
FLAG_ZEROED_GTE = 0x4
FLAG_COMPRESSED = 0x10000
FLAG_MARKERS = 0x20000
GD_AT_END = 0xFFFFFFFFFFFFFFFF
COMPRESS_DEFLATE = 1
MARKER_FOOTER = 3
MAX_DESC_SECTORS = 2048         # 1 MiB of embedded descriptor at most
GRAIN_CACHE = 2 << 20           # bytes of decompressed grains kept per compressed extent (32 of 64 KiB)
MAX_COMPRESSED_GRAIN = 1 << 20  # bytes; qemu and VMware write 64 KiB
PRIME_READ = 256 << 10          # bytes of grain directory and tables a chain's layer reads at most at
                                # once, on first use (announced to the datastore when it is opened)


class SparseHeader:
    """The fields of a KDMV header that reading needs."""

    def __init__(self, raw, path):
        self.path = path
        if len(raw) < HEADER.size or raw[:4] != MAGIC:
            raise CorruptDisk(f"{path}: not a hosted sparse extent (no KDMV header)")
        (_, self.version, self.flags, self.capacity, self.grain_sectors, self.desc_offset, self.desc_size,
         self.gtes_per_gt, self.rgd_offset, self.gd_offset, self.overhead, _unclean, _eol,
         self.compress) = HEADER.unpack_from(raw)
        if self.version not in (1, 2, 3):
            raise CorruptDisk(f"{path}: unsupported hosted sparse version {self.version}")
        self.compressed = bool(self.flags & FLAG_COMPRESSED) or self.compress == COMPRESS_DEFLATE
        if self.compress not in (0, COMPRESS_DEFLATE):
            raise CorruptDisk(f"{path}: unknown compression algorithm {self.compress}")

    def descriptor_span(self):
        """(byte offset, byte length) of the embedded descriptor, or None."""
        if not self.desc_offset or not self.desc_size:
            return None
        if self.desc_size > MAX_DESC_SECTORS:
            raise CorruptDisk(f"{self.path}: embedded descriptor is too large")
        return check_sector(self.path, self.desc_offset, "embedded descriptor") * SECTOR, self.desc_size * SECTOR


class HostedSparseExtent(GrainMapped):
    """One KDMV file as an extent of ``sectors`` sectors."""

    def __init__(self, path, handle, sectors, header_raw=None, prime=False):
        """``prime``: take the grain directory and the tables after it in one read, from
        ``header_raw`` (the file's first bytes) if it holds them, else on first use."""
        self.path, self.handle = path, handle
        raw = header_raw if header_raw is not None else handle.pread(0, SECTOR)
        header = SparseHeader(raw, path)
        if header.gd_offset == GD_AT_END:
            header = self._footer(header)
        self.compressed = header.compressed
        if self.compressed and not header.flags & FLAG_MARKERS:
            raise CorruptDisk(f"{path}: compressed grains without markers are not supported")
        self.grain_size = header.grain_sectors * SECTOR
        self.entries = header.gtes_per_gt
        check_geometry(path, self.grain_size, self.entries, header.capacity * SECTOR)
        if self.compressed and self.grain_size > MAX_COMPRESSED_GRAIN:
            raise CorruptDisk(f"{path}: compressed grains of {self.grain_size} bytes are not supported")
        self.size, self.capacity = sectors * SECTOR, header.capacity
        if sectors > header.capacity:
            raise CorruptDisk(f"{path}: descriptor gives {sectors} sectors, the extent holds {header.capacity}")
        span = self.grain_size * self.entries
        self.n_tables = -(-header.capacity * SECTOR // span)
        # the primary directory, as qemu reads (the redundant one is a copy kept for repairs)
        if not header.gd_offset:
            raise CorruptDisk(f"{path}: no grain directory")
        if header.flags & FLAG_REDUNDANT_GD:
            check_sector(path, header.rgd_offset, "redundant grain directory")
        self.gd_offset, self.gd_entry_size = check_sector(path, header.gd_offset, "grain directory") * SECTOR, 4
        self._init_maps()
        if prime and not self.compressed:
            self._prime_from(header_raw or b"", header.overhead * SECTOR)
        self._grains = {}
        self._grain_lock = threading.Lock()

    def _footer(self, header):
        """streamOptimized: the header with the real grain directory is a footer before
        the end-of-stream marker (qemu writes it so, as the spec describes)."""
        size = _file_size(self.handle)
        if size is None or size < 3 * SECTOR:
            raise CorruptDisk(f"{self.path}: streamOptimized file without a footer")
        tail = self.handle.pread(size - 3 * SECTOR, 3 * SECTOR)
        marker_size, marker_type = struct.unpack_from("<II", tail, 8)
        footer = SparseHeader(tail[SECTOR:2 * SECTOR], self.path)
        if marker_size != 0 or marker_type != MARKER_FOOTER or footer.gd_offset == GD_AT_END:
            raise CorruptDisk(f"{self.path}: streamOptimized footer is missing or invalid")
        return footer

    def _prime_from(self, head, overhead):
        """qemu and VMware write the directory, then its tables in order, before the grains
        (``overhead``): one read of the directory and the first PRIME_TABLES tables after it
        (512 MiB of qemu's disks) serves a chain's first reads."""
        gd_end = self.gd_offset + self.n_tables * self.gd_entry_size
        if gd_end <= len(head):
            self._prime(head, 0)
        elif self.gd_offset < overhead and gd_end - self.gd_offset <= PRIME_READ:
            tables = min(self.n_tables, PRIME_TABLES) * self.entries * self.entry_size
            end = min(-(-gd_end // SECTOR) * SECTOR + tables, overhead, self.gd_offset + PRIME_READ)
            self.prime_later(self.gd_offset, max(end, gd_end) - self.gd_offset)

    def _table_offset(self, gd_entry):
        return gd_entry * SECTOR if gd_entry else None

    def _decode(self, raw):
        table = array("I")
        table.frombytes(raw)    # 1: a zero grain (without the zeroed-GTE flag it would point
        return table            # into the header, so it is corrupt; it reads as zeros too)

    def read_grain(self, offset):
        """The decompressed grain whose marker is at byte ``offset``."""
        data = self._grains.get(offset)
        if data is not None:
            return data
        # one read of the marker and as much as deflate makes of a grain at worst (stored
        # blocks of incompressible data add a few bytes per 16 KiB)
        head = self.handle.pread(offset, 12 + self.grain_size + self.grain_size // 1024 + 64)
        if len(head) < 12:
            raise CorruptDisk(f"{self.path}: compressed grain at {offset} is truncated")
        _lba, size = struct.unpack_from("<QI", head)
        if not 0 < size <= 2 * self.grain_size + 1024:
            raise CorruptDisk(f"{self.path}: compressed grain at {offset} has invalid size {size}")
        body = memoryview(head)[12:12 + size]          # no copy
        if len(body) < size:
            body = head[12:] + self.handle.pread(offset + len(head), 12 + size - len(head))
        try:
            data = zlib.decompressobj().decompress(body, self.grain_size)    # never more than a grain
        except zlib.error as err:
            raise CorruptDisk(f"{self.path}: compressed grain at {offset} is corrupt: {err}") from None
        if len(data) < self.grain_size:
            data += bytes(self.grain_size - len(data))  # a short last grain
        with self._grain_lock:
            if len(self._grains) >= max(1, GRAIN_CACHE // self.grain_size):
                self._grains.pop(next(iter(self._grains)), None)
            self._grains[offset] = data
        return data

    def close(self):
        self.handle.close()


def _file_size(handle):
    """A handle's file size: its own ``size``, fstat of its ``fd``, else found by probing."""
    size = getattr(handle, "size", None)
    if callable(size):
        size = size()
    if size is None and isinstance(getattr(handle, "fd", None), int):
        size = os.fstat(handle.fd).st_size
    if size is None:
        hi = SECTOR
        while handle.pread(hi, 1) and hi < 1 << 62:
            hi *= 2
        lo = hi // 2            # lo has a byte (or is 256), hi has none
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if handle.pread(mid, 1) else (lo, mid)
        size = hi
    return size
