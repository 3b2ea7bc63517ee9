"""Open handles: files of image trees, small generated files, directory listings.

Every handle answers ``read``/``write``/``flush``/``release``; import and export
handles (imports.py, exports.py) answer the same.
"""
import itertools

from ..errors import ReadOnly
from .nodes import LOW_MASK


class HandleTable:
    def __init__(self):
        self._handles = {}
        self._numbers = itertools.count(1)

    def add(self, handle):
        fh = next(self._numbers)
        self._handles[fh] = handle
        return fh

    def __getitem__(self, fh):
        return self._handles[fh]

    def pop(self, fh):
        return self._handles.pop(fh, None)

    def values(self):
        return list(self._handles.values())


class Handle:
    async def read(self, off, size):
        raise ReadOnly("not readable")

    async def write(self, off, data):
        raise ReadOnly("read-only")

    async def flush(self):
        pass

    async def truncate(self, size):
        raise ReadOnly("read-only")

    def release(self):
        pass


class TreeFile(Handle):
    """A file of an image tree. Reads are cheap local preads through a cached extent map,
    so they run inline on the event loop (a thread hop would cost more than the read)."""

    def __init__(self, ns, ino, tree, prefetcher):
        self._ino = ino
        self._tree = tree
        self._ext4_ino = ino & LOW_MASK
        self._size = tree.stat(self._ext4_ino).size
        self._prefetcher = prefetcher
        self._ns = ns
        self.idx = ino >> 32
        ns.hold(self.idx)

    async def read(self, off, size):
        data = self._tree.read(self._ext4_ino, off, size)
        self._prefetcher.after_read(self._ino, self._tree, self._ext4_ino, self._size, off)
        return data

    def release(self):
        self._ns.release(self.idx)


class BytesFile(Handle):
    """A generated file (meta/<key>, info.json, <new-id>.error), its bytes fixed at open."""

    def __init__(self, data):
        self._data = data

    async def read(self, off, size):
        return self._data[off: off + size]


class ExportFileHandle(Handle):
    def __init__(self, stream, on_close):
        self._stream = stream
        self._on_close = on_close

    async def read(self, off, size):
        return await self._stream.read(off, size)

    def release(self):
        self._stream.close()
        self._on_close(self._stream)


class DirHandle:
    """A directory listing, taken on the first readdir so offsets stay valid while it is read."""

    def __init__(self, ino):
        self.ino = ino
        self.entries = None

    def release(self):
        pass
