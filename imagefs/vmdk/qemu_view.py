"""A parent chain that qemu 7.2 can open, for writing a new layer on any readable image.

qemu opens a VMDK chain by itself when every disk's createType is one it knows,
every extent line is RW and of a type it reads (it skips ZERO and RDONLY lines,
shrinking the disk), and each parent hint is a path it can resolve (relative names:
yes; ``/vmfs/volumes/...`` and ``[datastore] path``: no). For any other chain,
``qemu_parent`` writes stand-in descriptors in a work directory: the same CIDs, the
extents by host path relative to that directory (ZERO extents as FLAT extents on an
empty sparse file), and each parent hint naming the next stand-in. Relative names, as
qemu resolves them, keep the stand-ins readable by imagefs's own reader too, with the
host's "/" as the datastore (the writer's read-back, layer/verify.py). qemu then reads the very same bytes
through them; the new layer's real parent hint is written when it is sealed
(layer_format.seal_as).
"""
import os
import shutil
import tempfile
from contextlib import contextmanager

from .descriptor import Descriptor, ExtentLine

QEMU_CREATE_TYPES = ("monolithicSparse", "streamOptimized", "monolithicFlat", "vmfs", "vmfsSparse",
                     "seSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
_CREATE_FOR_EXTENT = {"SPARSE": "twoGbMaxExtentSparse", "VMFSSPARSE": "vmfsSparse", "SESPARSE": "seSparse"}


def qemu_can_open(chain):
    for disk in chain.layers:
        info = disk.info
        if info.create_type not in QEMU_CREATE_TYPES:
            return False
        if any(line.access != "RW" or line.type == "ZERO" for line in info.descriptor.extents):
            return False
        hint = info.parent_hint
        if info.has_parent and (hint.startswith("/") or hint.startswith("[")):
            return False
    return True


@contextmanager
def qemu_parent(chain, local_path, workdir=None):
    """Yield a host path of a disk qemu can open as the parent of a new layer, whose
    chain reads as ``chain`` does. ``local_path`` maps datastore paths to host paths."""
    if qemu_can_open(chain):
        yield local_path(chain.layers[0].path)
        return
    work = tempfile.mkdtemp(prefix="imagefs-parent-", dir=workdir or os.environ.get("IMAGEFS_WORKDIR"))
    try:
        names = [os.path.join(work, f"layer{i}.vmdk") for i in range(len(chain.layers))]
        for i, disk in enumerate(chain.layers):
            desc = _stand_in(disk, local_path, work, i)
            if i + 1 < len(names):
                desc.values["parentFileNameHint"] = os.path.basename(names[i + 1])
            with open(names[i], "w") as f:
                f.write(desc.render())
        yield names[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stand_in(disk, local_path, work, index):
    info = disk.info
    desc = Descriptor()
    files = iter(info.extent_files)
    kinds = set()
    for n, line in enumerate(info.descriptor.extents):
        if line.type == "ZERO":
            zero = os.path.join(work, f"layer{index}-zero{n}.raw")
            with open(zero, "wb") as f:
                f.truncate(line.sectors * 512)
            desc.extents.append(ExtentLine("RW", line.sectors, "FLAT", os.path.basename(zero), 0))
            continue
        host = os.path.relpath(local_path(next(files)), work)
        if line.type in ("FLAT", "VMFS"):
            desc.extents.append(ExtentLine("RW", line.sectors, "FLAT", host, line.offset))
        else:
            kinds.add(line.type)
            desc.extents.append(ExtentLine("RW", line.sectors, line.type, host))
    create = _CREATE_FOR_EXTENT[kinds.pop()] if len(kinds) == 1 else "monolithicFlat"
    desc.values = {"CID": info.cid, "parentCID": info.parent_cid, "createType": create}
    return desc
