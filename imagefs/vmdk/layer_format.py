"""The disk format a store writes its layers in, and the post-seal step that gives a
sealed layer that format.

A layer is written by qemu as a monolithicSparse delta (layer/writer.py). Once it is
sealed, ``seal_as`` rewrites it in the store's format: the grains it holds are known
from its grain tables, so they are copied into a COWD (vmfsSparse) or SEsparse
extent and a text descriptor replaces the monolithicSparse file under the same name
(atomically, so the name always holds a whole disk). The result is read back and
compared before the old file goes. ``seal_as`` also writes the parent hint the layer
must keep (the writer may have built it against a stand-in of its parent, see
qemu_view.py).
"""
import os
import secrets

from ..errors import InvalidInput, ToolFailed
from ..datastore.local import LocalReadHandle
from .descriptor import Descriptor, ExtentLine
from .disk import Disk
from .runs import DATA, HOLE, SECTOR, ZERO
from .write_cowd import write_cowd
from .write_sesparse import write_sesparse

DELTA_FORMATS = ("monolithicSparse", "vmfsSparse", "seSparse")
DEFAULT_FORMAT = "monolithicSparse"
_EXTENT = {"vmfsSparse": ("VMFSSPARSE", "-delta.vmdk"), "seSparse": ("SESPARSE", "-sesparse.vmdk")}
VERIFY_PIECE = 4 << 20


def check_disk_format(name):
    if name not in DELTA_FORMATS:
        raise InvalidInput(f"unknown disk format {name!r}: use {', '.join(DELTA_FORMATS)}")
    return name


def seal_as(child, disk_format, parent_hint):
    """Give the sealed monolithicSparse delta at host path ``child`` the format
    ``disk_format`` and the parent hint ``parent_hint``. Returns the extent files'
    host paths."""
    check_disk_format(disk_format)
    if disk_format == "monolithicSparse":
        _set_embedded_hint(child, parent_hint)
        return [child]
    old = Disk(child, host_opener)
    try:
        info = old.info
        data, zeros = _written(old)
        files = write_delta(child + ".descriptor", disk_format, old.size, data, zeros, _TopReader(old),
                            cid=info.cid, parent_cid=info.parent_cid, parent_hint=parent_hint,
                            extent_name=os.path.basename(child).removesuffix(".vmdk"))
        _verify(old, child + ".descriptor", data, zeros)
    finally:
        old.close()
    os.replace(child + ".descriptor", child)
    _fsync_dir(child)
    return [child, files[1]]


def write_delta(path, disk_format, capacity, data, zeros, source, *, cid, parent_cid, parent_hint,
                extent_name=None):
    """Write a ``disk_format`` delta (vmfsSparse or seSparse): its extent beside ``path``,
    named after ``extent_name`` (default: path's name), then the descriptor at ``path``.
    ``data`` and ``zeros`` are sorted byte ranges; ``source.pread`` reads the data."""
    etype, suffix = _EXTENT[disk_format]
    stem = extent_name or os.path.basename(path).removesuffix(".vmdk")
    extent = os.path.join(os.path.dirname(path), stem + suffix)
    tmp = f"{extent}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        if disk_format == "vmfsSparse":
            write_cowd(out, capacity, _merge(data + zeros), source)
        else:
            write_sesparse(out, capacity, data, source, zeros)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, extent)
    desc = Descriptor()
    desc.values = {"CID": cid, "parentCID": parent_cid, "isNativeSnapshot": "no",
                   "createType": disk_format, "parentFileNameHint": parent_hint}
    desc.extents = [ExtentLine("RW", capacity // SECTOR, etype, os.path.basename(extent))]
    # as ESXi writes a delta's: the disk's geometry and adapter live in its base
    desc.ddb = {"ddb.longContentID": secrets.token_hex(16)}
    if disk_format == "seSparse":
        desc.ddb["ddb.grain"] = "8"
    _write_atomic(path, desc.render().encode())
    return [path, extent]


def host_opener(path):
    """Open a host path as the disk modules name it (absolute paths come back without
    their leading slash from hint resolution)."""
    return LocalReadHandle("/" + path.lstrip("/"))


class _TopReader:
    """``pread`` of what one disk holds itself (zeros where it holds zero grains)."""

    def __init__(self, disk):
        self.disk = disk

    def pread(self, offset, length):
        return _read_top(self.disk, offset, length)


def _read_top(disk, offset, length):
    parts = []
    for lo, hi, kind, src, where in disk.runs(offset, offset + length):
        if kind == DATA:
            parts.append(src.pread(where, hi - lo))
        elif kind == HOLE:
            raise ToolFailed(f"{disk.path}: the layer does not hold {lo}-{hi}")
        else:
            parts.append(bytes(hi - lo))
    return b"".join(parts)


def _written(disk):
    """(data ranges, zero ranges) the disk holds itself."""
    data, zeros = [], []
    for lo, hi, kind, _, _ in disk.runs(0, disk.size):
        if kind in (DATA, ZERO):
            (data if kind == DATA else zeros).append((lo, hi))
    return data, zeros


def _verify(old, new_path, data, zeros):
    """Every byte the old disk held reads the same from the new one, and nothing else is held."""
    new = Disk(new_path, host_opener)
    try:
        if _merge(new.allocated()) != _merge(data + zeros):
            raise ToolFailed(f"{new_path}: the converted layer holds other grains than the original")
        for lo, hi in data + zeros:
            for pos in range(lo, hi, VERIFY_PIECE):
                n = min(VERIFY_PIECE, hi - pos)
                if _read_top(new, pos, n) != _read_top(old, pos, n):
                    raise ToolFailed(f"{new_path}: the converted layer differs at offset {pos}")
    finally:
        new.close()


def _merge(ranges):
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _set_embedded_hint(path, hint):
    """Rewrite the parent hint inside a monolithicSparse file's embedded descriptor."""
    from .hosted_sparse import SparseHeader
    with open(path, "r+b") as f:
        header = SparseHeader(f.read(SECTOR), path)
        off, size = header.descriptor_span()
        f.seek(off)
        raw = f.read(size)
        text = raw.split(b"\0", 1)[0].decode()
        lines = [line for line in text.splitlines() if not line.startswith("parentFileNameHint")]
        if any(line.startswith("parentCID") and not line.endswith("ffffffff") for line in lines):
            at = next(i for i, line in enumerate(lines) if line.startswith("createType")) + 1
            lines.insert(at, f'parentFileNameHint="{hint}"')
        new = ("\n".join(lines) + "\n").encode()
        if new == raw[:len(new)] and raw[len(new):len(new) + 1] in (b"\0", b""):
            return
        if len(new) > size:
            raise ToolFailed(f"{path}: the parent hint does not fit in the embedded descriptor")
        f.seek(off)
        f.write(new.ljust(size, b"\0"))
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
