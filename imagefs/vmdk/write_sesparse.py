"""Writing an SEsparse extent (the SESPARSE file of a seSparse delta).

Layout written, in sectors (the structures qemu's block/vmdk.c reads; see sesparse.py):
the constant header at 0, the volatile header at 1, a journal header at 2 and an empty
journal at 2048 (both zero: no transaction is pending), the grain directory at 4096,
then, each starting on a 1 MiB boundary, the grain tables that have grains (4096
uint64 entries, 16 MiB of disk each), the free bitmap (one bit per grain slot, set for
the slots in use), the back map (per grain slot, its virtual grain number) and the
4 KiB grains in the order of the virtual disk. Zero runs are written as zero-grain
entries (no data).
"""
import struct

from .runs import SECTOR
from .sesparse import (CONST_MAGIC, GD_ALLOCATED, GRAIN_SECTORS, GT_SECTORS, T_ALLOCATED, T_ZERO,
                       VERSION, VOLATILE_HEADER, VOLATILE_MAGIC, SesparseHeader)
from .write_common import copy_ranges, grains_of

GRAIN = GRAIN_SECTORS * SECTOR
GT_ENTRIES = GT_SECTORS * SECTOR // 8
ALIGN = 2048                    # sectors: regions start on 1 MiB


def _align(sector):
    return -(-sector // ALIGN) * ALIGN


def write_sesparse(out, capacity, ranges, source, zero_ranges=()):
    """Write to file object ``out`` an SEsparse extent of ``capacity`` bytes holding the
    byte ``ranges`` (sorted, 4 KiB-aligned, data from ``source.pread``) and reading
    ``zero_ranges`` as zeros."""
    if capacity % SECTOR:
        raise ValueError("an SEsparse extent holds whole sectors")
    n_tables = -(-capacity // (GRAIN * GT_ENTRIES))
    data_grains = grains_of(ranges, GRAIN)
    zero_grains = grains_of(zero_ranges, GRAIN)
    tables = sorted({g // GT_ENTRIES for g in data_grains + zero_grains})
    gt_index = {t: k for k, t in enumerate(tables)}
    h = SesparseHeader.__new__(SesparseHeader)
    for name in SesparseHeader.FIELDS:
        setattr(h, name, 0)
    h.magic, h.version, h.capacity = CONST_MAGIC, VERSION, capacity // SECTOR
    h.grain_size, h.grain_table_size = GRAIN_SECTORS, GT_SECTORS
    h.volatile_header_offset, h.volatile_header_size = 1, 1
    h.journal_header_offset, h.journal_header_size = 2, 2
    h.journal_offset, h.journal_size = ALIGN, ALIGN
    h.grain_dir_offset = 2 * ALIGN
    h.grain_dir_size = max(1, -(-n_tables * 8 // SECTOR))
    h.grain_tables_offset = _align(h.grain_dir_offset + h.grain_dir_size)
    h.grain_tables_size = len(tables) * GT_SECTORS
    n = len(data_grains)
    h.free_bitmap_offset = _align(h.grain_tables_offset + h.grain_tables_size)
    h.free_bitmap_size = max(1, -(-n // (8 * SECTOR)))
    h.backmap_offset = _align(h.free_bitmap_offset + h.free_bitmap_size)
    h.backmap_size = max(1, -(-n * 8 // SECTOR))
    h.grains_offset = _align(h.backmap_offset + h.backmap_size)
    h.grains_size = n * GRAIN_SECTORS

    gd = bytearray(h.grain_dir_size * SECTOR)
    for t, k in gt_index.items():
        struct.pack_into("<Q", gd, t * 8, GD_ALLOCATED | k)
    gts = bytearray(h.grain_tables_size * SECTOR)
    for g in zero_grains:
        struct.pack_into("<Q", gts, (gt_index[g // GT_ENTRIES] * GT_ENTRIES + g % GT_ENTRIES) * 8, T_ZERO)
    for cluster, g in enumerate(data_grains):
        entry = T_ALLOCATED | ((cluster & 0xFFF) << 48) | (cluster >> 12)
        struct.pack_into("<Q", gts, (gt_index[g // GT_ENTRIES] * GT_ENTRIES + g % GT_ENTRIES) * 8, entry)
    bitmap = bytearray(h.free_bitmap_size * SECTOR)
    full, rest = divmod(n, 8)
    bitmap[:full] = b"\xff" * full
    if rest:
        bitmap[full] = (1 << rest) - 1
    backmap = struct.pack(f"<{n}Q", *data_grains).ljust(h.backmap_size * SECTOR, b"\0")
    volatile = VOLATILE_HEADER.pack(VOLATILE_MAGIC, len(tables), 0, 0).ljust(SECTOR, b"\0")

    def put(sector, blob):
        out.seek(sector * SECTOR)
        out.write(blob)

    put(0, h.pack())
    put(h.volatile_header_offset, volatile)
    put(h.grain_dir_offset, bytes(gd))
    put(h.grain_tables_offset, bytes(gts))
    put(h.free_bitmap_offset, bytes(bitmap))
    put(h.backmap_offset, backmap)
    out.seek(h.grains_offset * SECTOR)
    copy_ranges(out, ranges, source)
    end = (h.grains_offset + h.grains_size) * SECTOR
    out.truncate(end)
    return end
