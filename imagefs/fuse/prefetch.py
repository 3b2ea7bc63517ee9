"""Read-ahead and read-around for image files.

Image files never change, which allows two things a FUSE daemon usually cannot do:

- Sequential readers (each read starts where the last one of the file ended, or at 0)
  are already served ahead of time by the kernel's FUSE read-ahead; what they wait for
  is the disk under the layer files. So the layer-file bytes of the rest of the reader's
  window and of the AHEAD windows after it are announced to the kernel (``posix_fadvise``
  WILLNEED through the disk chain), which reads them in the background while the loop
  answers the reads before them. The current window counts too: without it the first
  requests of a file each waited for a cold read of the layer file (30-40 ms per MiB).
- Random readers find the rest of the file's 4 MiB window pushed into the kernel's page
  cache (FUSE notify_store, cheap local preads), so their next pages are cached
  instead of costing a round trip through the daemon for every 4 KiB.

Both run on one worker thread, never on the event loop: the kernel may have to wait
for a page that a read in flight holds locked, and only the loop can answer that read.
Pushing the window of a sequential reader would compete with the kernel's own
read-ahead for the same pages (measured: the first cold read of a file got slower).
"""
import logging
import queue
import threading
import time
from collections import OrderedDict

import pyfuse3

log = logging.getLogger("imagefs.fuse")

WINDOW = 4 << 20
AHEAD = 4                     # windows announced ahead of a sequential reader
MIN_FILE = 256 << 10          # smaller files are covered by the kernel's own readahead
_REMEMBERED = 1 << 16         # windows (and files' read positions) remembered
_RECENT = 0.25                # seconds: a read of a window pushed longer ago means the kernel
                              # dropped those pages (memory pressure, fadvise), so push again
_QUEUED = 256                 # jobs waiting at most; more are simply not done


class Prefetcher:
    def __init__(self):
        self._done = OrderedDict()      # (fuse ino, window, job kind) -> when it was queued
        self._next = OrderedDict()      # fuse ino -> where the file's last read ended
        self._queue = queue.Queue(maxsize=_QUEUED)
        self._thread = threading.Thread(target=self._run, name="imagefs-prefetch", daemon=True)
        self._thread.start()

    def after_read(self, fuse_ino, tree, ino, size, offset, length):
        """Called for each read of an image file (``size``: the file's): queue what helps next."""
        if size < MIN_FILE:
            return
        sequential = self._next.get(fuse_ino, 0) == offset
        self._next[fuse_ino] = offset + length
        self._next.move_to_end(fuse_ino)
        if len(self._next) > _REMEMBERED:
            self._next.popitem(last=False)
        window = offset // WINDOW
        if sequential:
            for w in range(window, window + 1 + AHEAD):
                if w * WINDOW < size:
                    self._queue_job("advise", fuse_ino, tree, ino, size, w)
        else:
            self._queue_job("store", fuse_ino, tree, ino, size, window)

    def _queue_job(self, kind, fuse_ino, tree, ino, size, window):
        key = (fuse_ino, window, kind)
        now = time.monotonic()
        if now - self._done.get(key, -_RECENT) < _RECENT:
            return
        try:
            self._queue.put_nowait((kind, fuse_ino, tree, ino, size, window * WINDOW))
        except queue.Full:
            return
        self._done[key] = now
        self._done.move_to_end(key)
        if len(self._done) > _REMEMBERED:
            self._done.popitem(last=False)

    def close(self):
        self._queue.put(None)

    def _run(self):
        while (job := self._queue.get()) is not None:
            kind, fuse_ino, tree, ino, size, start = job
            length = min(WINDOW, size - start)
            try:
                if kind == "advise":
                    tree.advise(ino, start, length)
                else:
                    pyfuse3.notify_store(fuse_ino, start, tree.read(ino, start, length))
            except OSError:
                pass        # the kernel forgot the inode meanwhile: nothing to fill
            except Exception as e:   # noqa: BLE001 - a prefetch failure must never hurt reads
                log.debug("prefetch (%s) of inode %d at %d failed: %s", kind, fuse_ino, start, e)
