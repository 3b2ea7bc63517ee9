"""import/<new-id>: a tar written into the mount becomes image <new-id>, a child of the directory's image.

The life of one import (docs/mount.md has the user's view):

1. ``create`` of the name (``touch``, ``cat >``, ``cp``...) makes a pending session.
   While no byte has arrived, ``user.imagefs.sum`` and ``user.imagefs.meta.<key>``
   xattrs may be set on it.
2. The first write starts ``ImageStore.write_image`` in a worker thread that reads a
   pipe; each FUSE write is pushed into the pipe, and trio waits while the pipe is
   full: that is the backpressure, and memory stays at about one pipe.
3. The handle that wrote (or was opened with O_TRUNC) commits at a flush (a close of
   one of its descriptors): that flush closes the pipe and waits for the worker, so
   close() returns the import's result (EINVAL for a bad tar, a truncated one or a
   wrong sum, EEXIST, ENOSPC, EIO...). Which flush commits: the first one after the
   worker has read the tar's end-of-archive marker, so the process that delivered the
   marker (``cat`` in ``sh -c "cat layer.tar > import/x"``) sees the result in its own
   close, even where the shell keeps another descriptor until after ``cat`` exits
   (dash). Before the marker, a flush commits only if no other process holds a
   descriptor of the file (holders.py; ``{ a; b; } > import/x`` flushes after ``a``),
   and where that cannot be told, the commit waits for ``release``: the kernel sends
   it once the last reference to the open file is gone, whatever dup() and fork()
   made, and that close has already returned (the result is in ``.error``).
   A handle opened without O_TRUNC that wrote nothing (``touch``) commits nothing.
   Zeros written after a commit are the tar's record padding, accepted and dropped;
   other bytes are EINVAL.
4. A failure leaves no image and ``import/<new-id>.error`` with the reason (also logged).

Shutting down aborts the sessions still receiving bytes (the writer undoes its work)
and lets the ones already committing finish.
"""
import ctypes
import fcntl
import itertools
import logging
import os
import re
import threading
from dataclasses import dataclass

import trio

from ..errors import ImageFSError, InUse, InvalidInput
from ..ids import check_id
from . import holders
from .files import Handle
from .errors import Canceled, NoAttr, NotSupported, Unseekable

log = logging.getLogger("imagefs.fuse.imports")

SUM_XATTR = b"user.imagefs.sum"
META_XATTR = b"user.imagefs.meta."
PIPE_SIZE = 1 << 20
_SUM_RE = re.compile(rb"sha256:[0-9a-f]{64}\Z")
_ZEROS = bytes(1 << 20)


@dataclass(frozen=True)
class Failure:
    serial: int
    message: str


class ImportRegistry:
    """The pending and running imports of the mount, and the reasons of failed ones.

    Plain and lock-protected: the namespace reads it from worker threads.
    """

    def __init__(self, store):
        self.store = store
        self.nursery = None           # where workers run; set when the mount starts serving
        self.on_finished = None       # callback(session, ok) on the trio thread
        self.closing = False
        self.device = None            # st_dev of the mount, set when it serves (holders.py needs it)
        self._lock = threading.Lock()
        self._sessions = {}           # (image idx, new id) -> ImportSession
        self._failures = {}           # (image idx, new id) -> Failure
        self._serials = itertools.count(1)

    def sessions(self, idx):
        with self._lock:
            return sorted((nid, s) for (i, nid), s in self._sessions.items() if i == idx)

    def failures(self, idx):
        with self._lock:
            return sorted((nid, f) for (i, nid), f in self._failures.items() if i == idx)

    def get(self, idx, new_id):
        return self._sessions.get((idx, new_id))

    def failure(self, idx, new_id):
        return self._failures.get((idx, new_id))

    def begin(self, ref, new_id):
        if self.closing:
            raise Canceled("imagefs is unmounting")
        with self._lock:
            if (ref.idx, new_id) in self._sessions:
                raise InUse(f"an import of {new_id} is already pending")
            self._failures.pop((ref.idx, new_id), None)
            session = self._sessions[(ref.idx, new_id)] = ImportSession(self, ref, new_id, next(self._serials))
        return session

    def cancel(self, idx, new_id):
        """Drop a pending session (``rm import/<new-id>``); one that has started is busy."""
        with self._lock:
            session = self._sessions.get((idx, new_id))
            if session is not None and session.state != PENDING:
                raise InUse(f"import {new_id} is running")
            self._sessions.pop((idx, new_id), None)

    def clear_failure(self, idx, new_id):
        with self._lock:
            self._failures.pop((idx, new_id), None)

    def all_sessions(self):
        with self._lock:
            return list(self._sessions.values())

    def finish(self, session, error):
        with self._lock:
            if self._sessions.get((session.ref.idx, session.new_id)) is session:
                del self._sessions[(session.ref.idx, session.new_id)]
            if error is not None:
                self._failures[(session.ref.idx, session.new_id)] = Failure(next(self._serials), _reason(error))

    async def shutdown(self):
        """Abort what is still receiving; wait for nothing here (the nursery waits for the workers)."""
        self.closing = True
        for session in self.all_sessions():
            await session.abort()


PENDING, RECEIVING, COMMITTING, DONE = "pending", "receiving", "committing", "done"
ENDED, FINISHED, NEEDS_MORE = "ended", "finished", "needs more"      # where the worker stands at a flush


class ImportHandle(Handle):
    """One open() of an import file."""
    direct_io = True        # every write must reach the import, in order

    def __init__(self, session, ino, truncate):
        self.session = session
        self.ino = ino
        if truncate:
            session.claim(self)

    async def write(self, off, data):
        return await self.session.write(self, off, data)

    async def flush(self):
        await self.session.flush(self)

    async def truncate(self, size):
        await self.session.truncate(self, size)

    def release(self):
        self.session.release(self)


class ImportSession:
    def __init__(self, registry, ref, new_id, serial):
        self.registry = registry
        self.ref = ref
        self.new_id = new_id
        self.serial = serial
        self.metadata = {}
        self.expected_sum = None
        self.received = 0
        self.state = PENDING
        self._owner = None            # the handle whose last close commits
        self._send = None             # trio FdStream of the pipe's write end
        self._done = None             # trio.Event: the worker has finished
        self._error = None
        self._aborted = False
        self._write_lock = trio.Lock()
        self._stream = _StreamState()     # how far the worker has read, shared with its thread

    # --- xattrs, before the first byte ------------------------------------------------------
    def xattrs(self):
        out = {META_XATTR + k.encode(): v for k, v in self.metadata.items()}
        if self.expected_sum:
            out[SUM_XATTR] = self.expected_sum.encode()
        return out

    def setxattr(self, name, value):
        self._check_settable()
        if name == SUM_XATTR:
            value = value.strip()
            if not _SUM_RE.match(value):
                raise InvalidInput(f"invalid expected sum {value!r}: use sha256:<64 lowercase hex digits>")
            self.expected_sum = value.decode()
        elif name.startswith(META_XATTR):
            key = check_id(name[len(META_XATTR):].decode("utf-8", "surrogateescape"), "metadata key")
            self.metadata[key] = bytes(value)
        else:
            raise NotSupported(f"{name.decode('utf-8', 'replace')}: set user.imagefs.sum or user.imagefs.meta.<key>")

    def removexattr(self, name):
        self._check_settable()
        key = name[len(META_XATTR):].decode("utf-8", "surrogateescape") if name.startswith(META_XATTR) else None
        if name == SUM_XATTR and self.expected_sum:
            self.expected_sum = None
        elif key in self.metadata:
            del self.metadata[key]
        else:
            raise NoAttr(f"{name.decode('utf-8', 'replace')}: not set")

    def _check_settable(self):
        if self.state != PENDING:
            raise InUse(f"import {self.new_id} has started: its sum and metadata are fixed")

    # --- the bytes --------------------------------------------------------------------------
    def claim(self, handle):
        """``handle`` will commit the import; only one handle can."""
        if self._owner is handle:
            return
        if self.state == DONE:
            raise self._result_error()
        if self._owner is not None:
            raise InUse(f"import {self.new_id} is being written through another open file")
        self._owner = handle

    async def write(self, handle, off, data):
        self.claim(handle)
        async with self._write_lock:
            if self.state == PENDING:
                self._start()
            if self.state == DONE and self._error is None and off >= self.received and not data.strip(b"\0"):
                # zeros after a committed layer's end-of-archive marker: the tar's record padding
                # (tar -cf pads to 10 KiB), arriving after an earlier close committed the layer
                self.received = off + len(data)
                return len(data)
            if self._aborted:          # before the worker has ended with it: still ECANCELED
                raise Canceled(f"import {self.new_id} canceled: imagefs is unmounting")
            if self.state != RECEIVING:
                raise self._result_error()
            if off < self.received:
                raise Unseekable(f"import {self.new_id}: layers are written front to back")
            while self.received < off:   # a forward seek (a hole): zeros, as a file would read
                await self._send_bytes(_ZEROS[: min(len(_ZEROS), off - self.received)])
            await self._send_bytes(data)
        return len(data)

    async def truncate(self, handle, size):
        """ftruncate: to 0 before any byte is harmless; growing appends zeros; shrinking is refused."""
        if size == self.received:
            return
        if size < self.received:
            raise Unseekable(f"import {self.new_id}: cannot shrink a stream already received")
        await self.write(handle, size, b"")

    async def _send_bytes(self, data):
        try:
            await self._send.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self._done.wait()    # the worker stopped reading: it failed, say why
            raise self._result_error() from None
        self.received += len(data)

    async def flush(self, handle):
        if handle is not self._owner:
            return
        if self.state == DONE:
            if self._error is not None:
                raise self._result_error()
            return
        if self.state == RECEIVING:
            settled = await trio.to_thread.run_sync(self._stream.wait_settled, self.received,
                                                    abandon_on_cancel=True)
            if settled == ENDED:       # the tar is whole: this close is the writer's, it gets the result
                await self._commit()
                return
            if settled == FINISHED:    # the worker failed already: say so now, not at a later close
                await self._done.wait()
                if self._error is not None:
                    raise self._result_error()
        if await trio.to_thread.run_sync(holders.held_elsewhere, self.new_id, handle.ino, self.registry.device):
            return                     # another descriptor may share it: commit at its close, or at release
        await self._commit()

    def release(self, handle):
        if handle is self._owner and self.state in (PENDING, RECEIVING):
            # The last reference to the open file is gone and no flush committed (a holder
            # was seen, or could not be ruled out): the writer is done, whatever it was.
            self.registry.nursery.start_soon(self._commit_quietly)

    async def _commit(self):
        async with self._write_lock:
            if self.state == PENDING:
                self._start()
            if self.state == RECEIVING:
                self.state = COMMITTING
                await self._send.aclose()
        await self._done.wait()
        if self._error is not None:
            raise self._result_error()

    async def _commit_quietly(self):
        try:
            await self._commit()
        except ImageFSError:
            pass                       # recorded in .error and logged by the worker

    async def abort(self):
        """Undo: the worker sees the end of the stream and fails instead of sealing."""
        if self.state == PENDING:
            self.registry.finish(self, Canceled("imagefs is unmounting"))
            self.state = DONE
        elif self.state == RECEIVING:
            self._aborted = True
            self.state = COMMITTING
            await self._send.aclose()      # a write waiting on the full pipe fails at once

    # --- the worker -----------------------------------------------------------------------------
    def _start(self):
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass                       # the default pipe size only costs more wakeups
        self._send = trio.lowlevel.FdStream(write_fd)
        self._done = trio.Event()
        self.state = RECEIVING
        self.registry.nursery.start_soon(self._run, read_fd)

    async def _run(self, read_fd):
        try:
            await trio.to_thread.run_sync(self._write_image, read_fd, limiter=trio.CapacityLimiter(1))
        except BaseException as e:   # noqa: B902 - every failure is the import's result
            self._error = e
            log.warning("import %s/%s (child of %s) failed: %s", self.ref.store, self.new_id, self.ref.id,
                        _reason(e))
        else:
            log.info("import %s/%s (child of %s): sealed, %d bytes", self.ref.store, self.new_id, self.ref.id,
                     self.received)
        self._stream.finish()
        self.state = DONE
        if self._send is not None:
            await self._send.aclose()
        self.registry.finish(self, self._error)
        self._done.set()
        if self.registry.on_finished is not None:
            self.registry.on_finished(self, self._error is None)
        if isinstance(self._error, (KeyboardInterrupt, SystemExit)):
            raise self._error

    def _write_image(self, read_fd):
        reader = _PipeReader(read_fd, self)
        try:
            self.registry.store.write_image(self.ref.store, self.ref.id, self.new_id, reader,
                                            metadata=dict(self.metadata), expected_sum=self.expected_sum,
                                            on_archive_end=self._stream.archive_ended)
        finally:
            reader.close()             # a writer still sending now gets EPIPE
            self._stream.finish()
            _give_back_memory()

    def _result_error(self):
        err = self._error
        if err is None:
            return InvalidInput(f"import {self.new_id} is already committed")
        if isinstance(err, ImageFSError):
            return err
        wrapped = ImageFSError(_reason(err))
        if isinstance(err, OSError) and err.errno:
            wrapped.errno = err.errno
        return wrapped


class _StreamState:
    """How far the worker has got with the bytes sent (its thread writes, flushes read).

    A flush must know whether the tar the writer sent is whole. It is, once the worker has
    read the end-of-archive marker; it is not (yet), once the worker has used up every byte
    sent so far and waits for more. ``wait_settled`` waits for one of the two.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._consumed = 0
        self._reading = False          # the worker is in a read: all it had before is used up
        self._ended = False            # the worker read the end-of-archive marker
        self._finished = False

    def reading(self, start, n=0):
        with self._cond:
            self._consumed += n
            self._reading = start
            self._cond.notify_all()

    def archive_ended(self):
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def finish(self):
        with self._cond:
            self._finished = True
            self._cond.notify_all()

    def wait_settled(self, received):
        """ENDED once the worker has read the end-of-archive marker from the first ``received``
        bytes, FINISHED if it stopped (it failed), NEEDS_MORE once it waits for more than those."""
        with self._cond:
            self._cond.wait_for(lambda: self._ended or self._finished or
                                (self._reading and self._consumed >= received))
            return ENDED if self._ended else FINISHED if self._finished else NEEDS_MORE


class _PipeReader:
    """The read end of an import's pipe as the layer writer reads it; an abort ends it with an error."""

    def __init__(self, fd, session):
        self._fd = fd
        self._session = session

    def readinto(self, buf):
        state = self._session._stream
        state.reading(True)
        n = 0
        try:
            n = os.readv(self._fd, [buf])
        finally:
            state.reading(False, n)
        if n == 0 and self._session._aborted:
            raise Canceled(f"import {self._session.new_id} canceled: imagefs is unmounting")
        return n

    def read(self, size=-1):
        buf = bytearray(size if size and size > 0 else PIPE_SIZE)
        return bytes(buf[: self.readinto(buf)])

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _give_back_memory():
    """Return the memory a finished import freed to the system. Each worker thread allocates
    from its own malloc arena, and a freed arena keeps its pages: without this the daemon's
    RSS would settle at the peak of the most imports ever run at once."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim      # glibc
    except (OSError, AttributeError):
        return None


_malloc_trim = _load_malloc_trim()


def _reason(err):
    text = str(err) or type(err).__name__
    if not isinstance(err, ImageFSError):
        text = f"internal error: {type(err).__name__}: {text}"
    return " ".join(text.split())       # one line
