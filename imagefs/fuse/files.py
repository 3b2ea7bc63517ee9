"""Open handles: files of image trees, small generated files, exports, directory listings.

Every handle answers ``read``/``write``/``flush``/``truncate``/``release`` and says
how the kernel may cache it (``direct_io``, ``keep_cache``); import handles
(imports.py) answer the same.
"""
import itertools

from ..errors import ReadOnly
from .exports import ExportLimits, ExportStream


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

    def get(self, fh):
        return self._handles.get(fh)

    def pop(self, fh):
        return self._handles.pop(fh, None)

    def values(self):
        return list(self._handles.values())


class Handle:
    direct_io = False       # True: every read and write goes to the daemon, uncached
    keep_cache = True       # False: the kernel drops cached pages of the file at open

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

    def __init__(self, ns, idx, ino, tree, ext4_ino, size):
        self._ns = ns
        self.idx = idx
        self._ino = ino
        self._tree = tree
        self._ext4_ino = ext4_ino
        self._size = size
        ns.hold(idx)

    async def read(self, off, size):
        data = self._tree.read(self._ext4_ino, off, size)
        self._ns.prefetcher.after_read(self._ino, self._tree, self._ext4_ino, self._size, off)
        return data

    def release(self):
        self._ns.release(self.idx)


class BytesFile(Handle):
    """A generated file (meta/<key>, info.json, <new-id>.error), its bytes fixed at open.
    A ``volatile`` one (its size changes) is read uncached, so a stale size never clips it."""

    def __init__(self, data, volatile=False):
        self._data = data
        self.direct_io = volatile
        self.keep_cache = not volatile

    async def read(self, off, size):
        return self._data[off: off + size]


class ExportFileHandle(Handle):
    direct_io = True
    keep_cache = False

    def __init__(self, stream, on_close):
        self._stream = stream
        self._on_close = on_close

    async def read(self, off, size):
        return await self._stream.read(off, size)

    def release(self):
        self._stream.close()
        self._on_close(self._stream)


class Exports:
    """The export streams of the mount: produced in its nursery, stopped when it goes, and
    bounded in number per mount and per user (``ExportLimits``)."""

    def __init__(self, limits=None):
        self.nursery = None         # set when the mount starts serving
        self.limits = limits or ExportLimits()
        self._streams = set()

    def open(self, make_chunks, name, uid=0, on_close=None):
        """A handle on a new stream; ``on_close()`` runs when it is released."""
        self.limits.acquire(uid)
        stream = ExportStream(make_chunks, self.nursery, name)
        self._streams.add(stream)

        def closed(stream):
            self._streams.discard(stream)
            self.limits.release(uid)
            if on_close is not None:
                on_close()
        return ExportFileHandle(stream, closed)

    def close_all(self):
        for stream in list(self._streams):
            stream.close()


class DirHandle:
    """A directory listing, taken on the first readdir so offsets stay valid while it is read."""

    def __init__(self, node):
        self.node = node
        self.entries = None

    def release(self):
        pass
