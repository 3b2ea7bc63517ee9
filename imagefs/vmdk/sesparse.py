"""Space-efficient sparse extents (SEsparse): the SESPARSE extent of a seSparse delta.

VMware has not published this format; the structures are those qemu's block/vmdk.c
reads (and checks strictly), also described by dissect.hypervisor. All fields are
little-endian uint64. A constant header (magic 0xCAFEBABE, version 2.1, capacity,
grain size 8 sectors, grain table size 64 sectors, then offset/size pairs in sectors
of the volatile header, journal header, journal, grain directory, grain tables, free
bitmap, back map and grains), a volatile header (magic 0xCAFECAFE, replay_journal 0).

A grain directory entry is 0 (no table) or 0x1000000000000000 | table index; the
table lives at grain_tables_offset + index * grain_table_size. A grain table entry's
top nibble is its type: 0 not here, 1 unmapped (reads as zeros), 2 zero, 3 allocated
with a cluster number split as bits 0-47 = cluster >> 12 and bits 48-59 = cluster &
0xfff; the grain is at grains_offset + cluster * grain_size.
"""
import struct
from array import array

from ..errors import CorruptDisk
from .runs import SECTOR, GrainMapped, check_geometry, check_sector, progression, run_end

CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
VERSION = 0x0000000200000001
GRAIN_SECTORS = 8
GT_SECTORS = 64
CONST_HEADER = struct.Struct("<26Q")    # then 304 bytes of zero padding
VOLATILE_HEADER = struct.Struct("<4Q")  # magic, free_gt_number, next_txn_seq_number, replay_journal
GD_ALLOCATED = 0x1000000000000000
TYPE_MASK = 0xF000000000000000
T_UNMAPPED, T_ZERO, T_ALLOCATED = 0x1000000000000000, 0x2000000000000000, 0x3000000000000000


class SesparseHeader:
    FIELDS = ("magic", "version", "capacity", "grain_size", "grain_table_size", "flags",
              "reserved1", "reserved2", "reserved3", "reserved4",
              "volatile_header_offset", "volatile_header_size", "journal_header_offset",
              "journal_header_size", "journal_offset", "journal_size", "grain_dir_offset",
              "grain_dir_size", "grain_tables_offset", "grain_tables_size", "free_bitmap_offset",
              "free_bitmap_size", "backmap_offset", "backmap_size", "grains_offset", "grains_size")

    def __init__(self, raw, path):
        if len(raw) < CONST_HEADER.size:
            raise CorruptDisk(f"{path}: SEsparse header is truncated")
        for name, value in zip(self.FIELDS, CONST_HEADER.unpack_from(raw)):
            setattr(self, name, value)
        if self.magic != CONST_MAGIC:
            raise CorruptDisk(f"{path}: not an SEsparse extent (bad magic)")
        if self.version != VERSION:
            raise CorruptDisk(f"{path}: unsupported SEsparse version {self.version:#x}")
        if self.grain_size != GRAIN_SECTORS or self.grain_table_size != GT_SECTORS:
            raise CorruptDisk(f"{path}: unsupported SEsparse grain ({self.grain_size}) or "
                              f"grain table size ({self.grain_table_size})")
        if self.flags:
            raise CorruptDisk(f"{path}: unsupported SEsparse flags {self.flags:#x}")
        for name in ("volatile_header_offset", "grain_dir_offset", "grain_dir_size", "grain_tables_offset",
                     "grain_tables_size", "grains_offset"):
            check_sector(path, getattr(self, name), name.replace("_", " "))

    def pack(self):
        return CONST_HEADER.pack(*(getattr(self, n) for n in self.FIELDS)).ljust(SECTOR, b"\0")


def is_sesparse(raw):
    return len(raw) >= 8 and struct.unpack_from("<Q", raw)[0] == CONST_MAGIC


class SesparseExtent(GrainMapped):
    entry_size = 8

    def __init__(self, path, handle, sectors, header_raw=None):
        self.path, self.handle = path, handle
        raw = header_raw if header_raw is not None and len(header_raw) >= SECTOR else handle.pread(0, SECTOR)
        h = SesparseHeader(raw, path)
        vol = handle.pread(h.volatile_header_offset * SECTOR, VOLATILE_HEADER.size)
        if len(vol) < VOLATILE_HEADER.size:
            raise CorruptDisk(f"{path}: SEsparse volatile header is truncated")
        vmagic, _free_gt, _txn, replay = VOLATILE_HEADER.unpack(vol)
        if vmagic != VOLATILE_MAGIC:
            raise CorruptDisk(f"{path}: SEsparse volatile header has a bad magic")
        if replay:
            raise CorruptDisk(f"{path}: SEsparse journal needs replaying (not closed cleanly)")
        self.grain_size = GRAIN_SECTORS * SECTOR
        self.entries = GT_SECTORS * SECTOR // 8
        check_geometry(path, self.grain_size, self.entries, h.capacity * SECTOR)
        if sectors > h.capacity:
            raise CorruptDisk(f"{path}: descriptor gives {sectors} sectors, the extent holds {h.capacity}")
        self.size = sectors * SECTOR
        self.n_tables = -(-h.capacity * SECTOR // (self.grain_size * self.entries))
        if h.grain_dir_size * SECTOR // 8 < self.n_tables:
            raise CorruptDisk(f"{path}: SEsparse grain directory is too small for the capacity")
        self.gd_offset, self.gd_entry_size = h.grain_dir_offset * SECTOR, 8
        self._tables_at = h.grain_tables_offset * SECTOR
        self._n_gts = h.grain_tables_size // GT_SECTORS
        self._grains_at = h.grains_offset
        self._init_maps()

    def _table_offset(self, gd_entry):
        if gd_entry == 0:
            return None
        if gd_entry & 0xFFFFFFFF00000000 != GD_ALLOCATED or gd_entry & 0xFFFFFFFF >= self._n_gts:
            raise CorruptDisk(f"{self.path}: invalid SEsparse grain directory entry {gd_entry:#x}")
        return self._tables_at + (gd_entry & 0xFFFFFFFF) * GT_SECTORS * SECTOR

    def _decode(self, raw):
        """Entries to grain sectors (0 hole, 1 zero). Consecutive clusters are consecutive
        entries in steps of 1 << 48 until the low 12 bits wrap, so runs decode at once."""
        entries = array("Q")
        entries.frombytes(raw)
        out = array("Q", bytes(len(raw)))
        n, i, base = len(entries), 0, self._grains_at
        while i < n:
            e = entries[i]
            kind = e & TYPE_MASK
            if kind == T_ALLOCATED:
                cluster = ((e & 0x0FFF000000000000) >> 48) | ((e & 0x0000FFFFFFFFFFFF) << 12)
                j = run_end(entries, i, e, 1 << 48, min(n, i + 0x1000 - (cluster & 0xFFF)))
                first = base + cluster * GRAIN_SECTORS
                sectors = progression(first, GRAIN_SECTORS, j - i, 8)
                if sectors is None:
                    raise CorruptDisk(f"{self.path}: SEsparse grain beyond any file at entry {i}")
                out[i:j] = array("Q", sectors.to_bytes((j - i) * 8, "little"))
            elif kind in (T_ZERO, T_UNMAPPED) or e == 0:
                j = run_end(entries, i, e, 0, n)
                if e:
                    out[i:j] = array("Q", [1]) * (j - i)
            else:
                raise CorruptDisk(f"{self.path}: invalid SEsparse grain table entry {e:#x}")
            i = j
        return out

    def close(self):
        self.handle.close()
