"""A size-bounded local cache of the blocks of datastore files that reads needed.

Sealed layers never change, so nothing is ever invalidated: an entry is keyed by the
file's path together with its size and modification time as the datastore reports
them, and a disk replaced under the same name (a new size or time) starts afresh.

Layout under the cache root (one per datastore URL):
    files/<datastore path>     a sparse host file holding the blocks fetched so far, at
                               their own offsets: the datastore's layout, so that relative
                               parent hints between staged disks resolve on the host
    meta/<sha1 of path>.key    "<size> <mtime>" of the cached incarnation, then the path
    meta/<sha1 of path>.map    one byte per block: 1 = present (no read-modify-write of
                               bits, so a crash can lose a mark but never invent one)
A warm read is one pread of a host file, as on the local backend. When the blocks held
exceed the limit, the least recently read ones are punched out of their files (files
pinned by a running tool excepted). One process owns a cache root at a time (flock);
another process meanwhile gets a private cache of its own, removed when it closes.
"""
import atexit
import collections
import ctypes
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import threading

log = logging.getLogger("imagefs.vsphere")

BLOCK = 1 << 20
MAX_RUN = 16            # blocks fetched by one request at most
DEFAULT_LIMIT = 4 << 30
_PRIVATE_PREFIX = "private-"
_FALLOC_PUNCH = 0x02 | 0x01         # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (linux/falloc.h)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


class CachedFile:
    def __init__(self, cache, path, size, stamp):
        self.path, self.size, self.stamp = path, size, stamp
        self.nblocks = (size + BLOCK - 1) // BLOCK
        self.host = cache.host_path(path)
        self._meta = cache.meta_path(path)
        os.makedirs(os.path.dirname(self.host), exist_ok=True)
        fresh = (_read_text(self._meta + ".key") or "").partition("\n")[0] != stamp
        if fresh:
            _unlink(self._meta + ".map")
            _unlink(self.host)
        self.fd = os.open(self.host, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)
        self.map_fd = os.open(self._meta + ".map", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        present = bytearray(os.pread(self.map_fd, self.nblocks, 0))
        self.present = present + bytearray(self.nblocks - len(present))
        if fresh:
            _write_text(self._meta + ".key", f"{stamp}\n{path}")
        self.pins = 0
        self.next, self.ahead = -1, 0       # a sequential reader's next block, read-ahead window

    def mark(self, block, on):
        self.present[block] = 1 if on else 0
        os.pwrite(self.map_fd, b"\1" if on else b"\0", block)

    def close(self):
        for fd in (self.fd, self.map_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class BlockCache:
    def __init__(self, root, limit, fetch):
        """``fetch(path, offset, length) -> bytes`` reads the datastore."""
        self.limit = max(int(limit), BLOCK)
        self._fetch = fetch
        self._lock = threading.Lock()
        self._files = {}                            # path -> CachedFile
        self._lru = collections.OrderedDict()       # (path, block) -> None, oldest first
        self.held = 0                               # bytes of blocks present
        self.fetched = 0                            # bytes fetched from the datastore (for tests/bench)
        os.makedirs(root, exist_ok=True)
        _remove_dead_private_caches(os.path.dirname(root))
        self._lock_fd = _try_lock(os.path.join(root, "lock"))
        if self._lock_fd >= 0:
            self.root, self.private = root, False
        else:
            # locked before it carries the name that the sweep of dead caches looks for
            new = tempfile.mkdtemp(prefix=".new-", dir=os.path.dirname(root))
            self._lock_fd = _try_lock(os.path.join(new, "lock"))
            self.root = os.path.join(os.path.dirname(root), _PRIVATE_PREFIX + os.path.basename(new)[5:])
            os.rename(new, self.root)
            self.private = True
            log.info("cache %s is in use by another process; using a private cache", root)
        atexit.register(self.close)
        os.makedirs(os.path.join(self.root, "files"), exist_ok=True)
        os.makedirs(os.path.join(self.root, "meta"), exist_ok=True)
        self._account_existing()

    # --- names -------------------------------------------------------------------------------
    def host_path(self, path):
        return os.path.join(self.root, "files", path)

    def meta_path(self, path):
        return os.path.join(self.root, "meta", hashlib.sha1(path.encode()).hexdigest())

    def _account_existing(self):
        """Count what earlier runs left: whole files, oldest map first, into the LRU order."""
        meta = os.path.join(self.root, "meta")
        maps = [os.path.join(meta, n) for n in os.listdir(meta) if n.endswith(".map")]
        for m in sorted(maps, key=lambda p: os.stat(p).st_mtime):
            with open(m, "rb") as f:
                n = sum(f.read())
            self.held += n * BLOCK
            self._lru[(m, -1)] = n                  # a whole earlier file, evicted as one
        self._evict()

    # --- entries -----------------------------------------------------------------------------
    def entry(self, path, size, stamp):
        """The cache entry of ``path`` in its incarnation ``stamp`` (size and mtime)."""
        with self._lock:
            cf = self._files.get(path)
            if cf is not None and cf.stamp == stamp and cf.size == size:
                return cf
            if cf is not None:
                self._drop(cf)
            meta = self.meta_path(path) + ".map"
            old = self._lru.pop((meta, -1), None)
            if old:
                self.held -= old * BLOCK
            cf = CachedFile(self, path, size, stamp)
            for b in range(cf.nblocks):
                if cf.present[b]:
                    self._lru[(path, b)] = None
                    self.held += BLOCK
            self._files[path] = cf
            return cf

    def forget(self, path):
        """Drop what is cached of ``path`` (deleted or about to be replaced)."""
        with self._lock:
            cf = self._files.pop(path, None)
            if cf is not None:
                self._drop(cf)
            meta = self.meta_path(path)
            old = self._lru.pop((meta + ".map", -1), None)
            if old:
                self.held -= old * BLOCK
            for p in (self.host_path(path), meta + ".map", meta + ".key"):
                _unlink(p)

    def forget_tree(self, prefix):
        """Drop every cached file under directory ``prefix``."""
        with self._lock:
            paths = [p for p in self._files if p.startswith(prefix.rstrip("/") + "/")]
        for p in paths:
            self.forget(p)
        shutil.rmtree(self.host_path(prefix), ignore_errors=True)

    def adopt(self, path, stamp):
        """A file a tool wrote at ``host_path(path)`` and that was just stored: all of it is
        present now."""
        size = os.path.getsize(self.host_path(path))
        with self._lock:
            _write_text(self.meta_path(path) + ".key", f"{stamp}\n{path}")
            with open(self.meta_path(path) + ".map", "wb") as f:
                f.write(b"\1" * ((size + BLOCK - 1) // BLOCK))
            cf = self._files.pop(path, None)
            if cf is not None:
                self._drop(cf, keep_files=True)
        self.entry(path, size, stamp)
        with self._lock:
            self._evict()

    def _drop(self, cf, keep_files=False):
        for b in range(cf.nblocks):
            if self._lru.pop((cf.path, b), 0) is None:
                self.held -= BLOCK
        cf.close()

    # --- reading ------------------------------------------------------------------------------
    def pread(self, cf, offset, length):
        if offset >= cf.size or length <= 0:
            return b""
        length = min(length, cf.size - offset)
        first, last = offset // BLOCK, (offset + length - 1) // BLOCK
        fetched = {}
        for _ in range(3):
            with self._lock:
                missing = [b for b in range(first, last + 1) if not cf.present[b] and b not in fetched]
                if missing and not fetched:
                    missing += self._read_ahead(cf, first, last)
                if not missing:
                    for b in range(first, last + 1):
                        if (cf.path, b) in self._lru:
                            self._lru.move_to_end((cf.path, b))
                    if not fetched:
                        return os.pread(cf.fd, length, offset)
                    return self._assemble(cf, offset, length, fetched)
            fetched.update(self._fetch_blocks(cf, missing))
        with self._lock:                    # a cache smaller than one read: serve what we hold
            return self._assemble(cf, offset, length, fetched)

    def _read_ahead(self, cf, first, last):
        """Blocks to fetch beyond a sequential reader's request: the window doubles with
        each read that continues the last one, up to MAX_RUN blocks (lock held)."""
        cf.ahead = min(max(cf.ahead * 2, 1), MAX_RUN) if first in (cf.next, cf.next - 1) else 0
        cf.next = last + 1
        extra = []
        for b in range(last + 1, min(last + 1 + cf.ahead, cf.nblocks)):
            if cf.present[b]:
                break
            extra.append(b)
        return extra

    def _assemble(self, cf, offset, length, fetched):
        out = []
        pos, end = offset, offset + length
        while pos < end:
            b, within = divmod(pos, BLOCK)
            take = min(end - pos, BLOCK - within)
            block = fetched.get(b)
            out.append(block[within:within + take] if block is not None else os.pread(cf.fd, take, pos))
            pos += take
        return b"".join(out)

    def _fetch_blocks(self, cf, blocks):
        """Fetch runs of consecutive missing blocks; store them; return them by number."""
        got = {}
        for start, count in _runs(blocks, MAX_RUN):
            offset = start * BLOCK
            data = self._fetch(cf.path, offset, min(count * BLOCK, cf.size - offset))
            self.fetched += len(data)
            os.pwrite(cf.fd, data, offset)
            for i in range(count):
                got[start + i] = data[i * BLOCK:(i + 1) * BLOCK]
            with self._lock:
                if self._files.get(cf.path) is not cf:
                    continue                # forgotten meanwhile: serve, do not keep
                for i in range(count):
                    b = start + i
                    if not cf.present[b]:
                        cf.mark(b, True)
                        self.held += BLOCK
                    self._lru[(cf.path, b)] = None
                    self._lru.move_to_end((cf.path, b))
                self._evict()
        return got

    def materialize(self, cf):
        """Fetch every block not yet present: the host file is then the whole file."""
        with self._lock:
            missing = [b for b in range(cf.nblocks) if not cf.present[b]]
        if missing:
            self._fetch_blocks(cf, missing)
        with self._lock:
            if any(not cf.present[b] for b in range(cf.nblocks)):
                raise OSError("the cache is too small to hold the files a tool needs at once")
        return cf.host

    def pin(self, cf):
        with self._lock:
            cf.pins += 1

    def unpin(self, cf):
        with self._lock:
            cf.pins -= 1
            self._evict()

    def _evict(self):
        """Punch out least recently read blocks until the limit holds (lock held)."""
        skipped = []
        while self.held > self.limit and self._lru:
            (path, b), value = self._lru.popitem(last=False)
            if b == -1:                                 # an earlier run's file: remove whole
                self.held -= value * BLOCK
                key = path[:-len(".map")] + ".key"
                _, _, cached = (_read_text(key) or "").partition("\n")
                for p in ([self.host_path(cached)] if cached else []) + [path, key]:
                    _unlink(p)
                continue
            cf = self._files.get(path)
            if cf is None:
                continue
            if cf.pins:
                skipped.append((path, b))
                continue
            cf.mark(b, False)                           # unmark first: never a present hole
            _punch_hole(cf.fd, b * BLOCK, BLOCK)
            self.held -= BLOCK
        for key in reversed(skipped):
            self._lru[key] = None
            self._lru.move_to_end(key, last=False)

    def close(self):
        with self._lock:
            for cf in self._files.values():
                cf.close()
            self._files.clear()
        if self.private:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        atexit.unregister(self.close)


def _try_lock(path):
    """An fd holding an exclusive flock on ``path``, or -1 if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return -1


def _remove_dead_private_caches(parent):
    """Private caches left by processes that died: their lock is free (a live owner holds
    it for as long as it runs), so they provably belong to no one."""
    for name in os.listdir(parent):
        if not name.startswith(_PRIVATE_PREFIX):
            continue
        path = os.path.join(parent, name)
        try:
            fd = _try_lock(os.path.join(path, "lock"))
        except OSError:
            continue
        if fd >= 0:
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)


def _punch_hole(fd, offset, length):
    """Give a block's space back (Python has no fallocate(2) of its own)."""
    if _libc.fallocate(fd, _FALLOC_PUNCH, offset, length) != 0:
        err = ctypes.get_errno()
        log.warning("cache: cannot punch a hole (%s): the block stays on disk", os.strerror(err))


def _runs(blocks, limit):
    start = prev = None
    for b in blocks:
        if start is not None and b == prev + 1 and b - start < limit:
            prev = b
            continue
        if start is not None:
            yield start, prev - start + 1
        start = prev = b
    if start is not None:
        yield start, prev - start + 1


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def _write_text(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
