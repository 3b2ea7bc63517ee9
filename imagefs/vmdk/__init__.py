"""Reading and writing VMDK disks and copy-on-write chains of them.

Readers, one module per extent format: hosted_sparse (KDMV: monolithicSparse,
twoGbMaxExtentSparse, streamOptimized), flat (FLAT, VMFS, ZERO), cowd (VMFSSPARSE),
sesparse (SESPARSE); descriptor parses and writes descriptors, hints resolves parent
hints, disk opens one disk, chain reads a whole chain. See docs/formats.md.
"""
from .chain import ChainFile, DiskChain  # noqa: F401
from .descriptor import NO_PARENT_CID  # noqa: F401
from .disk import Disk, DiskInfo, open_disk  # noqa: F401
from .runs import SECTOR  # noqa: F401
