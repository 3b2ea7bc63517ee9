"""The layer disks a process reads, shared by all its chains, in bounded memory and descriptors.

Images of one store share their ancestors: a mount reading 1,000 images of a store
that grew one layer at a time would otherwise parse the same base disk 1,000 times
and hold a descriptor per layer of every chain (a chain 200 deep: 200 descriptors).
Sealed layer files never change, so:

- ``disk(path)`` hands every chain the same ``vmdk.Disk`` for the same file (its
  parsed descriptor and cached grain tables); at most MAX_DISKS are kept, the least
  recently asked for go (a chain still holding one keeps using it);
- the files of those disks are read through ``PooledFile``s: at most MAX_OPEN
  descriptors are open at once, the least recently read one is closed, and a file is
  opened again on its next read. A reopened file must be the very file first opened
  (its identity, e.g. device, inode, size and mtime); one deleted or replaced
  meanwhile reads as NotFound (its image was deleted while in use).

A descriptor dropped from the pool is closed by the last reader holding it (the
handle closes itself when no longer referenced), so a read in flight never sees its
descriptor closed or reused under it.

A file is shared only when its handle says who it is (``ReadHandle.identity()``);
handles of backends that hold no descriptors and cannot say (vSphere's block cache)
are used as they are, one Disk per chain.
"""
import os
import threading
from collections import OrderedDict

from .errors import NotFound
from .vmdk import Disk

MAX_OPEN = 256          # descriptors of layer files open at once
MAX_DISKS = 1024        # parsed disks kept for chains to share


class PooledFile:
    """One layer file: ``pread`` opens it again when the pool closed it."""
    __slots__ = ("path", "identity", "handle", "retired", "_pool")

    def __init__(self, pool, path, handle, identity):
        self._pool = pool
        self.path = path
        self.identity = identity
        self.handle = handle
        self.retired = False        # its Disk no longer reads it

    def pread(self, offset, length):
        return self._handle().pread(offset, length)

    def advise(self, offset, length):
        handle = self.handle         # a hint: a closed file is not opened for it
        if handle is not None:
            handle.advise(offset, length)

    def size(self):
        """The file's size (streamOptimized extents look for their footer at the end)."""
        handle = self._handle()
        size = getattr(handle, "size", None)
        if callable(size):
            return size()
        fd = getattr(handle, "fd", None)
        return os.fstat(fd).st_size if isinstance(fd, int) else None

    def _handle(self):
        handle = self.handle
        if handle is None:
            return self._pool._reopen(self)
        self._pool._touch(self)
        return handle

    def close(self):
        """Its Disk is done with it (a descriptor file read, a chain's own Disk closed)."""
        self.retired = True
        self._pool._drop(self)


class DiskPool:
    """``DiskPool(open_read, names)``: ``open_read(path)`` opens a datastore file for reading
    (``Datastore.open_read``); ``names`` are the datastore's hint names (vmdk/hints.py)."""

    def __init__(self, open_read, names=None, max_open=MAX_OPEN, max_disks=MAX_DISKS):
        self._open_read = open_read
        self._names = names
        self.max_open = max_open
        self.max_disks = max_disks
        self._lock = threading.Lock()
        self._open = OrderedDict()      # PooledFile -> None, least recently read first
        self._disks = OrderedDict()     # path -> (identity, Disk, its PooledFile), least recently asked first

    # --- disks ---------------------------------------------------------------------------
    def disk(self, path):
        """The shared Disk of the file at ``path`` (datastore-relative), or None when its
        backend cannot tell one file from another (the caller opens a Disk of its own).
        Opens the file once to know it is the same file as the Disk's."""
        try:
            handle = self._open_read(path)
        except OSError:
            return None             # the caller's own Disk says what is wrong, as for any chain
        identity = _identity(handle)
        if identity is None:
            handle.close()
            return None
        with self._lock:
            known = self._disks.get(path)
            if known is not None and known[0] == identity:
                self._disks.move_to_end(path)
                own = known[2]
                if own.handle is None and not own.retired:
                    own.handle = handle     # the descriptor just opened serves the next reads
                    self._enter(own)
                return known[1]
            if known is not None:           # the file was replaced: a new image under the old name
                self._drop_locked(known[2])
        own = PooledFile(self, path, handle, identity)
        with self._lock:
            self._enter(own)
        disk = Disk(path, lambda p: own if p == path else self.file(p), self._names)
        with self._lock:
            self._disks[path] = (identity, disk, own)
            self._disks.move_to_end(path)
            while len(self._disks) > self.max_disks:
                self._disks.popitem(last=False)
        return disk

    def file(self, path):
        """A PooledFile of ``path`` (a handle as is where the backend cannot say who a file is)."""
        handle = self._open_read(path)
        identity = _identity(handle)
        if identity is None:
            return handle
        f = PooledFile(self, path, handle, identity)
        with self._lock:
            self._enter(f)
        return f

    def forget(self, prefix):
        """Drop the disks and descriptors of files under ``prefix`` (a deleted image's directory)."""
        prefix = prefix.rstrip("/") + "/"
        with self._lock:
            for path in [p for p in self._disks if p.startswith(prefix)]:
                del self._disks[path]
            for f in [f for f in self._open if f.path.startswith(prefix)]:
                self._drop_locked(f)

    def close(self):
        with self._lock:
            self._disks.clear()
            for f in self._open:
                f.handle = None
            self._open.clear()

    @property
    def open_files(self):
        """Descriptors the pool holds open now."""
        return len(self._open)

    @property
    def kept_disks(self):
        return len(self._disks)

    # --- descriptors ---------------------------------------------------------------------
    def _drop(self, f):
        with self._lock:
            self._drop_locked(f)

    def _drop_locked(self, f):
        self._open.pop(f, None)
        f.handle = None             # closed by its last reader (handles close when dropped)

    def _enter(self, f):
        self._open[f] = None
        self._open.move_to_end(f)
        while len(self._open) > self.max_open:
            old, _ = self._open.popitem(last=False)
            old.handle = None

    def _touch(self, f):
        with self._lock:
            if f in self._open:
                self._open.move_to_end(f)

    def _reopen(self, f):
        with self._lock:
            if f.handle is None:
                # (a retired file read again: a chain still holds the Disk that closed it)
                try:
                    handle = self._open_read(f.path)
                except FileNotFoundError:
                    raise NotFound(f"{f.path}: deleted while its image was in use") from None
                if _identity(handle) != f.identity:
                    handle.close()
                    raise NotFound(f"{f.path}: replaced while its image was in use")
                f.handle = handle
            handle = f.handle
            self._enter(f)
        return handle


def _identity(handle):
    identity = getattr(handle, "identity", None)
    return identity() if identity is not None else None
