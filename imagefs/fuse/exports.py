"""export/<ancestor>.tar: a diff of two sealed images, made while it is read.

``export_diff`` runs in a worker thread and hands chunks to the reader through a
small bounded channel (the thread waits while the reader is behind), so memory
stays at a few MiB whatever the layer's size. Reads go front to back; the last
``WINDOW`` bytes stay available for the short backward seeks of format probes
(Python's tarfile, file(1)); further back is an error (ESPIPE), never wrong data.
"""
import logging

import trio

from ..errors import CorruptDisk
from .errors import Canceled, Unseekable

log = logging.getLogger("imagefs.fuse.exports")

WINDOW = 1 << 20
CHUNK = 1 << 20        # what the producer batches before waking the reader
QUEUE = 4              # chunks in flight


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
            if self._error is not None and self._base + len(self._data) <= off:
                raise CorruptDisk(f"{self.name}: export failed: {self._error}")
            out = bytes(self._data[off - self._base: end - self._base])
            behind = off + len(out) - WINDOW - self._base
            if behind > 0:
                del self._data[:behind]
                self._base += behind
            return out

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
