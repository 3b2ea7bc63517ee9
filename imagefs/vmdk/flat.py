"""Flat extents: FLAT and VMFS (the data file is the disk, byte for byte) and ZERO.

monolithicFlat and twoGbMaxExtentFlat (``-f###`` files) use FLAT lines with a start
sector; ESXi's ``vmfs`` and ``vmfsThin`` disks use one VMFS line naming
``<name>-flat.vmdk`` (Virtual Disk Format 1.1, "Extent Descriptions"). A flat file
may be shorter than its extent (a thin or truncated copy): the rest reads as zeros.
"""
import os
import secrets

from .descriptor import Descriptor, ExtentLine
from .runs import DATA, SECTOR, ZERO, check_sector


class FlatExtent:
    compressed = False

    def __init__(self, path, handle, sectors, start_sector=0):
        self.path, self.handle = path, handle
        self.size = sectors * SECTOR
        self.start = check_sector(path, start_sector, "flat extent start") * SECTOR
        self._source = _ZeroPadded(path, handle)

    def runs(self, lo, hi):
        return [(lo, hi, DATA, self._source, self.start + lo)]

    def allocated(self):
        return [(0, self.size)]

    def close(self):
        self.handle.close()


class ZeroExtent:
    """A ZERO extent line: no file, all zeros."""
    path = None
    compressed = False

    def __init__(self, sectors):
        self.size = sectors * SECTOR

    def runs(self, lo, hi):
        return [(lo, hi, ZERO, None, 0)]

    def allocated(self):
        return [(0, self.size)]

    def close(self):
        pass


class _ZeroPadded:
    """Reads past the end of a flat file give zeros, as for a thin file's unwritten tail."""

    def __init__(self, path, handle):
        self.path, self.handle = path, handle

    def pread(self, offset, length):
        data = self.handle.pread(offset, length)
        return data if len(data) == length else data + bytes(length - len(data))


def write_vmfs_descriptor(path, flat_path, capacity):
    """Write at ``path`` the descriptor of a thin ``vmfs`` disk of ``capacity`` bytes
    whose extent is ``flat_path`` (same directory), or one ZERO extent when it is None.
    Returns the new disk's CID."""
    desc = Descriptor()
    desc.values = {"CID": secrets.token_hex(4), "parentCID": "ffffffff", "isNativeSnapshot": "no",
                   "createType": "vmfs"}
    desc.extents = [ExtentLine("RW", capacity // SECTOR, "VMFS", os.path.basename(flat_path)) if flat_path
                    else ExtentLine("RW", capacity // SECTOR, "ZERO")]
    cylinders = min(65535, capacity // (255 * 63 * SECTOR))
    desc.ddb = {"ddb.adapterType": "lsilogic", "ddb.geometry.cylinders": str(cylinders),
                "ddb.geometry.heads": "255", "ddb.geometry.sectors": "63",
                "ddb.longContentID": secrets.token_hex(16), "ddb.thinProvisioned": "1",
                "ddb.virtualHWVersion": "8"}
    with open(path, "w") as f:
        f.write(desc.render())
        f.flush()
        os.fsync(f.fileno())
    return desc.values["CID"]
