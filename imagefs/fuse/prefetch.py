"""Read-around for image files: push whole windows into the kernel's page cache.

Image files never change, so after a read of one part of a file it is safe (and
cheap: local preads) to hand the kernel the rest of its 4 MiB window ahead of time
with FUSE's notify_store. Random readers then find their next pages cached instead
of paying a round trip through the daemon for every 4 KiB; sequential readers get
the window filled by a second core while the loop answers the kernel's readahead.

The stores run on one worker thread, never on the event loop: the kernel may have
to wait for a page that a read in flight holds locked, and only the loop can answer
that read.
"""
import logging
import queue
import threading
import time
from collections import OrderedDict

import pyfuse3

log = logging.getLogger("imagefs.fuse")

WINDOW = 4 << 20
MIN_FILE = 256 << 10          # smaller files are covered by the kernel's own readahead
_REMEMBERED = 1 << 16         # windows remembered as recently pushed
_RECENT = 0.25                # seconds: a read of a window pushed longer ago means the kernel
                              # dropped those pages (memory pressure, fadvise), so push again
_QUEUED = 256                 # windows waiting at most; more are simply not prefetched


class Prefetcher:
    def __init__(self):
        self._pushed = OrderedDict()
        self._queue = queue.Queue(maxsize=_QUEUED)
        self._thread = threading.Thread(target=self._run, name="imagefs-prefetch", daemon=True)
        self._thread.start()

    def after_read(self, fuse_ino, tree, ino, size, offset):
        """Called for each read of an image file: queue its window unless already pushed."""
        if size < MIN_FILE:
            return
        key = (fuse_ino, offset // WINDOW)
        now = time.monotonic()
        if now - self._pushed.get(key, -_RECENT) < _RECENT:
            return
        try:
            self._queue.put_nowait((fuse_ino, tree, ino, size, key[1] * WINDOW))
        except queue.Full:
            return
        self._pushed[key] = now
        self._pushed.move_to_end(key)
        if len(self._pushed) > _REMEMBERED:
            self._pushed.popitem(last=False)

    def close(self):
        self._queue.put(None)

    def _run(self):
        while (job := self._queue.get()) is not None:
            fuse_ino, tree, ino, size, start = job
            try:
                data = tree.read(ino, start, min(WINDOW, size - start))
                pyfuse3.notify_store(fuse_ino, start, data)
            except OSError:
                pass        # the kernel forgot the inode meanwhile: nothing to fill
            except Exception as e:   # noqa: BLE001 - a prefetch failure must never hurt reads
                log.debug("prefetch of inode %d at %d failed: %s", fuse_ino, start, e)
