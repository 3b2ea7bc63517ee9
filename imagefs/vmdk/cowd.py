"""ESX Server sparse extents (``COWD``): the VMFSSPARSE extent of a vmfsSparse delta.

Virtual Disk Format 1.1, "ESX Server Sparse Extent Header": a 2048-byte header
(magic, version 1, flags, capacity and grain size in sectors, grain directory
sector, number of directory entries, next free sector, parent/geometry union,
generations, name, description), a grain directory of uint32 sectors of grain
tables, and grain tables of 4096 uint32 grain sectors (0: not here).
"""
import struct
from array import array

from ..errors import CorruptDisk
from .runs import SECTOR, GrainMapped, check_geometry

MAGIC = b"COWD"
HEADER = struct.Struct("<4sIIIIIII")     # magic .. freeSector; the rest is the union and names
HEADER_SIZE = 2048
GT_ENTRIES = 4096
FLAGS = 3                               # as ESX writes them (libvmdk's notes)


class CowdExtent(GrainMapped):
    def __init__(self, path, handle, sectors, header_raw=None):
        self.path, self.handle = path, handle
        raw = header_raw if header_raw is not None else handle.pread(0, HEADER.size)
        if len(raw) < HEADER.size or raw[:4] != MAGIC:
            raise CorruptDisk(f"{path}: not an ESX sparse extent (no COWD header)")
        _, version, _flags, capacity, grain_sectors, gd_sector, gd_entries, _free = HEADER.unpack_from(raw)
        if version != 1:
            raise CorruptDisk(f"{path}: unsupported COWD version {version}")
        self.grain_size = grain_sectors * SECTOR
        self.entries = GT_ENTRIES
        check_geometry(path, self.grain_size, self.entries, capacity * SECTOR)
        if sectors > capacity:
            raise CorruptDisk(f"{path}: descriptor gives {sectors} sectors, the extent holds {capacity}")
        self.size = sectors * SECTOR
        needed = -(-capacity * SECTOR // (self.grain_size * GT_ENTRIES))
        if gd_entries < needed or not gd_sector:
            raise CorruptDisk(f"{path}: grain directory has {gd_entries} entries, the capacity needs {needed}")
        self.n_tables = needed
        self.gd_offset, self.gd_entry_size = gd_sector * SECTOR, 4
        self._init_maps()

    def _table_offset(self, gd_entry):
        return gd_entry * SECTOR if gd_entry else None

    def _decode(self, raw):
        table = array("I")
        table.frombytes(raw)    # an entry 1 (header space, so corrupt) reads as zeros
        return table

    def close(self):
        self.handle.close()
