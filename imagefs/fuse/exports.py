"""export/<ancestor>.tar: a diff of two sealed images, made while it is read.

``export_diff`` runs in a worker thread and hands chunks to the reader through a
small bounded channel (the thread waits while the reader is behind), so memory
stays at a few MiB whatever the layer's size. Reads go front to back; the last
``WINDOW`` bytes before the read position stay available for the short backward
seeks of format probes (Python's tarfile, file(1)); further back is an error
(ESPIPE), never wrong data. A read far ahead makes the stream up to there but
keeps only that window of what it skipped (a 1-byte pread at 1 TiB costs time,
not memory).

Each open export costs a worker thread and those few MiB, so ``ExportLimits``
bounds how many can be open at once, per mount and per user (EMFILE beyond).
"""
import logging

import trio

from ..errors import CorruptDisk, NotFound
from .errors import Canceled, TooManyOpen, Unseekable

log = logging.getLogger("imagefs.fuse.exports")

WINDOW = 1 << 20
CHUNK = 1 << 20        # what the producer batches before waking the reader
QUEUE = 2              # chunks in flight


class ExportStream:
    def __init__(self, make_chunks, nursery, name):
        self._make_chunks = make_chunks   # () -> iterator of bytes; runs in the worker thread
        self._nursery = nursery
        self.name = name
        self._send, self._recv = trio.open_memory_channel(QUEUE)
        self._data = bytearray()          # stream bytes from offset _base on
        self._base = 0
        self._eof = False
        self._error = None
        self._started = False
        self._lock = trio.Lock()

    async def read(self, off, size):
        async with self._lock:
            if not self._started:
                self._started = True
                self._nursery.start_soon(self._produce_in_thread)
            if off < self._base:
                raise Unseekable(f"{self.name}: an export is read front to back "
                                 f"(offset {off} is more than {WINDOW} bytes behind)")
            end = off + size
            while self._base + len(self._data) < end and not self._eof:
                try:
                    self._data += await self._recv.receive()
                except trio.EndOfChannel:
                    self._eof = True
                except trio.ClosedResourceError:
                    raise Canceled(f"{self.name}: export stopped: imagefs is unmounting") from None
                self._forget_before(off - WINDOW)     # what a skip passes over is not kept
            if self._error is not None and self._base + len(self._data) <= off:
                failure = CorruptDisk(f"{self.name}: export failed: {self._error}")     # EIO
                if isinstance(self._error, NotFound):
                    failure.errno = NotFound.errno      # its image was deleted meanwhile: ENOENT
                raise failure
            start = max(0, off - self._base)
            out = bytes(self._data[start: max(start, end - self._base)])
            self._forget_before(off + len(out) - WINDOW)
            return out

    def _forget_before(self, pos):
        """Drop the bytes before stream offset ``pos`` (``_base + len(_data)`` stays what was made)."""
        n = min(pos - self._base, len(self._data))
        if n > 0:
            del self._data[:n]
            self._base += n

    def close(self):
        """The reader is gone: the producer stops at its next chunk."""
        self._recv.close()

    async def _produce_in_thread(self):
        await trio.to_thread.run_sync(self._produce, limiter=trio.CapacityLimiter(1))

    def _produce(self):
        chunks = None
        batch = bytearray()
        try:
            chunks = self._make_chunks()
            for chunk in chunks:
                batch += chunk
                if len(batch) >= CHUNK:
                    trio.from_thread.run(self._send.send, bytes(batch))
                    batch.clear()
            if batch:
                trio.from_thread.run(self._send.send, bytes(batch))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass                           # the reader closed the file early
        except Exception as e:             # noqa: B902 - the reader gets EIO, the log the reason
            self._error = e
            log.error("export %s failed: %s", self.name, e)
        finally:
            if chunks is not None and hasattr(chunks, "close"):
                chunks.close()
            trio.from_thread.run_sync(self._send.close)


class ExportLimits:
    """How many exports may be open at once: in the whole mount and per user (uid)."""

    def __init__(self, per_mount=32, per_user=8):
        self.per_mount, self.per_user = per_mount, per_user
        self._by_uid = {}

    @property
    def open(self):
        return sum(self._by_uid.values())

    def acquire(self, uid):
        if self.open >= self.per_mount:
            raise TooManyOpen(f"{self.per_mount} exports are open in this mount (max_exports)")
        if self._by_uid.get(uid, 0) >= self.per_user:
            raise TooManyOpen(f"uid {uid} has {self.per_user} exports open (max_exports_per_user)")
        self._by_uid[uid] = self._by_uid.get(uid, 0) + 1

    def release(self, uid):
        left = self._by_uid.get(uid, 0) - 1
        if left > 0:
            self._by_uid[uid] = left
        else:
            self._by_uid.pop(uid, None)
