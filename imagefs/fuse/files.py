"""Open handles: files of image trees, small generated files, exports; directory listings being read.

Every handle answers ``read``/``write``/``flush``/``truncate``/``release`` and says
how the kernel may cache it (``direct_io``, ``keep_cache``); import handles
(imports.py) answer the same.
"""
import itertools
from collections import OrderedDict

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
        self._ns.prefetcher.after_read(self._ino, self._tree, self._ext4_ino, self._size, off, len(data))
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


class Listings:
    """Directory listings being read, by the directory's inode number.

    A reading starts at offset 0 with a listing taken then; the readdir calls that
    continue it read the same listing, so their offsets stay valid while the directory
    changes. Its end (the call past the last entry) drops it; readings left half-way
    are dropped oldest first."""
    KEEP = 64

    def __init__(self):
        self._listings = OrderedDict()

    def start(self, ino, entries):
        self._listings[ino] = entries
        self._listings.move_to_end(ino)
        while len(self._listings) > self.KEEP:
            self._listings.popitem(last=False)

    def continued(self, ino):
        """The listing a reading of ``ino`` started, or None (dropped: the caller lists again)."""
        return self._listings.get(ino)

    def end(self, ino):
        self._listings.pop(ino, None)
