"""Writing a COWD extent (the VMFSSPARSE file of a vmfsSparse delta).

Layout written (Virtual Disk Format 1.1, "ESX Server Sparse Extent Header" and
"Grain Directory and Grain Tables" for ESX Server sparse extents): the 2048-byte
header at sector 0; the grain directory at sector 4 (one uint32 per 4096-grain
table, 0 for tables with no grain); the grain tables that have grains, 4096 uint32
entries each; then the grains in the order of the virtual disk, so that a run of
written grains is one run in the file. ``freeSector`` is the file's end. Grains are
one sector (512 bytes) by default, as ESXi's vmfsSparse redo logs use.
"""
import struct

from .cowd import FLAGS, GT_ENTRIES, HEADER_SIZE, MAGIC
from .runs import SECTOR
from .write_common import copy_ranges, grains_of

DEFAULT_GRAIN_SECTORS = 1
_HEAD = struct.Struct("<4sIIIIIII")


def write_cowd(out, capacity, ranges, source, grain_sectors=DEFAULT_GRAIN_SECTORS):
    """Write to file object ``out`` a COWD extent of ``capacity`` bytes holding the byte
    ``ranges`` (sorted, grain-aligned) whose data ``source.pread`` gives."""
    grain = grain_sectors * SECTOR
    if capacity % SECTOR or capacity // SECTOR >= 1 << 32:
        raise ValueError("a COWD extent holds whole sectors, at most 2 TiB")
    n_tables = -(-capacity // (grain * GT_ENTRIES))
    gd_sectors = -(-n_tables * 4 // SECTOR)
    grains = grains_of(ranges, grain)                   # virtual grain numbers, ascending
    tables = sorted({g // GT_ENTRIES for g in grains})
    gt_sectors = GT_ENTRIES * 4 // SECTOR
    first_gt = HEADER_SIZE // SECTOR + gd_sectors
    data_start = first_gt + len(tables) * gt_sectors
    gd = [0] * n_tables
    gts = {}
    for k, t in enumerate(tables):
        gd[t] = first_gt + k * gt_sectors
        gts[t] = [0] * GT_ENTRIES
    for n, g in enumerate(grains):
        gts[g // GT_ENTRIES][g % GT_ENTRIES] = data_start + n * grain_sectors
    end_sector = data_start + len(grains) * grain_sectors
    header = _HEAD.pack(MAGIC, 1, FLAGS, capacity // SECTOR, grain_sectors, HEADER_SIZE // SECTOR,
                        n_tables, end_sector)
    out.write(header.ljust(HEADER_SIZE, b"\0"))
    out.write(struct.pack(f"<{n_tables}I", *gd).ljust(gd_sectors * SECTOR, b"\0"))
    for t in tables:
        out.write(struct.pack(f"<{GT_ENTRIES}I", *gts[t]))
    copy_ranges(out, ranges, source)
    return end_sector * SECTOR
